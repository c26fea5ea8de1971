"""The expert-parallel weights exchange under ``torch.compile(fullgraph=True)`` on 2 ranks.

    torchrun --nproc_per_node 2 -m tests.helpers.workers.compiled_weights_exchange OUT.json

An ep_size-2 SMoE-Dropout layer in bf16 (the dtype the grouped GEMM's shape function takes), on
the Python paths GPUs use, at a fixed k for each path (k = 2 of 8: sparse; k = 8: dense-masked),
with uneven token counts per rank (37 and 53). For each: dynamo's graphs and graph breaks of the
forward, and the compiled forward + backward (the all-gather of the experts and the
reduce-scatter of their gradients inside the graph) against the same layer run eagerly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from smoe_ds.config.schema import MoEConfig
from smoe_ds.moe.layer import SMoEDropoutMoE, set_active_experts
from tests.helpers.workers.common import finish, start, worker_args

D_MODEL, N, D_EXPERT = 32, 8, 16  # bf16 rows of 64 and 32 bytes: the grouped GEMM's alignment


def fwd_bwd(fn, layer, x: torch.Tensor, cot: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Output, input gradient and this rank's expert-weight gradients of one forward + backward."""
    layer.zero_grad()
    xr = x.clone().requires_grad_(True)
    out = fn(xr)
    (out.float() * cot).sum().backward()
    experts = layer.deepspeed_moe.experts
    return out.detach(), xr.grad, experts.w_in.grad, experts.w_out.grad


def compile_check(rank: int, k: int) -> dict:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=N, d_expert=D_EXPERT, ep_size=2, ep_exchange="weights")
    cfg.k_schedule.k_max = N
    layer = SMoEDropoutMoE(D_MODEL, cfg, layer_index=0).to(torch.bfloat16)
    layer.set_deepspeed_parallelism()
    layer.deepspeed_moe.experts._compiled_op_applies = lambda x: False  # the paths GPUs take
    set_active_experts(layer, k)
    gen = torch.Generator().manual_seed(7 + rank)
    tokens = (37, 53)[rank]
    x = torch.randn(1, tokens, D_MODEL, generator=gen).to(torch.bfloat16)
    cot = torch.randn(1, tokens, D_MODEL, generator=gen)

    def forward(x):
        return layer(x)[0]

    explained = torch._dynamo.explain(forward)(x)
    torch._dynamo.reset()
    compiled = fwd_bwd(torch.compile(forward, fullgraph=True, backend="aot_eager"), layer, x, cot)
    eager = fwd_bwd(forward, layer, x, cot)
    errors = torch.tensor([float((c.float() - e.float()).norm() / e.float().norm()) for c, e in zip(compiled, eager)])
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    counts = torch.tensor([explained.graph_count, explained.graph_break_count])
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    return {
        "graphs": int(counts[0]),
        "graph_breaks": int(counts[1]),
        "break_reasons": [str(r.reason)[:300] for r in explained.break_reasons],
        "rel_errors": dict(zip(("out", "grad_x", "grad_w_in", "grad_w_out"), errors.tolist())),
        "grads_nonzero": bool(all(float(g.abs().max()) > 0 for g in compiled[1:])),
    }


def main(out_path: str) -> None:
    rank, world = start()
    assert world == 2, "run with 2 ranks"
    finish(out_path, {str(k): compile_check(rank, k) for k in (2, N)})


if __name__ == "__main__":
    main(*worker_args())
