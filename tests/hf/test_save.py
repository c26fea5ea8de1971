"""Densify (export a rescale SMoE model as the original dense architecture), SMoE save/load, and a
converted model's own ``save_pretrained``."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import smoe_ds  # noqa: F401  (the Auto classes load SMoE directories)
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


# -- a converted model's own save_pretrained (what Trainer.save_model and its checkpoints call) -----------


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_save_pretrained_writes_the_smoe_directory_that_the_auto_class_reloads_at_any_k(name, tmp_path):
    model, inputs = convert_model(tiny_model(name), num_experts=4, router_seed=5), tiny_inputs()
    set_active_experts(model, 3)
    model.save_pretrained(tmp_path / "once")
    meta = json.loads((tmp_path / "once" / "config.json").read_text())
    assert meta["model_type"] == "smoe_dropout_hf" and meta["active_experts"] == 3 and meta["router_seed"] == 5
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "once")
    assert type(loaded) is type(model) and loaded.smoe_dropout == model.smoe_dropout
    for k in (3, 1, 4):
        set_active_experts(model, k)
        set_active_experts(loaded, k)
        assert torch.equal(outputs(loaded, inputs), outputs(model, inputs)), k
    # A reloaded model saves the same way, here in shards past max_shard_size.
    loaded.save_pretrained(tmp_path / "twice", max_shard_size="20KB")
    assert (tmp_path / "twice" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "twice" / "model.safetensors").exists()
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "twice")
    assert torch.equal(outputs(again, inputs), outputs(loaded, inputs))


def test_save_pretrained_of_a_tied_masked_lm_keeps_its_tied_decoder(minilm, minilm_inputs, tmp_path):
    """BERT's MLM decoder shares the word embeddings: saved once, tied again on load."""
    model = transformers.BertForMaskedLM(minilm.config).eval()
    model.bert.load_state_dict(minilm.state_dict(), strict=False)  # the pretrained encoder, a fresh head
    convert_model(model, num_experts=4)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    inputs = {k: v for k, v in minilm_inputs.items() if k != "token_type_ids"}
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_save_pretrained_refuses_what_would_not_reload_and_writes_nothing(tmp_path):
    sharded = convert_model(tiny_model("gpt2"), num_experts=4, ep_size=2, ep_rank=1)  # 2 of the 4 experts
    with pytest.raises(ConfigError, match=r"holds 2 of the 4 experts .*\(ep_size 2\): call trainer.save_model\(\)"):
        sharded.save_pretrained(tmp_path / "sharded")
    model = convert_model(tiny_model("gpt2"), num_experts=4)
    with pytest.raises(ConfigError, match="takes no variant"):
        model.save_pretrained(tmp_path / "variant", variant="fp16")
    with pytest.raises(ConfigError, match="takes no push_to_hub"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    assert not any(tmp_path.iterdir())
    # The class's own save_pretrained (densify's) still writes the original architecture.
    type(model).save_pretrained(model, tmp_path / "original")
    assert json.loads((tmp_path / "original" / "config.json").read_text())["model_type"] == "gpt2"


def test_load_refuses_an_smoe_config_without_weights(tmp_path):
    model = convert_model(tiny_model("gpt2"), num_experts=4)
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="an SMoE-Dropout config without weights"):
        load_smoe(tmp_path)
