"""The layer's Python paths, the ones GPUs take, checked on the CPU: at a fixed k nothing reads the
device back (``torch.compile(fullgraph=True)`` traces forward and backward whole, which it cannot do
across a ``tolist``, ``item`` or ``nonzero``), two runs give the same bits, and the pieces they run
on (the padded route layout, the gathers, the exchange's slots) hold their invariants.

Compiled with the ``aot_eager`` backend: dynamo and AOTAutograd trace everything the GPU's compiler
would (graph breaks show there), without generating C++ for the CPU, which would cost minutes here.
"""

import json

import pytest
import torch

from smoe_ds.moe import gated_gelu as gated_gelu_mod
from smoe_ds.moe.dispatch import _counted_slots
from smoe_ds.moe.layer import set_active_experts
from smoe_ds.moe.routes import expert_counts, grouped_layout
from smoe_ds.moe.row_gather import gather_rows
from tests.helpers.launch import run_ranks
from tests.moe.test_layer import make_layer

N, D, H = 8, 32, 16  # bf16 rows of 64 and 32 bytes: widths torch._grouped_mm takes


def python_paths_layer(k: int, dtype: torch.dtype):
    layer = make_layer(n=N, d=D, h=H).to(dtype)
    layer.deepspeed_moe.experts._compiled_op_applies = lambda x: False  # as on a GPU
    set_active_experts(layer, k)
    return layer


def fwd_bwd(forward, layer, x: torch.Tensor) -> list[torch.Tensor]:
    """Output and every gradient (input, experts) of one forward + backward."""
    layer.zero_grad()
    xr = x.clone().requires_grad_(True)
    out = forward(xr)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    experts = layer.deepspeed_moe.experts
    return [out.detach(), xr.grad, experts.w_in.grad, experts.w_out.grad]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# k = 2 of 8 takes the sparse path (grouped GEMMs), k = 8 the dense-masked one.
@pytest.mark.parametrize("k, grouped", [(2, True), (8, False)], ids=["sparse", "dense"])
def test_forward_and_backward_compile_whole_at_a_fixed_k(k, grouped):
    layer = python_paths_layer(k, torch.bfloat16)
    x = torch.randn(2, 29, D, generator=torch.Generator().manual_seed(k)).bfloat16()

    def forward(x):
        return layer(x)[0]

    torch._dynamo.reset()
    explained = torch._dynamo.explain(forward)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert ("_grouped_mm" in str(explained.graphs[0].graph)) == grouped  # the path meant
    torch._dynamo.reset()
    compiled = fwd_bwd(torch.compile(forward, fullgraph=True, backend="aot_eager"), layer, x)
    eager = fwd_bwd(forward, layer, x)
    # bf16: the compiled graph may sum the input's two gradients (router, experts) in another order
    assert all(rel_error(c, e) <= 2e-2 for c, e in zip(compiled, eager))
    assert torch.equal(compiled[0], eager[0])


