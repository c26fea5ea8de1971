"""The SMoE-Dropout layer on a GPU against the naive per-expert loop, in fp32 and bf16.

On CUDA the compiled CPU ops never apply: the sparse path is the grouped GEMMs
(``torch._grouped_mm`` where the GPU's kernels take the dtype) and the dense-masked path the
fused gated GELU's Python form. Each path is forced in turn, at every k, and its outputs and
gradients compared with the loop computed in fp32 on the same device (REL_TOL in common.py).
"""

import pytest
import torch

from smoe_ds.config.schema import MoEConfig
from smoe_ds.moe.experts import FeedForward, grouped_matmul, grouped_mm_applies
from smoe_ds.moe.layer import SMoEDropoutMoE, set_active_experts
from smoe_ds.moe.router import topk_routes
from tests.gpu.common import DEVICE, MARKS, ON_CUDA, REL_TOL, rel_error
from tests.helpers.reference import naive_moe

pytestmark = MARKS


def make_layer(n: int, d: int, h: int, dtype: torch.dtype, device: torch.device = DEVICE) -> SMoEDropoutMoE:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=n, d_expert=h)
    cfg.k_schedule.k_max = n
    layer = SMoEDropoutMoE(d, cfg, layer_index=3)
    with torch.no_grad():
        for p in layer.deepspeed_moe.experts.parameters():
            p.normal_(0, 0.3 / d**0.5 * 8)
    return layer.to(device=device, dtype=dtype)


