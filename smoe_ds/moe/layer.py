"""The FFN of one transformer block in each ``moe.mode``.

- ``smoe_dropout``: ``SMoEDropoutMoE``, a DeepSpeed ``MoE`` with the frozen random router,
  stacked experts run as grouped or dense-masked GEMMs, and a dispatcher that sends each token
  at most once per rank.
- ``learned``: DeepSpeed's stock ``MoE`` (trainable ``TopKGate`` with its balance loss), fixed k.
- ``dense``: one ``FeedForward`` of width N * d_expert, the same parameter count.

Both MoE variants are ``deepspeed.moe.layer.MoE`` instances, which is what makes the
DeepSpeed engine reduce expert gradients over the expert-data-parallel group only, save one
file per global expert and build MoE parameter groups for ZeRO-1/2.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

from smoe_ds.config.schema import EP_EXCHANGES, MoEConfig
from smoe_ds.moe.dispatch import combine, dispatch, full_routes
from smoe_ds.moe.experts import FeedForward, GroupedExperts
from smoe_ds.moe.parallel import expert_group_name
from smoe_ds.moe.router import FrozenRandomGate
from smoe_ds.moe.routes import Routes


class SMoEDropoutDispatcher(nn.Module):
    """route -> dispatch -> experts -> combine, or with ``ep_exchange="weights"`` route -> gathered
    experts; sits where DeepSpeed's MOELayer would.

    x [B, T, D] -> [B, T, D]. After each forward ``l_aux`` (always 0: SMoE-Dropout has no
    balance loss) and ``exp_counts`` (routes per expert on this rank) are set, as MOELayer does.
    """

    def __init__(
        self,
        gate: FrozenRandomGate,
        experts: GroupedExperts,
        ep_size: int,
        full_route_dispatch: str = "all_to_all",
        ep_exchange: str = MoEConfig.ep_exchange,
    ) -> None:
        super().__init__()
        self.gate, self.experts, self.ep_size = gate, experts, ep_size
        # the collective for full routes (smoe_ds.moe.dispatch), None to always count and route
        self.full_route = None if full_route_dispatch == "counted" else full_route_dispatch
        self.ep_exchange = ep_exchange  # "weights": the experts travel (smoe_ds.moe.dispatch), else the tokens
        self.ep_group = None
        self.l_aux = torch.zeros(())
        self.exp_counts = None

    def _set_ep_group(self, ep_group) -> None:  # called by MoE.set_deepspeed_parallelism
        self.ep_group = ep_group

    def forward(self, x: torch.Tensor, used_token=None) -> torch.Tensor:
        if used_token is not None:
            raise NotImplementedError("SMoE-Dropout routes every token; used_token masks are not supported")
        x_SD = x.reshape(-1, x.shape[-1])
        routes_S = self.gate.route(x_SD)  # [S, k] ids and gates: sized by k, which the host knows
        if self.ep_size == 1:
            out_SD, plan = self.experts(x_SD, routes_S), None
        elif self.ep_exchange == "weights":  # every expert comes here: no token leaves
            out_SD, plan = self.experts(x_SD, routes_S, gather_group=self.ep_group), None
        else:
            k, full = self.gate.k, full_routes(self.gate.k, self.gate.num_experts, self.ep_size)
            route = self.full_route if full else None
            x_TD, gates_TE, plan = dispatch(x_SD, routes_S.dense(), self.ep_group, self.ep_size, route, k)
            # A received token has at most min(k, E) of its routes here: that many per token keeps
            # the sizes fixed (the zero gates among them cost work, never correctness).
            routes_T = Routes.from_dense(gates_TE, min(k, gates_TE.shape[1]), routes_S.density)
            out_SD = combine(self.experts(x_TD, routes_T), plan)
        self.l_aux, self.exp_counts, self.last_plan = (
            x.new_zeros((), dtype=torch.float32),
            self.gate.last_counts_N,
            plan,
        )
        return out_SD.view_as(x)


class SMoEDropoutFFN(nn.Module):
    """The SMoE-Dropout FFN without DeepSpeed: x [B, T, D] -> ([B, T, D], l_aux, counts).

    It has the attributes and the forward of ``deepspeed.moe.layer.MoE``, so that the
    DeepSpeed flavour below only adds the base class; single-device inference uses this one
    and never imports DeepSpeed.
    """

    def __init__(self, d_model: int, cfg: MoEConfig, layer_index: int) -> None:
        gate = FrozenRandomGate(
            d_model,
            cfg.num_experts,
            k=cfg.k_schedule.k_max,
            router_seed=cfg.router_seed,
            layer_index=layer_index,
            capacity_factor=cfg.capacity_factor,
            init_std=cfg.router_init_std,
            **(dict(weighting="uniform", routing="random") if cfg.mode == "thor" else {}),
        )
        experts = GroupedExperts(cfg.num_experts // cfg.ep_size, d_model, cfg.d_expert, expert_group_name(cfg.ep_size))
        self._init_parts(gate, experts, cfg.ep_size, cfg.full_route_dispatch, cfg.ep_exchange)

    @classmethod
    def from_parts(
        cls,
        gate: FrozenRandomGate,
        experts: GroupedExperts,
        ep_size: int = 1,
        full_route_dispatch: str = "all_to_all",
        ep_exchange: str = MoEConfig.ep_exchange,
    ):
        """The FFN around a given router and this rank's experts (e.g. slices of a pretrained FFN);
        ``experts`` must be built with ``group_name=expert_group_name(ep_size)``."""
        self = cls.__new__(cls)
        self._init_parts(gate, experts, ep_size, full_route_dispatch, ep_exchange)
        return self

    def _init_parts(
        self, gate: FrozenRandomGate, experts: GroupedExperts, ep_size: int, full_route_dispatch: str, ep_exchange: str
    ) -> None:
        nn.Module.__init__(self)  # MoE.__init__ would build a stock TopKGate and N deep-copied experts
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.ep_size = ep_size
        self.expert_group_name = expert_group_name(ep_size)
        self.num_experts = gate.num_experts
        self.num_local_experts = experts.num_local_experts
        self.deepspeed_moe = SMoEDropoutDispatcher(gate, experts, ep_size, full_route_dispatch, ep_exchange)

    def forward(self, hidden_states: torch.Tensor, used_token=None):
        out = self.deepspeed_moe(hidden_states, used_token)
        return out, self.deepspeed_moe.l_aux, self.deepspeed_moe.exp_counts


@functools.cache
def deepspeed_moe_class() -> type:
    """``SMoEDropoutMoE``: the FFN as a ``deepspeed.moe.layer.MoE``, built on first use.

    Being an ``MoE`` instance is what makes DeepSpeed's engine reduce expert gradients over
    the expert-data-parallel group only, save one file per global expert and build MoE
    parameter groups for ZeRO-1/2. ``set_deepspeed_parallelism`` comes from ``MoE``.
    """
    from deepspeed.moe.layer import MoE

    class SMoEDropoutMoE(SMoEDropoutFFN, MoE):
        """SMoE-Dropout FFN that DeepSpeed's engine recognises as an MoE layer."""

    return SMoEDropoutMoE


