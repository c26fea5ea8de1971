"""The fused gated GELU of the dense-masked path against autograd's own, in float64."""

import pytest
import torch
import torch.nn.functional as F

from smoe_ds.moe import gated_gelu as mod


@pytest.mark.parametrize("chunk_bytes", [64, 1 << 20])  # many row chunks, and one
@pytest.mark.parametrize("zero_gate", [False, True])  # GELU read back from the output, or recomputed
def test_gated_gelu_matches_autograd_and_passes_gradcheck(chunk_bytes, zero_gate, monkeypatch):
    monkeypatch.setattr(mod, "CPU_CHUNK_BYTES", chunk_bytes)
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(7, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    gates = torch.rand(7, 3, 1, dtype=torch.float64, generator=gen) + 0.1
    if zero_gate:
        gates[2, 1] = 0.0  # a route the dense-masked path runs but does not use
    assert mod._can_read_back(gates) is not zero_gate
    gates.requires_grad_(True)
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


def test_gelu_is_read_back_only_where_dividing_by_the_gates_is_exact():
    gates = torch.tensor([0.5, 1e-3, 2.0])
    assert mod._can_read_back(gates)
    assert mod._can_read_back(gates.double())
    assert mod._can_read_back(gates.bfloat16())
    assert not mod._can_read_back(gates.half())  # fp16's subnormals are 6e-8 apart
    assert not mod._can_read_back(torch.tensor([0.5, 0.0]))
    assert not mod._can_read_back(torch.tensor([0.5, 1e-16]))  # 1.4e-45 / 1e-16 > 1e-30


def test_float32_read_back_matches_the_recomputed_gelu():
    gen = torch.Generator().manual_seed(1)
    pre = torch.randn(64, 16, 8, generator=gen, requires_grad=True)
    gates = torch.softmax(torch.randn(64, 16, 1, generator=gen) * 4, dim=1).requires_grad_(True)
    cot = torch.randn(64, 16, 8, generator=gen)
    assert mod._can_read_back(gates)
    grads = torch.autograd.grad((mod.gated_gelu(pre, gates) * cot).sum(), (pre, gates))
    ref_grads = torch.autograd.grad(((F.gelu(pre) * gates) * cot).sum(), (pre, gates))
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
