"""The fused gated GELU of the dense-masked path against autograd's own, in float64."""

import pytest
import torch
import torch.nn.functional as F

from smoe_ds.moe import gated_gelu as mod


@pytest.mark.parametrize("chunk_bytes", [64, 1 << 20])  # many row chunks, and one
def test_gated_gelu_matches_autograd_and_passes_gradcheck(chunk_bytes, monkeypatch):
    monkeypatch.setattr(mod, "CPU_CHUNK_BYTES", chunk_bytes)
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(7, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    gates = torch.rand(7, 3, 1, dtype=torch.float64, generator=gen, requires_grad=True)
    cot = torch.randn(7, 3, 5, dtype=torch.float64, generator=gen)
    out = mod.gated_gelu(pre, gates)
    grads = torch.autograd.grad((out * cot).sum(), (pre, gates))
    ref = F.gelu(pre) * gates
    ref_grads = torch.autograd.grad((ref * cot).sum(), (pre, gates))
    assert torch.allclose(out, ref, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads, ref_grads))
    assert torch.autograd.gradcheck(mod.gated_gelu, (pre, gates))


def test_constant_gates_get_no_gradient():
    pre = torch.randn(4, 2, 3, requires_grad=True)
    gates = torch.full((4, 2, 1), 2.0)  # "rescale" weighting: constants
    mod.gated_gelu(pre, gates).sum().backward()
    assert torch.allclose(pre.grad, torch.autograd.grad((F.gelu(pre) * gates).sum(), pre)[0])