def __getattr__(name: str):  # ``from smoe_ds.moe.layer import SMoEDropoutMoE`` imports DeepSpeed then
    if name == "SMoEDropoutMoE":
        return deepspeed_moe_class()
    raise AttributeError(name)


def build_ffn(d_model: int, cfg: MoEConfig, layer_index: int, for_deepspeed: bool = True) -> nn.Module:
    """The FFN for block ``layer_index`` of a model whose MoE blocks use ``cfg``.

    ``for_deepspeed=False`` builds the same modules as plain ``nn.Module``s: single-device inference
    (no DeepSpeed import) and ZeRO-3, whose engine refuses DeepSpeed ``MoE`` layers (``smoe_ds.distributed.zero3``).
    Only the ``learned`` baseline, which is DeepSpeed's own layer, always needs DeepSpeed.
    """
    if cfg.mode in ("smoe_dropout", "random_fixed", "thor"):  # one layer; k and routing are what differ
        return (deepspeed_moe_class() if for_deepspeed else SMoEDropoutFFN)(d_model, cfg, layer_index)
    if cfg.mode == "learned":
        from deepspeed.moe.layer import MoE

        return MoE(
            hidden_size=d_model,
            expert=FeedForward(d_model, cfg.d_expert),
            num_experts=cfg.num_experts,
            ep_size=cfg.ep_size,
            k=cfg.k,
            capacity_factor=cfg.capacity_factor or 1.0,
            eval_capacity_factor=cfg.capacity_factor or 1.0,
            drop_tokens=cfg.capacity_factor is not None,
            top2_2nd_expert_sampling=False,  # plain top-k, so evaluation at any k is deterministic
        )
    return FeedForward(d_model, cfg.num_experts * cfg.d_expert)


def is_moe(module: nn.Module) -> bool:
    """Any MoE FFN from ``build_ffn`` (ours in either flavour, or DeepSpeed's)."""
    return hasattr(module, "deepspeed_moe")


def ffn_forward(ffn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run any FFN from ``build_ffn``: x [B, T, D] -> (y [B, T, D], balance loss scalar)."""
    if is_moe(ffn):
        y, l_aux, _ = ffn(x)
        return y, l_aux.float()
    return ffn(x), x.new_zeros((), dtype=torch.float32)


def moe_layers(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if is_moe(m))


def set_active_experts(model: nn.Module, k: int) -> None:
    """Route every MoE layer of ``model`` to its top ``k`` experts from the next forward on.

    The one way to choose k, for every model smoe-ds gives: an export loaded with
    ``smoe_ds.inference.load_model`` or ``AutoModelForCausalLM``, a converted pretrained model
    (``smoe_ds.hf``), a DeepSpeed engine's module. A model whose config records the active k
    (``config.active_experts``) records the new one too, so that ``save_pretrained`` keeps it.
    Works for the learned baseline too (DeepSpeed's TopKGate reads ``k`` on each forward).
    A dense model has no experts to choose, so there it does nothing.
    """
    for layer in moe_layers(model):
        n = layer.num_experts
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, {n}], got {k}")
        layer.deepspeed_moe.gate.k = k
    config = getattr(model, "config", None)
    if hasattr(config, "active_experts"):
        config.active_experts = k


def set_ep_exchange(model: nn.Module, exchange: str) -> None:
    """Make every SMoE-Dropout layer of ``model`` move ``exchange`` ("tokens" or "weights", a
    ``moe.ep_exchange``) between expert-parallel ranks from the next forward on, on every rank
    alike; for models built without a ``MoEConfig`` (pretrained conversions). DeepSpeed's learned
    layer has only its own exchange."""
    if exchange not in EP_EXCHANGES:
        raise ValueError(f"ep_exchange must be one of {', '.join(EP_EXCHANGES)}, got {exchange!r}")
    for layer in moe_layers(model):
        if isinstance(layer.deepspeed_moe, SMoEDropoutDispatcher):
            layer.deepspeed_moe.ep_exchange = exchange


@contextlib.contextmanager
def uniform_full_capacity(model: nn.Module) -> Iterator[bool]:
    """Inside the block, frozen softmax-weighted routers weight all N experts equally (1/N) at k = N.

    This is how the paper's released code evaluates with every expert (its ``dense_moe_flag``),
    whereas at k = N in training it uses the softmax over all N logits. Yields whether any layer
    was changed: False for dense models, THOR (already uniform), pretrained conversions with the
    "rescale" weighting and DeepSpeed's learned gate, where the question does not arise.
    """
    gates = [layer.deepspeed_moe.gate for layer in moe_layers(model)]
    gates = [g for g in gates if getattr(g, "weighting", None) == "softmax" and g.routing == "frozen"]
    for g in gates:
        g.weighting = "uniform"
    try:
        yield bool(gates)
    finally:
        for g in gates:
            g.weighting = "softmax"
