"""A saved SMoE directory through transformers' Auto classes: with smoe_ds, the converted model at
any k; without it, a refusal."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from smoe_ds.config.schema import ConfigError
from smoe_ds.hf import convert_model, save_smoe, set_active_experts
from smoe_ds.hf.surgery import active_experts
from tests.helpers.hf_models import outputs, run_plain_transformers, tiny_inputs, tiny_model

N = 4
TOL = 1e-6
AUTO_CLASS = {"minilm": "AutoModel", "gpt2": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM"}


def model_and_inputs(name: str, request) -> tuple[transformers.PreTrainedModel, dict]:
    if name == "minilm":
        return request.getfixturevalue("minilm"), request.getfixturevalue("minilm_inputs")
    return tiny_model(name), tiny_inputs()


@pytest.mark.parametrize("name", AUTO_CLASS)
def test_round_trip_through_the_auto_class_at_any_k(name, request, tmp_path):
    model, inputs = model_and_inputs(name, request)
    arch = type(model).__name__
    # softmax: at k = N it is not the dense model, so every k checks the experts and routers
    convert_model(model, num_experts=N, weighting="softmax", router_seed=3)
    set_active_experts(model, N // 2)
    save_smoe(model, tmp_path)
    files = {p.name for p in tmp_path.iterdir()}  # decoders get their generation_config.json too
    assert files - {"generation_config.json"} == {"config.json", "model.safetensors"}
    assert ("generation_config.json" in files) == model.can_generate()
    config = json.loads((tmp_path / "config.json").read_text())
    recorded = ("model_type", "architecture", "num_experts", "weighting", "router_seed", "active_experts")
    assert {k: config[k] for k in recorded} == dict(zip(recorded, ("smoe_dropout_hf", arch, N, "softmax", 3, N // 2)))

    loaded = getattr(transformers, AUTO_CLASS[name]).from_pretrained(tmp_path)
    assert type(loaded).__name__ == arch and loaded.smoe_dropout == model.smoe_dropout
    assert active_experts(loaded) == N // 2 and not loaded.training
    for k in (N // 2, 1, N):  # the saved k first: the loaded model starts there
        set_active_experts(model, k)
        if k != N // 2:
            set_active_experts(loaded, k)
        diff = (outputs(loaded, inputs) - outputs(model, inputs)).abs().max().item()
        assert diff <= TOL, f"{name} at k = {k}: max |diff| {diff:.2e}"


def test_auto_model_keeps_the_head_and_task_classes_refuse_other_architectures(tmp_path):
    save_smoe(convert_model(tiny_model("gpt2"), num_experts=N), tmp_path)
    assert type(transformers.AutoModel.from_pretrained(tmp_path)).__name__ == "GPT2LMHeadModel"
    with pytest.raises(ConfigError, match="converted GPT2LMHeadModel, which AutoModelForMaskedLM does not load"):
        transformers.AutoModelForMaskedLM.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="takes no options besides .*; got dtype"):  # not silently ignored
        transformers.AutoModel.from_pretrained(tmp_path, dtype=torch.float16)


def test_without_smoe_ds_transformers_refuses_the_directory(tmp_path):
    save_smoe(convert_model(tiny_model("gpt2"), num_experts=N), tmp_path / "smoe")
    classes = {
        "AutoModel": "model type `smoe_dropout_hf` but Transformers does not recognize this architecture",
        "AutoModelForCausalLM": "model type `smoe_dropout_hf` but Transformers does not recognize this architecture",
        # The class itself gets a default GPT2Config (the stored one is not where it looks), so the
        # shapes differ. A model whose sizes are the class's defaults would load with its FFNs
        # missing and transformers' MISSING report: only the Auto classes refuse by model type.
        "GPT2LMHeadModel": "ignore_mismatched_sizes",
    }
    jobs = [
        {"dir": str(tmp_path / "smoe"), "auto_class": c, "expect_error": True, "out": str(tmp_path / f"{c}.txt")}
        for c in classes
    ]
    run_plain_transformers(jobs, tmp_path)
    for cls, message in classes.items():
        error = (tmp_path / f"{cls}.txt").read_text()
        assert message in error, f"{cls}: {error[:500]}"
