"""Densify (export a rescale SMoE model as the original dense architecture) and SMoE save/load."""

from __future__ import annotations

import json

import pytest
import torch

from smoe_ds.config.schema import ConfigError
from smoe_ds.hf import convert_model, export_dense, load_smoe, save_smoe, set_active_experts
from tests.helpers.hf_models import outputs, run_plain_transformers, tiny_inputs, tiny_model

TOL = 1e-5


def test_densify_round_trip_with_plain_transformers(minilm, minilm_inputs, tmp_path):
    models = {"minilm": (minilm, minilm_inputs, "AutoModel")}
    for name in ("gpt2", "llama"):
        models[name] = (tiny_model(name), tiny_inputs(), "AutoModelForCausalLM")
    jobs, expected = [], {}
    for name, (model, inputs, auto_class) in models.items():
        convert_model(model, num_experts=4, weighting="rescale")
        expected[name] = outputs(model, inputs)  # the SMoE model at k = N
        set_active_experts(model, 2)  # the export is the k = N model whatever k the model runs at
        export_dense(model, tmp_path / name)
        torch.save(inputs, tmp_path / f"{name}_inputs.pt")
        jobs.append(
            {
                "dir": str(tmp_path / name),
                "auto_class": auto_class,
                "inputs": str(tmp_path / f"{name}_inputs.pt"),
                "out": str(tmp_path / f"{name}_out.pt"),
            }
        )
    run_plain_transformers(jobs, tmp_path)
    for name in models:
        dense = torch.load(tmp_path / f"{name}_out.pt")
        diff = (dense - expected[name]).abs().max()
        assert diff <= TOL, f"{name}: max |diff| {diff:.2e}"
    config = json.loads((tmp_path / "minilm" / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertModel"]


def test_softmax_densify_is_refused(tmp_path):
    model = convert_model(tiny_model("gpt2"), num_experts=4, weighting="softmax")
    with pytest.raises(ConfigError, match="cannot densify a 'softmax'.*not all 1"):
        export_dense(model, tmp_path / "dense")
    assert not (tmp_path / "dense").exists()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_smoe_save_load_round_trip_at_any_k(name, tmp_path):
    model, inputs = convert_model(tiny_model(name), num_experts=4, weighting="softmax", router_seed=11), tiny_inputs()
    set_active_experts(model, 2)
    save_smoe(model, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert {k: meta[k] for k in ("family", "num_experts", "weighting", "router_seed", "active_experts")} == {
        "family": "gpt2" if name == "gpt2" else "llama",
        "num_experts": 4,
        "weighting": "softmax",
        "router_seed": 11,
        "active_experts": 2,
    }
    loaded = load_smoe(tmp_path)
    assert loaded.smoe_dropout == model.smoe_dropout
    assert torch.equal(outputs(loaded, inputs), outputs(model, inputs))  # reloaded at the saved k
    for k in (1, 4):
        set_active_experts(model, k)
        set_active_experts(loaded, k)
        assert torch.equal(outputs(loaded, inputs), outputs(model, inputs))
    assert all(not p.requires_grad for n, p in loaded.named_parameters() if n.endswith("gate.wg.weight"))


def test_load_smoe_refuses_a_dense_directory(tmp_path):
    tiny_model("gpt2").save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="not an SMoE-Dropout directory"):
        load_smoe(tmp_path)