def layer_against_naive(layer: SMoEDropoutMoE, k: int, path: str, tokens: int) -> dict[str, float]:
    """Relative errors of the layer's output and gradients (x, w_in, w_out) against the loop."""
    experts = layer.deepspeed_moe.experts
    d, dtype = experts.d_model, experts.w_in.dtype
    experts.forward = getattr(experts, f"forward_{path}")
    set_active_experts(layer, k)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(1, tokens, d, generator=gen).to(DEVICE, dtype).requires_grad_(True)
    cot = torch.randn(1, tokens, d, generator=gen).to(DEVICE, dtype)
    y, _, counts = layer(x)
    (y * cot).sum().backward()
    assert int(counts.sum()) == tokens * k

    # The reference: the same weights in fp32, the loop differentiated by autograd.
    w_in = [w.detach().float().clone().requires_grad_(True) for w in experts.w_in]
    w_out = [w.detach().float().t().clone().requires_grad_(True) for w in experts.w_out]
    xr = x.detach().float().reshape(tokens, d).clone().requires_grad_(True)
    ref = naive_moe(xr, layer.deepspeed_moe.gate.wg.weight.float(), w_in, w_out, k)
    (ref * cot.float().reshape(tokens, d)).sum().backward()
    return {
        "out": rel_error(y.reshape(tokens, d), ref),
        "grad_x": rel_error(x.grad.reshape(tokens, d), xr.grad),
        "grad_w_in": rel_error(experts.w_in.grad, torch.stack([w.grad for w in w_in])),
        "grad_w_out": rel_error(experts.w_out.grad, torch.stack([w.grad.t() for w in w_out])),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_layer_matches_the_naive_loop_for_each_path_and_dtype(k, path, dtype):
    errors = layer_against_naive(make_layer(8, 64, 32, dtype), k, path, tokens=96)
    assert all(e <= REL_TOL[dtype] for e in errors.values()), errors


# Wide experts (H > D): on a GPU the dense-masked path runs them as one concatenated GEMM pair
# too (on the CPU it loops over the experts), so that branch is checked here at k < N and k = N.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k", [3, 8])
def test_wide_experts_on_the_dense_path_match_the_naive_loop(k, dtype):
    errors = layer_against_naive(make_layer(8, 32, 64, dtype), k, "dense", tokens=96)
    assert all(e <= REL_TOL[dtype] for e in errors.values()), errors


# Widths and token counts that are not multiples of 8 or 16, and experts that get no tokens:
# torch._grouped_mm wants 16-byte aligned rows on CUDA; grouped_matmul must either satisfy it or
# fall back to per-expert GEMMs, never return a wrong result.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d, h, counts", [(24, 40, [5, 0, 17, 3]), (60, 36, [1, 33, 0, 0]), (64, 32, [16, 0, 0, 48])])
def test_grouped_matmul_with_unaligned_shapes_equals_a_loop_over_experts(d, h, counts, dtype):
    gen = torch.Generator().manual_seed(d + h)
    x_RD = torch.randn(sum(counts), d, generator=gen).to(DEVICE, dtype)
    w_EDH = torch.randn(len(counts), d, h, generator=gen).to(DEVICE, dtype)
    offs = torch.tensor(counts, device=DEVICE).cumsum(0).to(torch.int32)
    got = grouped_matmul(x_RD, w_EDH, offs, grouped_mm_applies(x_RD, [w_EDH]))
    expected = torch.cat([xe.float() @ w_EDH[e].float() for e, xe in enumerate(x_RD.split(counts))])
    assert got.shape == (sum(counts), h) and got.dtype == dtype
    assert rel_error(got, expected) <= REL_TOL[dtype] / 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_with_unaligned_widths_matches_the_naive_loop(dtype):
    errors = layer_against_naive(make_layer(4, 60, 36, dtype), 2, "sparse", tokens=37)
    assert all(e <= REL_TOL[dtype] for e in errors.values()), errors


def test_the_frozen_router_is_the_same_on_the_gpu_as_on_the_cpu():
    """The weight is drawn on the CPU, so it arrives bit-identical; routing the same fp32 tokens
    on both devices picks the same experts with the same weights."""
    on_cpu = make_layer(16, 256, 64, torch.float32, torch.device("cpu")).deepspeed_moe.gate.wg.weight
    on_device = make_layer(16, 256, 64, torch.float32).deepspeed_moe.gate.wg.weight
    assert on_device.device.type == DEVICE.type and torch.equal(on_device.cpu(), on_cpu)
    x = torch.randn(4096, 256, generator=torch.Generator().manual_seed(0))
    for k in (1, 4, 16):
        ids_cpu, w_cpu = topk_routes(x @ on_cpu.t(), k)
        ids_dev, w_dev = topk_routes(x.to(DEVICE) @ on_device.t(), k)
        # Logits agree to rounding; a token whose k-th and (k+1)-th logits tie to rounding may
        # swap them, which is no error: allow one in a thousand.
        same = (ids_dev.cpu() == ids_cpu).all(dim=-1)
        assert float(same.float().mean()) >= 0.999, k
        assert (w_dev.cpu()[same] - w_cpu[same]).abs().max() <= 1e-5


@pytest.mark.skipif(not ON_CUDA, reason="peak CUDA memory")
def test_peak_memory_of_a_training_step_at_k_n_is_within_1_2x_of_the_dense_ffn():
    """bf16, d_model 1024, 16 experts x 256 against a dense FFN of width 4096, 16k tokens:
    forward, backward and an AdamW step (the second one: its moments exist by then)."""
    d, n, h, tokens = 1024, 16, 256, 16384

    def peak_bytes(module: torch.nn.Module) -> int:
        module = module.to(DEVICE, torch.bfloat16)
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        x = torch.randn(1, tokens, d, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        for step in range(2):
            if step == 1:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            out = module(x)
            out = out[0] if isinstance(out, tuple) else out
            out.float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del module, opt, x, out
        torch.cuda.empty_cache()
        return peak

    ours_layer = make_layer(n, d, h, torch.bfloat16)
    set_active_experts(ours_layer, n)
    ours = peak_bytes(ours_layer)
    torch.manual_seed(0)
    dense = peak_bytes(FeedForward(d, n * h))
    print(f"peak CUDA memory of a training step: ours {ours / 2**20:.0f} MiB, dense {dense / 2**20:.0f} MiB")
    assert ours <= 1.2 * dense, (ours / 2**20, dense / 2**20)
