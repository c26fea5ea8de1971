"""The layer on a GPU never waits on the host at a fixed k, and gives the same bits every run.

- a training step (forward, backward, optimizer step) passes under
  ``torch.cuda.set_sync_debug_mode("error")``, which raises on any call that synchronises the
  device with the host (a read-back such as ``tolist``, ``item`` or ``nonzero``);
- the forward, captured in a CUDA graph, replays to the eager output (a capture fails on any sync);
- two runs give bit-identical outputs and gradients in torch's default (non-deterministic) mode:
  no atomics decide a sum's order.

Each on both compute paths, bf16 (the training dtype), with token counts that leave the experts'
groups uneven. CUDA only: the CPU has no streams to stall (``tests/moe/test_sync_free.py`` proves
the same properties there by compiling the layer whole).
"""

import pytest
import torch

from smoe_ds.moe.layer import set_active_experts
from tests.gpu.common import DEVICE, MARKS, ON_CUDA
from tests.gpu.test_layer_cuda import make_layer

pytestmark = [*MARKS, pytest.mark.skipif(not ON_CUDA, reason="CUDA streams, graphs and sync checks")]

N, D, H, TOKENS = 16, 256, 128, 1000
PATHS = pytest.mark.parametrize("k", [2, N], ids=["sparse", "dense"])  # k/N 0.125 and 1 (threshold 0.5)


def layer_at(k: int):
    layer = make_layer(N, D, H, torch.bfloat16)
    set_active_experts(layer, k)
    return layer


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, TOKENS, D, generator=torch.Generator().manual_seed(seed)).to(DEVICE, torch.bfloat16)


@PATHS
def test_a_training_step_makes_no_host_sync(k):
    layer = layer_at(k)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=1e-3)
    x = inputs().requires_grad_(True)

    def step():
        y, _, _ = layer(x)
        y.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the first call compiles the fused GELU x gate and sets cuBLAS up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@PATHS
def test_the_forward_replays_from_a_cuda_graph_to_the_eager_output(k):
    layer = layer_at(k)
    static_x = inputs(1)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the capture stream, as CUDA graphs require
            for _ in range(2):
                layer(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)[0]
        fresh = inputs(2)
        static_x.copy_(fresh)
        graph.replay()
        eager_y = layer(fresh)[0]
    torch.cuda.synchronize()
    assert torch.equal(static_y, eager_y)


@PATHS
def test_two_runs_give_the_same_bits(k):
    layer = layer_at(k)
    x = inputs(3)
    cot = torch.randn_like(x)
    runs = []
    for _ in range(2):
        layer.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_(True)
        y, _, _ = layer(xr)
        (y * cot).sum().backward()
        experts = layer.deepspeed_moe.experts
        runs.append((y, xr.grad, experts.w_in.grad, experts.w_out.grad))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