@pytest.mark.parametrize("compiled_ops", [False, True], ids=["python", "cpu_ops"])
@pytest.mark.parametrize("k", [3, 8])
def test_two_runs_give_the_same_bits(k, compiled_ops):
    layer = python_paths_layer(k, torch.float32)
    if compiled_ops:
        del layer.deepspeed_moe.experts._compiled_op_applies
    x = torch.randn(2, 29, D, generator=torch.Generator().manual_seed(0))
    torch.use_deterministic_algorithms(True)  # any op torch knows to be nondeterministic raises
    try:
        runs = [fwd_bwd(lambda x: layer(x)[0], layer, x) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_the_padded_layout_groups_every_route_with_its_expert():
    T, K, E, align = 13, 3, 5, 4
    gen = torch.Generator().manual_seed(0)
    used = torch.tensor([0, 1, 3, 4])  # expert 2 gets no route
    expert_TK = torch.stack([used[torch.randperm(4, generator=gen)[:K]] for _ in range(T)])
    layout = grouped_layout(expert_TK, E, align)
    R, Q = T * K, T * K + E * (align - 1)
    flat = expert_TK.reshape(-1)
    counts = torch.bincount(flat, minlength=E)
    assert torch.equal(expert_counts(expert_TK, E), counts)
    assert layout.route_Q.shape == (Q,) and int(layout.offs_E[-1]) == Q
    assert all(int(o) % align == 0 for o in layout.offs_E[:-1])
    sizes = torch.diff(layout.offs_E, prepend=torch.zeros(1, dtype=torch.int32))
    assert bool((sizes[:-1] >= counts[:-1]).all()) and bool((sizes[:-1] - counts[:-1] < align).all())
    assert torch.equal(layout.expert_Q()[layout.slot_R], flat)  # each route in its expert's group
    assert torch.equal(layout.route_Q[layout.slot_R], torch.arange(R))  # the two maps are inverse
    assert int((layout.route_Q == R).sum()) == Q - R  # the rest is padding
    for e in range(E):  # stable: by token within an expert
        assert bool((torch.diff(layout.slot_R[flat == e]) > 0).all())


def test_gathered_rows_have_the_gradient_of_plain_indexing():
    # 4 source rows used by 3 routes each (fold 3), 12 virtual rows into 15 output rows: 3 empty.
    src = torch.randn(4, 5, requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    out_of_virtual = torch.randperm(15, generator=gen)[:12]  # each virtual row's output row
    index = torch.full((15,), 12).scatter_(0, out_of_virtual, torch.arange(12))
    out = gather_rows(src, index, out_of_virtual, fold=3)
    padded = torch.cat([src.repeat_interleave(3, 0), torch.zeros(1, 5)])  # the same, by autograd
    ref = padded[index]
    cot = torch.randn(15, 5)
    assert torch.equal(out, ref)
    got, want = torch.autograd.grad((out * cot).sum(), src)[0], torch.autograd.grad((ref * cot).sum(), src)[0]
    torch.testing.assert_close(got, want)


def test_counted_slots_send_what_nonzero_would_in_the_same_order():
    gen = torch.Generator().manual_seed(2)
    reach_PS = torch.rand(4, 9, generator=gen) < 0.4
    rows = int(reach_PS.sum())
    dest_M, token_M, slot_M, row_of_slot, Y = _counted_slots(reach_PS, rows, k=3)
    want_dest, want_token = reach_PS.nonzero(as_tuple=True)
    assert torch.equal(dest_M, want_dest) and torch.equal(token_M, want_token) and Y == 3
    if int(reach_PS.sum(0).max()) <= Y:  # every token's rows fit its slots
        assert torch.equal(row_of_slot[slot_M], torch.arange(rows))
        assert torch.equal(slot_M // Y, token_M)


def test_the_fused_gelu_gate_compiled_as_on_a_gpu_matches_the_eager_form(monkeypatch):
    # What GPUs run (one generated kernel each way), forced here on the CPU.
    monkeypatch.setattr(gated_gelu_mod, "fuses_by_compiling", lambda pre: True)
    gen = torch.Generator().manual_seed(3)
    pre, gates = torch.randn(6, 4, 8, generator=gen), torch.rand(6, 4, 1, generator=gen)
    results = []
    for fn in (gated_gelu_mod.gated_gelu, gated_gelu_mod.GatedGelu.apply):
        p, g = pre.clone().requires_grad_(True), gates.clone().requires_grad_(True)
        y = fn(p, g)
        results.append((y, *torch.autograd.grad((y * pre).sum(), (p, g))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.fixture(scope="module")
def compiled_weights_exchange(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled_ep") / "result.json"
    run_ranks("torchrun", 2, ["tests.helpers.workers.compiled_weights_exchange", str(out)], module=True)
    return json.loads(out.read_text())


@pytest.mark.parametrize("k", ["2", "8"], ids=["sparse", "dense"])
def test_the_weights_exchange_compiles_whole_on_2_ranks(compiled_weights_exchange, k):
    """The experts' all-gather and their gradients' reduce-scatter inside one graph, on 2 gloo ranks
    holding 37 and 53 tokens; forward + backward as the eager layer's."""
    row = compiled_weights_exchange[k]
    assert (row["graphs"], row["graph_breaks"]) == (1, 0), row["break_reasons"]
    assert row["grads_nonzero"]
    assert all(err <= 2e-2 for err in row["rel_errors"].values()), row
