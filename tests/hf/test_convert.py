"""Converting pretrained dense transformers: exact at k = N under rescale, per-layer agreement with
a naive per-token loop at every k, and the refusals."""

from __future__ import annotations

import pytest
import torch
import transformers

from smoe_ds.config.schema import ConfigError
from smoe_ds.hf import convert_model, set_active_experts
from smoe_ds.hf.ffn import ConvertedFFN
from smoe_ds.moe.router import frozen_router_weight
from tests.helpers.hf_models import outputs, tiny_inputs, tiny_model
from tests.helpers.reference import naive_split_ffn

TOL = 1e-5


def test_minilm_rescale_at_k_equal_n_is_the_pretrained_model(minilm, minilm_inputs):
    with torch.no_grad():
        ref = minilm(**minilm_inputs)
    dense_params = sum(p.numel() for p in minilm.parameters())
    convert_model(minilm, num_experts=4, weighting="rescale")
    with torch.no_grad():
        out = minilm(**minilm_inputs)
    diff = max(
        (out.last_hidden_state - ref.last_hidden_state).abs().max(),
        (out.pooler_output - ref.pooler_output).abs().max(),
    )
    assert diff <= TOL, f"max |diff| {diff:.2e}"
    # Same parameters plus the frozen routers (6 layers x 4 experts x d_model 384).
    routers = [p for p in minilm.parameters() if not p.requires_grad]
    assert len(routers) == 6 and sum(p.numel() for p in routers) == 6 * 4 * 384
    assert sum(p.numel() for p in minilm.parameters()) == dense_params + 6 * 4 * 384
    set_active_experts(minilm, 2)
    with torch.no_grad():
        slim = minilm(**minilm_inputs).last_hidden_state
    assert (slim - ref.last_hidden_state).abs().max() > 1e-2  # k < N is a different model


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral", "roberta"])
def test_tiny_models_rescale_at_k_equal_n_match(name):
    model, inputs = tiny_model(name), tiny_inputs()
    ref = outputs(model, inputs)
    convert_model(model, num_experts=4)
    diff = (outputs(model, inputs) - ref).abs().max()
    assert diff <= TOL, f"{name}: max |diff| {diff:.2e}"
    set_active_experts(model, 1)
    assert (outputs(model, inputs) - ref).abs().max() > 1e-3


def _dense_ffns(name: str, model) -> list[tuple[dict, object]]:
    """Each block's dense FFN weights and activation, read from the unconverted model's own modules."""
    blocks = (
        model.base_model.encoder.layer
        if name == "minilm"
        else model.base_model.get_submodule("h" if name == "gpt2" else "layers")
    )
    ffns = []
    for b in blocks:
        if name == "minilm":
            i, o = b.intermediate.dense, b.output.dense
            w = {"w_in": i.weight, "b_in": i.bias, "w_down": o.weight, "b_out": o.bias}
            act = b.intermediate.intermediate_act_fn
        elif name == "gpt2":  # Conv1D: y = x @ weight + bias, weight [in, out]
            w = {"w_in": b.mlp.c_fc.weight.t(), "b_in": b.mlp.c_fc.bias, "w_down": b.mlp.c_proj.weight.t()}
            w["b_out"], act = b.mlp.c_proj.bias, b.mlp.act
        else:
            m = b.mlp
            w, act = {"w_in": m.up_proj.weight, "w_gate": m.gate_proj.weight, "w_down": m.down_proj.weight}, m.act_fn
        ffns.append(({key: t.detach().double() for key, t in w.items()}, act))
    return ffns


@pytest.mark.parametrize("weighting", ["rescale", "softmax"])
@pytest.mark.parametrize("name", ["minilm", "gpt2", "llama"])
def test_every_layer_matches_naive_per_expert_loop(name, weighting, request):
    if name == "minilm":
        model, inputs = request.getfixturevalue("minilm"), request.getfixturevalue("minilm_inputs")
    else:
        model, inputs = tiny_model(name), tiny_inputs()
        with torch.no_grad():  # O(1) FFN outputs instead of init's ~0.05, so 1e-5 is a real bound
            for p in model.parameters():
                p.normal_(0, 0.2)
    ref_dense = outputs(model, inputs)
    dense = _dense_ffns(name, model)
    n, seed = 4, 7
    convert_model(model, num_experts=n, weighting=weighting, router_seed=seed)
    ffns = [m for m in model.modules() if isinstance(m, ConvertedFFN)]
    assert len(ffns) == len(dense)
    seen = {}
    for i, ffn in enumerate(ffns):
        ffn.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, (args[0].detach(), out.detach())))
    for k in range(1, n + 1):  # k = 1, 2: sparse grouped path; 3, 4: dense-masked path
        set_active_experts(model, k)
        out = outputs(model, inputs)
        if k < n or weighting == "softmax":
            assert (out - ref_dense).abs().max() > 1e-4, f"k={k} {weighting} should differ from the dense model"
        for i, (weights, act) in enumerate(dense):
            x, y = seen[i]
            d = x.shape[-1]
            router = frozen_router_weight(d, n, seed, i)
            ref = naive_split_ffn(x.reshape(-1, d).double(), router, weights, act, k, weighting)
            # 1e-5 absolute for O(1) outputs, relative beyond: MiniLM's FFN outputs reach ~200,
            # where one fp32 ulp is already 1.5e-5.
            diff = (y.reshape(-1, d).double() - ref).abs().max()
            assert diff <= TOL * max(1.0, ref.abs().max()), f"{name} layer {i} k={k} {weighting}: |diff| {diff:.2e}"


def test_k_outside_range_is_refused():
    model = convert_model(tiny_model("gpt2"), num_experts=4)
    for k in (0, 5):
        with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
            set_active_experts(model, k)


def test_unsupported_architecture_lists_the_supported_ones():
    t5 = transformers.T5Model(
        transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64)
    )
    with pytest.raises(ConfigError, match="'t5' is not supported.*bert, gpt2, llama, mistral, roberta"):
        convert_model(t5, num_experts=2)


def test_bad_expert_counts_and_unsupported_weights_are_refused():
    with pytest.raises(ConfigError, match="hidden size 256 .* not divisible into 3 experts"):
        convert_model(tiny_model("gpt2"), num_experts=3)
    with pytest.raises(ConfigError, match="weighting must be one of"):
        convert_model(tiny_model("gpt2"), num_experts=4, weighting="uniform")
    biased = tiny_model("llama", mlp_bias=True)
    with pytest.raises(ConfigError, match="mlp.up_proj.bias"):
        convert_model(biased, num_experts=2)
    assert isinstance(biased.model.layers[0].mlp, transformers.models.llama.modeling_llama.LlamaMLP)  # untouched
    model = convert_model(tiny_model("gpt2"), num_experts=4)
    with pytest.raises(ConfigError, match="already converted"):
        convert_model(model, num_experts=4)


def test_fine_tuning_trains_the_experts_and_never_the_router():
    model, inputs = convert_model(tiny_model("llama"), num_experts=4), tiny_inputs()
    set_active_experts(model, 2)
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("gate.wg.weight")}
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}
    assert len(routers) == 2 and all(not p.requires_grad for n, p in model.named_parameters() if n in routers)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], w) for n, w in routers.items())
    assert all(not torch.equal(params[n], w) for n, w in experts.items())
