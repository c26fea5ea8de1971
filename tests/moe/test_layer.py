"""The SMoE-Dropout layer in one process (ep_size 1) against the naive per-expert loop."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from smoe_ds.config.schema import MoEConfig
from smoe_ds.moe.layer import SMoEDropoutMoE, build_ffn, set_active_experts
from smoe_ds.moe.router import capacity_for, slot_positions, topk_routes
from tests.helpers.reference import naive_moe

TOL = 1e-5


def make_layer(n=8, d=24, h=16, **kw):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=n, d_expert=h, **kw)
    cfg.k_schedule.k_max = n
    layer = SMoEDropoutMoE(d, cfg, layer_index=3)
    with torch.no_grad():
        for p in layer.deepspeed_moe.experts.parameters():
            p.normal_(0, 0.3)
    return layer


def reference_weights(layer):
    """Per-expert Linear-layout copies [H, D] and [D, H] that the naive loop differentiates."""
    experts = layer.deepspeed_moe.experts
    w_in = [w.detach().clone().requires_grad_(True) for w in experts.w_in]
    w_out = [w.detach().t().clone().requires_grad_(True) for w in experts.w_out]
    return w_in, w_out


def check_against_naive(layer, k, path=None):
    """Run the layer (optionally forcing a compute path) and the naive loop; max abs diffs."""
    experts = layer.deepspeed_moe.experts
    set_active_experts(layer, k)
    x = torch.randn(2, 29, 24, requires_grad=True)
    if path is not None:
        experts.forward = getattr(experts, f"forward_{path}")
    y, l_aux, counts = layer(x)
    cot = torch.randn_like(y)
    (y * cot).sum().backward()

    w_in, w_out = reference_weights(layer)
    xr = x.detach().reshape(-1, 24).clone().requires_grad_(True)
    ref = naive_moe(xr, layer.deepspeed_moe.gate.wg.weight, w_in, w_out, k)
    (ref * cot.reshape(-1, 24)).sum().backward()
    assert float(l_aux) == 0.0 and int(counts.sum()) == 58 * k
    return {
        "out": (y.reshape(-1, 24) - ref).abs().max(),
        "grad_x": (x.grad.reshape(-1, 24) - xr.grad).abs().max(),
        "grad_w_in": (experts.w_in.grad - torch.stack([w.grad for w in w_in])).abs().max(),
        "grad_w_out": (experts.w_out.grad - torch.stack([w.grad.t() for w in w_out])).abs().max(),
    }


# compiled: the CPU ops (asserted to be built, below), else the Python paths they stand in for,
# which GPUs and other kinds of experts use.
@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("path", [None, "sparse", "dense"])
@pytest.mark.parametrize("k", range(1, 9))
def test_output_and_grads_match_naive_loop_for_every_k_and_path(k, path, compiled):
    layer = make_layer()
    if not compiled:
        layer.deepspeed_moe.experts._compiled_op_applies = lambda x: False
    diffs = check_against_naive(layer, k, path)
    assert all(v <= TOL for v in diffs.values()), diffs


def test_the_compiled_ops_are_built_and_used_on_the_cpu():
    # Without this the compiled cases above could silently test the fallback twice.
    experts = make_layer().deepspeed_moe.experts
    assert experts._compiled_op_applies(torch.randn(3, 24))
    assert not experts._compiled_op_applies(torch.randn(3, 24, dtype=torch.float64))  # dtype differs from weights


@pytest.mark.parametrize("k", [1, 3, 6, 8])  # 8: the dense-masked op
def test_compiled_ops_on_several_threads_match_naive_loop(k, monkeypatch):
    # The test session runs one thread (conftest); the ops split experts or token blocks over
    # threads. Blocks of the smallest size (16 tokens) give the dense-masked op 4 blocks of 58.
    from smoe_ds.moe import cpu_experts

    monkeypatch.setattr(cpu_experts, "DENSE_BLOCK_BYTES", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        diffs = check_against_naive(make_layer(), k, "sparse")
    finally:
        torch.set_num_threads(threads)
    assert all(v <= TOL for v in diffs.values()), diffs


def test_compiled_ops_take_a_rank_that_received_no_tokens():
    # Under expert parallelism a rank can be sent no tokens at all.
    from smoe_ds.moe.cpu_experts import dense_gelu_experts, sparse_gelu_experts

    w_in = torch.randn(4, 5, 8, requires_grad=True)
    w_out = torch.randn(4, 5, 8, requires_grad=True)
    x = torch.zeros(0, 8, requires_grad=True)
    none = torch.zeros(0, dtype=torch.long)
    outputs = [
        sparse_gelu_experts(x, w_in, w_out, torch.zeros(0), none, torch.zeros(4, dtype=torch.long)),
        dense_gelu_experts(x, w_in, w_out, torch.zeros(0, 4)),
    ]
    for y in outputs:
        assert y.shape == (0, 8)
        grads = torch.autograd.grad(y.sum(), (x, w_in, w_out))
        assert grads[0].shape == (0, 8) and all(g.abs().max() == 0 for g in grads[1:])


def test_compiled_dense_op_in_bfloat16_over_many_blocks_stays_near_float32(monkeypatch):
    # 16-token blocks: each thread's weight gradient is a sum of 16 block products, kept in fp32.
    from smoe_ds.moe import cpu_experts

    monkeypatch.setattr(cpu_experts, "DENSE_BLOCK_BYTES", 1)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(256, 32, generator=gen), torch.randn(4, 8, 32, generator=gen) * 0.2]
    inputs += [torch.randn(4, 8, 32, generator=gen) * 0.2, torch.rand(256, 4, generator=gen)]
    inputs = [t.bfloat16() for t in inputs]  # both runs start from the same bf16 values
    cot = torch.randn(256, 32, generator=gen)
    grads = {}
    for dtype in (torch.bfloat16, torch.float32):
        leaves = [t.to(dtype).requires_grad_(True) for t in inputs]
        y = cpu_experts.dense_gelu_experts(*leaves)
        grads[dtype] = torch.autograd.grad((y.float() * cot).sum(), leaves)
    for got, want in zip(grads[torch.bfloat16], grads[torch.float32]):
        assert float((got.float() - want).norm() / want.norm()) < 1e-2


def test_compiled_ops_refuse_routes_outside_their_tensors():
    # The kernels index raw memory with the routes, so bad ones must fail before they run.
    from smoe_ds.moe.cpu_experts import dense_gelu_experts, sparse_gelu_experts

    x, w = torch.randn(5, 8), torch.randn(2, 3, 8)
    counts = torch.tensor([1, 1])
    with pytest.raises(RuntimeError, match="token_R out of range"):
        sparse_gelu_experts(x, w, w, torch.ones(2), torch.tensor([0, 5]), counts)
    with pytest.raises(RuntimeError, match="offsets must run from 0 to the number of routes"):
        sparse_gelu_experts(x, w, w, torch.ones(2), torch.tensor([0, 1]), torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match=r"expected x \[T, D\]"):
        sparse_gelu_experts(x, torch.randn(2, 3, 7), w, torch.ones(2), torch.tensor([0, 1]), counts)
    with pytest.raises(RuntimeError, match=r"gates must be \[T, E\]"):
        dense_gelu_experts(x, w, w, torch.rand(5, 3))


def test_compiled_sparse_op_handles_experts_without_routes():
    from smoe_ds.moe.cpu_experts import sparse_gelu_experts

    gen = torch.Generator().manual_seed(0)
    T, D, E, H = 6, 8, 4, 5
    x = torch.randn(T, D, generator=gen, requires_grad=True)
    w_in = torch.randn(E, H, D, generator=gen, requires_grad=True)
    w_out = torch.randn(E, H, D, generator=gen, requires_grad=True)
    expert_R = torch.tensor([1, 1, 1, 3, 3])  # experts 0 and 2 get nothing
    token_R = torch.tensor([0, 2, 5, 1, 2])
    gate_R = torch.rand(5, generator=gen, requires_grad=True)
    y = sparse_gelu_experts(x, w_in, w_out, gate_R, token_R, torch.bincount(expert_R, minlength=E))
    ref = torch.zeros(T, D).index_add(
        0,
        token_R,
        gate_R[:, None] * torch.stack([F.gelu(x[t] @ w_in[e].t()) @ w_out[e] for e, t in zip(expert_R, token_R)]),
    )
    cot = torch.randn(T, D, generator=gen)
    grads = torch.autograd.grad((y * cot).sum(), (x, w_in, w_out, gate_R))
    ref_grads = torch.autograd.grad((ref * cot).sum(), (x, w_in, w_out, gate_R))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert grads[1][[0, 2]].abs().max() == 0 and grads[2][[0, 2]].abs().max() == 0


@pytest.mark.parametrize("k", [3, 8])  # the sparse op, the dense-masked op
def test_compiled_ops_in_bfloat16_agree_with_the_python_paths(k):
    layer = make_layer().to(torch.bfloat16)
    experts = layer.deepspeed_moe.experts
    set_active_experts(layer, k)
    x = torch.randn(58, 24, dtype=torch.bfloat16)
    routes = layer.deepspeed_moe.gate.route(x)
    results = []
    for compiled in (True, False):
        experts._compiled_op_applies = lambda x, _c=compiled: _c
        xi = x.clone().requires_grad_(True)
        y = experts(xi, routes)
        y.float().square().sum().backward()
        results.append((y.float(), xi.grad.float(), experts.w_in.grad.float()))
        experts.zero_grad()
    # Both round every GEMM to bf16 (8 bits of mantissa); they differ only in summation order.
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


def test_a_failed_op_build_warns_once_and_falls_back_to_the_python_paths(tmp_path, monkeypatch):
    from smoe_ds.moe import cpu_experts

    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(cpu_experts, "SOURCE", broken)
    monkeypatch.setattr(cpu_experts, "OP_NAME", "smoe_ds_broken_op_test")
    cpu_experts.load_op.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not build the CPU experts ops"):
            assert not make_layer().deepspeed_moe.experts._compiled_op_applies(torch.randn(3, 24))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning: the failure is cached
            for k, path in ((3, "sparse"), (8, "dense")):
                diffs = check_against_naive(make_layer(), k, path)
                assert all(v <= TOL for v in diffs.values()), diffs
    finally:
        cpu_experts.load_op.cache_clear()


@pytest.mark.parametrize("h", [16, 32])  # narrow experts (H <= D = 24), wide ones
def test_path_choice_follows_the_documented_density_rule(h, monkeypatch):
    from smoe_ds.moe import experts as experts_mod

    layer = make_layer(h=h)
    chosen = []
    ex = layer.deepspeed_moe.experts
    for name in ("sparse", "dense"):
        real = getattr(ex, f"forward_{name}")
        monkeypatch.setattr(ex, f"forward_{name}", lambda *a, _n=name, _f=real, **kw: chosen.append(_n) or _f(*a, **kw))
    ks = range(1, 9)
    for k in ks:
        set_active_experts(layer, k)
        layer(torch.randn(1, 16, 24))
    rule = experts_mod.DENSE_PATH_MIN_DENSITY_NARROW if h <= 24 else experts_mod.DENSE_PATH_MIN_DENSITY_WIDE
    assert ex.dense_path_min_density(torch.device("cpu")) == rule
    assert ex.dense_path_min_density(torch.device("cuda")) == experts_mod.DENSE_PATH_MIN_DENSITY_GPU
    assert chosen == ["sparse" if k / 8 < rule else "dense" for k in ks]
    assert chosen[-2:] == (["dense", "dense"] if h <= 24 else ["sparse", "dense"])  # 7 of 8: 0.875


def test_router_weights_sum_to_one_over_the_k_selected():
    logits = torch.randn(50, 8)
    ids, w = topk_routes(logits, 3)
    assert torch.allclose(w.sum(-1), torch.ones(50))
    assert torch.equal(ids, logits.topk(3).indices)
    assert torch.allclose(w, torch.softmax(logits.gather(1, ids), -1))


def test_slot_positions_fill_first_choices_before_second_choices():
    ids = torch.tensor([[0, 1], [1, 0], [0, 2]])  # 3 tokens, k = 2
    pos, counts = slot_positions(ids, 3)
    # expert 0: token 0 (1st choice), token 2 (1st), then token 1 (2nd); expert 1: token 1 (1st), token 0 (2nd)
    assert pos.tolist() == [[0, 0, 1], [1, 2, 0]]  # row j: every token's j-th choice
    assert counts.tolist() == [3, 2, 1]


def test_capacity_scales_with_k():
    assert capacity_for(num_tokens=100, k=1, num_experts=16, capacity_factor=1.0) == math.ceil(100 / 16)
    assert capacity_for(num_tokens=100, k=8, num_experts=16, capacity_factor=1.25) == math.ceil(1.25 * 8 * 100 / 16)


def test_tight_capacity_drops_low_choices_and_reports_it():
    layer = make_layer(capacity_factor=0.5)
    set_active_experts(layer, 4)
    x = torch.randn(1, 64, 24)
    y, _, _ = layer(x)
    gate = layer.deepspeed_moe.gate
    assert 0 < int(gate.last_dropped_routes) < gate.last_total_routes == 64 * 4
    assert y.isfinite().all()


def test_k_outside_range_is_refused():
    layer = make_layer()
    for bad in (0, 9):
        with pytest.raises(ValueError, match=r"k must be in \[1, 8\]"):
            set_active_experts(layer, bad)


def test_checkpoint_state_uses_per_expert_keys_and_loads_back():
    layer = make_layer(n=4)
    state = layer.state_dict()
    names = sorted(k for k in state if "deepspeed_experts" in k)
    assert names == sorted(
        f"deepspeed_moe.experts.deepspeed_experts.{e}.w_{io}.weight" for e in range(4) for io in ("in", "out")
    )
    assert state["deepspeed_moe.experts.deepspeed_experts.2.w_out.weight"].shape == (24, 16)  # nn.Linear(H, D) layout
    assert "deepspeed_moe.gate.wg.weight" in state and "deepspeed_moe.experts.w_in" not in state
    other = make_layer(n=4)
    with torch.no_grad():
        for p in other.deepspeed_moe.experts.parameters():
            p.zero_()
    other.load_state_dict(state)
    assert torch.equal(other.deepspeed_moe.experts.w_out, layer.deepspeed_moe.experts.w_out)


def test_dense_baseline_has_the_experts_parameter_count():
    cfg = MoEConfig(num_experts=8, d_expert=16)
    dense = build_ffn(24, MoEConfig(**{**cfg.__dict__, "mode": "dense"}), 0)
    moe = build_ffn(24, cfg, 0)
    trainable = sum(p.numel() for p in moe.parameters() if p.requires_grad)
    assert sum(p.numel() for p in dense.parameters()) == trainable == 2 * 24 * 8 * 16


def test_learned_mode_is_deepspeeds_stock_gate_with_balance_loss():
    from deepspeed.moe.sharded_moe import TopKGate

    cfg = MoEConfig(mode="learned", num_experts=4, d_expert=8, k=2)
    layer = build_ffn(16, cfg, 0)
    gate = layer.deepspeed_moe.gate
    assert isinstance(gate, TopKGate) and gate.wg.weight.requires_grad and gate.k == 2
    _, l_aux, _ = layer(torch.randn(1, 32, 16))
    assert float(l_aux.detach()) > 0


@pytest.mark.parametrize("k", [1, 3, 8])
def test_thor_routes_each_token_to_k_random_experts_weighted_equally_redrawn_every_forward(k):
    layer = make_layer(mode="thor")
    set_active_experts(layer, k)
    gate = layer.deepspeed_moe.gate
    x_SD = torch.randn(64, 24)
    first, second = gate(x_SD), gate(x_SD)
    for gates in (first, second):
        assert torch.equal((gates > 0).sum(1), torch.full((64,), k))  # k distinct experts per token
        assert torch.allclose(gates[gates > 0], torch.tensor(1.0 / k))  # THOR's mean over the chosen
    if k < 8:  # fresh routes on every forward, whatever the input
        assert not torch.equal(first > 0, second > 0)
    # Outputs are the mean of the chosen experts: at k = N, the mean of all (the naive loop's k = N
    # softmax weights replaced by 1/N).
    if k == 8:
        experts = layer.deepspeed_moe.experts
        every = torch.stack([torch.nn.functional.gelu(x_SD @ w.t()) @ v for w, v in zip(experts.w_in, experts.w_out)])
        y, _, _ = layer(x_SD.view(1, 64, 24))
        assert (y.view(64, 24) - every.mean(0)).abs().max() <= 1e-5


def test_thor_consistency_loss_is_zero_for_equal_passes_and_symmetric():
    from smoe_ds.moe.thor import symmetric_kl

    a, b = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert float(symmetric_kl(a, a)) == pytest.approx(0.0, abs=1e-7)
    assert float(symmetric_kl(a, b)) == pytest.approx(float(symmetric_kl(b, a)), rel=1e-6)
    assert float(symmetric_kl(a, b)) > 0


@pytest.mark.parametrize("h", [6, 10])
def test_expert_widths_grouped_gemms_cannot_take_fall_back_and_match_the_naive_loop(h):
    """torch._grouped_mm wants rows of a multiple of 16 bytes: at H = 6 or 10 (fp32) the grouped
    path must use per-expert GEMMs for both GEMMs, forward and backward, not fail in backward."""
    layer = make_layer(h=h)
    layer.deepspeed_moe.experts._compiled_op_applies = lambda x: False
    diffs = check_against_naive(layer, 3, "sparse")
    assert all(v <= TOL for v in diffs.values()), diffs


@pytest.mark.parametrize("name", ["w_in", "w_out"])
def test_an_expert_weight_at_an_unaligned_address_still_matches_the_naive_loop(name):
    """Inside a flat buffer (ZeRO-3 gathers weights into one) one stacked weight can start off a
    16-byte boundary while the other does not: that GEMM falls back to per-expert products and the
    other may run grouped; outputs and gradients must still be the loop's."""
    layer = make_layer(h=16)
    experts = layer.deepspeed_moe.experts
    experts._compiled_op_applies = lambda x: False
    weight = getattr(experts, name)
    flat = torch.empty(weight.numel() + 1)
    with torch.no_grad():
        unaligned = flat[1:].view_as(weight).copy_(weight)
    weight.data = unaligned  # data_ptr 4 bytes past the buffer's start
    other = experts.w_out if name == "w_in" else experts.w_in
    assert weight.data_ptr() % 16 != 0 and other.data_ptr() % 16 == 0
    diffs = check_against_naive(layer, 3, "sparse")
    assert all(v <= TOL for v in diffs.values()), diffs


def test_set_ep_exchange_reaches_every_smoe_layer_and_refuses_unknown_values():
    from smoe_ds.config.schema import ModelConfig
    from smoe_ds.models.lm import build_model
    from smoe_ds.moe.layer import moe_layers, set_ep_exchange

    model = build_model(
        ModelConfig(d_model=16, n_layers=3, n_heads=2, block_size=8), MoEConfig(num_experts=4, d_expert=8)
    )
    dispatchers = [layer.deepspeed_moe for layer in moe_layers(model)]
    assert len(dispatchers) == 3 and {d.ep_exchange for d in dispatchers} == {MoEConfig.ep_exchange}
    set_ep_exchange(model, "tokens")
    assert {d.ep_exchange for d in dispatchers} == {"tokens"}
    with pytest.raises(ValueError, match="ep_exchange must be one of tokens, weights, got 'both'"):
        set_ep_exchange(model, "both")
