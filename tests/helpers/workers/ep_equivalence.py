"""2-rank expert parallelism against one process holding all experts, and a naive loop.

    torchrun --nproc_per_node 2 -m tests.helpers.workers.ep_equivalence OUT.json

Layer: each rank feeds a different number of tokens through an ep_size-2 SMoE-Dropout layer
and compares outputs and gradients (input and expert weights) with the naive per-expert loop
run over every rank's tokens with every expert's weights.

Model: the whole LM at ep_size 2 (each rank half the batch) against the same LM at ep_size 1
(every rank the full batch): loss and every parameter's gradient.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from smoe_ds.config.schema import MoEConfig
from smoe_ds.distributed import process_group as D
from smoe_ds.models.lm import build_model
from smoe_ds.moe.dispatch import DispatchPlan, same_tokens_on_every_rank
from smoe_ds.moe.layer import SMoEDropoutMoE, moe_layers, set_active_experts
from tests.helpers.reference import naive_moe
from tests.helpers.workers.common import all_gather_cat, finish, start, tiny_config, worker_args

D_MODEL, N, D_EXPERT = 16, 4, 8


def layer_check(rank: int, path: str | None, full_route: str | None = None, exchange: str = "tokens") -> dict:
    """Max abs differences per k for output, input grad and expert-weight grads.

    ``path`` forces the experts' compute path ("sparse" or "dense"); None lets the rule choose.
    A "_python" suffix keeps to the Python paths that GPUs use instead of the compiled CPU ops.
    ``full_route`` (a ``moe.full_route_dispatch``) checks the full-route paths instead: both
    ranks hold the same number of tokens, inside ``same_tokens_on_every_rank()``, at every k > N/2.
    ``exchange`` (a ``moe.ep_exchange``): "weights" gathers the experts instead of moving tokens.
    """
    cfg = MoEConfig(
        num_experts=N,
        d_expert=D_EXPERT,
        ep_size=2,
        full_route_dispatch=full_route or "all_to_all",
        ep_exchange=exchange,
    )
    cfg.k_schedule.k_max = N
    layer = SMoEDropoutMoE(D_MODEL, cfg, layer_index=0)
    layer.set_deepspeed_parallelism()
    experts = layer.deepspeed_moe.experts
    if path is not None and path.endswith("_python"):
        experts._compiled_op_applies = lambda x: False
        path = path.removesuffix("_python")
    if path is not None and exchange == "weights":  # forward() gathers the experts: keep it, force its choice
        threshold = 0.0 if path == "dense" else 2.0  # a share of non-zero gates: always / never dense
        experts.dense_path_min_density = lambda device: threshold
    elif path is not None:
        experts.forward = getattr(experts, f"forward_{path}")
    with torch.no_grad():  # expert g gets weights from seed g, on whichever rank holds it
        for i in range(N // 2):
            g = torch.Generator().manual_seed(100 + rank * (N // 2) + i)
            experts.w_in[i].copy_(torch.randn(experts.w_in[i].shape, generator=g) * 0.3)
            experts.w_out[i].copy_(torch.randn(experts.w_out[i].shape, generator=g) * 0.3)
    w_in_all, w_out_all = all_gather_cat(experts.w_in.detach()), all_gather_cat(experts.w_out.detach())
    gen = torch.Generator().manual_seed(7 + rank)
    token_counts = (41, 41) if full_route else (37, 53)  # else ranks hold different token counts
    n_tokens = token_counts[rank]
    x = torch.randn(n_tokens, D_MODEL, generator=gen)
    cot = torch.randn(n_tokens, D_MODEL, generator=gen)
    x_all, cot_all = all_gather_cat(x), all_gather_cat(cot)
    offset = sum(token_counts[:rank])
    router = layer.deepspeed_moe.gate.wg.weight.detach()
    rows = {}
    promise = same_tokens_on_every_rank if full_route else contextlib.nullcontext
    for k in range(N // 2 + 1 if full_route else 1, N + 1):
        layer.zero_grad()
        set_active_experts(layer, k)
        xr = x.clone().requires_grad_(True)
        with promise():
            out, _, _ = layer(xr.unsqueeze(0))
        (out.squeeze(0) * cot).sum().backward()

        ref_x = x_all.clone().requires_grad_(True)
        w_in = [w.clone().requires_grad_(True) for w in w_in_all]  # [H, D], nn.Linear layout
        w_out = [w.t().clone().requires_grad_(True) for w in w_out_all]  # [D, H]
        ref = naive_moe(ref_x, router, w_in, w_out, k)
        (ref * cot_all).sum().backward()

        mine = slice(rank * (N // 2), (rank + 1) * (N // 2))
        ref_g_in = torch.stack([w.grad for w in w_in])[mine]
        ref_g_out = torch.stack([w.grad.t() for w in w_out])[mine]
        my_rows = slice(offset, offset + n_tokens)
        diffs = torch.tensor(
            [
                (out.squeeze(0) - ref[my_rows]).abs().max(),
                (xr.grad - ref_x.grad[my_rows]).abs().max(),
                (experts.w_in.grad - ref_g_in).abs().max(),
                (experts.w_out.grad - ref_g_out).abs().max(),
            ]
        )
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        plan = layer.deepspeed_moe.last_plan
        if plan is None:  # the weights exchange: no token left the rank
            assert exchange == "weights"
            plan = DispatchPlan(None, [], [], n_tokens, None, 0)
        rows[k] = {
            "out": float(diffs[0]),
            "grad_x": float(diffs[1]),
            "grad_w_in": float(diffs[2]),
            "grad_w_out": float(diffs[3]),
            "out_norm": float(out.norm()),
            "rows_sent": plan.send_counts,
            "tokens": n_tokens,
            "counted": plan.token_M is not None,
            "gathered": plan.gathered,
        }
    return rows


def capacity_check(rank: int) -> dict:
    """With a finite capacity: no hang on uneven token counts, drops are reported, and
    cf = N / k (capacity = every token) reproduces the dropless output exactly."""
    cfg = MoEConfig(num_experts=N, d_expert=D_EXPERT, ep_size=2, ep_exchange="tokens")
    cfg.k_schedule.k_max = 2
    torch.manual_seed(0)
    layer = SMoEDropoutMoE(D_MODEL, cfg, layer_index=0)
    layer.set_deepspeed_parallelism()
    x = torch.randn(31 if rank == 0 else 64, D_MODEL, generator=torch.Generator().manual_seed(rank))
    gate = layer.deepspeed_moe.gate
    dropless = layer(x.unsqueeze(0))[0]
    gate.capacity_factor = N / 2  # C = ceil(N/2 * 2 * S / N) = S: nothing can be dropped
    full_capacity = layer(x.unsqueeze(0))[0]
    gate.capacity_factor = 0.5
    tight = layer(x.unsqueeze(0))[0]
    dropped = torch.tensor([float(gate.last_dropped_routes), float(gate.last_total_routes)])
    dist.all_reduce(dropped)
    return {
        "full_capacity_equals_dropless": bool(torch.equal(dropless, full_capacity)),
        "tight_dropped_fraction": float(dropped[0] / dropped[1]),
        "tight_finite": bool(tight.isfinite().all()),
    }


def model_check(rank: int, exchange: str) -> dict:
    """LM at ep_size 2 (half batch per rank, moving ``exchange``) vs ep_size 1 (full batch): loss and
    all gradients."""
    cfg2 = tiny_config(ep_size=2, ep_exchange=exchange)
    cfg1 = tiny_config(ep_size=1)
    m2 = build_model(cfg2.model, cfg2.moe, ep_rank=rank)
    m1 = build_model(cfg1.model, cfg1.moe, ep_rank=0)
    for m in (m2, m1):
        for layer in moe_layers(m):
            layer.set_deepspeed_parallelism()
    batch = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(3))
    x, y = batch[:, :-1], batch[:, 1:]
    out = {}
    for k in (1, 2, 4):
        for m in (m1, m2):
            m.zero_grad()
            set_active_experts(m, k)
        half = slice(2 * rank, 2 * rank + 2)
        loss2 = m2(x[half], y[half]).loss
        (loss2 / 2).backward()  # the full-batch mean is the average of the two halves
        loss1 = m1(x, y).loss
        loss1.backward()
        total2 = D.all_reduce_sum(loss2.detach() / 2)
        n_local = cfg2.moe.num_experts // 2
        full_grads = {n: p.grad for n, p in m1.named_parameters() if p.grad is not None}
        worst = 0.0
        for name, p in m2.named_parameters():
            if p.grad is None:
                continue
            if getattr(p, "allreduce", True):  # non-expert: what the engine's data-parallel reduction does
                grad, ref = D.all_reduce_sum(p.grad), full_grads[name]
            else:  # this rank's slice of the stacked experts
                grad, ref = p.grad, full_grads[name][rank * n_local : (rank + 1) * n_local]
            worst = max(worst, float((grad - ref).abs().max()))
        diffs = torch.tensor([float((total2 - loss1).abs()), worst])
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        out[k] = {"loss": float(diffs[0]), "grad": float(diffs[1]), "loss_value": float(loss1)}
    return out


def main(out_path: str) -> None:
    rank, world = start()
    assert world == 2, "run with 2 ranks"
    finish(
        out_path,
        {
            "layer": {str(p): layer_check(rank, p) for p in (None, "sparse", "dense", "sparse_python", "dense_python")},
            "full_route": {c: layer_check(rank, None, c) for c in ("all_to_all", "gather_scatter")},
            "weights": {
                str(p): layer_check(rank, p, exchange="weights") for p in (None, "sparse_python", "dense_python")
            },
            "capacity": capacity_check(rank),
            "model": {e: model_check(rank, e) for e in ("tokens", "weights")},
        },
    )


if __name__ == "__main__":
    main(*worker_args())
