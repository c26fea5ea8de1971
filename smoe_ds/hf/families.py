"""Where the FFN lives in each supported Hugging Face architecture, and how its weights are laid out.

Shape legend: D d_model, F the dense FFN's hidden width (``intermediate_size``), N experts,
H = F / N each expert's width.

Every FFN is read into one layout, the experts' (``GroupedExperts``): hidden unit j is row j
of each [F, D] matrix (``w_in``, ``w_gate``, and ``w_out``, the down projection transposed)
and entry j of ``b_in`` [F], so that expert e is the contiguous rows e*H .. (e+1)*H - 1.
``b_out`` [D] is the down projection's bias: it belongs to the whole FFN.

A converted block holds the SMoE FFN at ``replaced``; the modules at ``absorbed`` did part of
the dense FFN's work, which the SMoE FFN now does, so they become ``nn.Identity``. Dropout,
residuals and norms stay where they were.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN

from smoe_ds.config.schema import ConfigError

ROLES = ("w_in", "b_in", "w_gate", "w_out", "b_out")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    blocks: str  # path from ``model.base_model`` to the list of transformer blocks
    activation: str  # the config attribute that names the FFN's activation
    replaced: str  # block path of the module the SMoE FFN replaces
    absorbed: tuple[str, ...]  # block paths that become nn.Identity
    params: dict[str, str]  # role -> parameter name in the block
    transposed: frozenset[str]  # roles stored as the transpose of the experts' layout

    def blocks_of(self, model: nn.Module) -> list[nn.Module]:
        return list(model.base_model.get_submodule(self.blocks))

    def activation_of(self, config) -> nn.Module:
        act = getattr(config, self.activation)
        return ACT2FN[act] if isinstance(act, str) else act  # BERT configs may hold the function itself

    def read(self, block: nn.Module) -> dict[str, torch.Tensor]:
        """The block's dense FFN in the experts' layout: role -> [F, D], [F] or [D] tensor."""
        owned = {
            f"{path}.{name}"
            for path in (self.replaced, *self.absorbed)
            for name, _ in block.get_submodule(path).named_parameters()
        }
        unknown = sorted(owned - set(self.params.values()))
        if unknown:  # e.g. LLaMA with mlp_bias=True: dropping those weights would change the model
            raise ConfigError(f"{self.name} FFN has {', '.join(unknown)}, which the conversion does not support")
        return {role: self._layout(role, block.get_parameter(name).detach()) for role, name in self.params.items()}

    def state(self, dense: dict[str, torch.Tensor], block_prefix: str) -> dict[str, torch.Tensor]:
        """The inverse of ``read``: the original parameter names and layouts, under ``block_prefix``."""
        return {block_prefix + self.params[role]: self._layout(role, t).contiguous() for role, t in dense.items()}

    def install(self, block: nn.Module, ffn: nn.Module) -> None:
        _set_submodule(block, self.replaced, ffn)
        for path in self.absorbed:
            _set_submodule(block, path, nn.Identity())

    def _layout(self, role: str, t: torch.Tensor) -> torch.Tensor:
        return t.t() if role in self.transposed else t  # an involution: the same call converts back


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


FAMILIES = (
    # intermediate = Linear(D, F) + act; output = Linear(F, D) -> dropout -> LayerNorm(+ residual).
    # The SMoE FFN takes intermediate's place and returns D-wide outputs; output.dense goes.
    Family(
        name="bert",
        model_types=("bert", "roberta"),
        blocks="encoder.layer",
        activation="hidden_act",
        replaced="intermediate",
        absorbed=("output.dense",),
        params={
            "w_in": "intermediate.dense.weight",
            "b_in": "intermediate.dense.bias",
            "w_out": "output.dense.weight",
            "b_out": "output.dense.bias",
        },
        transposed=frozenset({"w_out"}),
    ),
    # mlp = c_fc -> act -> c_proj -> dropout, with transformers' Conv1D: weight [in, out].
    Family(
        name="gpt2",
        model_types=("gpt2",),
        blocks="h",
        activation="activation_function",
        replaced="mlp.c_fc",
        absorbed=("mlp.act", "mlp.c_proj"),
        params={
            "w_in": "mlp.c_fc.weight",
            "b_in": "mlp.c_fc.bias",
            "w_out": "mlp.c_proj.weight",
            "b_out": "mlp.c_proj.bias",
        },
        transposed=frozenset({"w_in"}),
    ),
    # mlp = down_proj(act(gate_proj(x)) * up_proj(x)), no biases (mlp_bias=True is refused by read).
    Family(
        name="llama",
        model_types=("llama", "mistral"),
        blocks="layers",
        activation="hidden_act",
        replaced="mlp",
        absorbed=(),
        params={"w_in": "mlp.up_proj.weight", "w_gate": "mlp.gate_proj.weight", "w_out": "mlp.down_proj.weight"},
        transposed=frozenset({"w_out"}),
    ),
)

SUPPORTED_MODEL_TYPES = tuple(sorted(t for f in FAMILIES for t in f.model_types))
# The model_type of a converted model's saved config (hf.auto registers it with the Auto classes;
# hf.surgery refuses to convert a model that has it already).
MODEL_TYPE = "smoe_dropout_hf"


def family_for(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ConfigError(
        f"model type {model_type!r} is not supported for SMoE-Dropout conversion; "
        f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )
