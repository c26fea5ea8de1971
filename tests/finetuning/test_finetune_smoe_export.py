"""Fine-tuning a model pretrained here (issue 15): the built-in LM, pretrained by smoe_ds.train (2
ranks, ep_size 2, ZeRO-2) and exported by smoe_ds.convert, fine-tuned for classification by
smoe_ds.finetune (2 ranks, ep_size 2) on the sentiment fixture, all under the deepspeed launcher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import smoe_ds  # noqa: F401  (registers smoe_lm with the Auto classes)
from smoe_ds.models.transformers_lm import SMoEForSequenceClassification
from tests.helpers.corpora import SENTIMENT
from tests.helpers.launch import REPO, run_ranks
from tests.helpers.smoe_finetune_runs import TOL, engine_rows, export_losses_on_dev, finetune


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    sets = ["run.max_steps=20", "run.eval_interval=0", f"run.out_dir={out}"]
    target = ["smoe_ds.train", "--config", str(REPO / "tests" / "configs" / "e2e_tiny.json")]
    run_ranks("deepspeed", 2, [*target, *[a for s in sets for a in ("--set", s)]], module=True, timeout=420)
    run_ranks("python", 1, ["smoe_ds.convert", str(out / "checkpoints"), str(out / "export")], module=True)
    return out / "export"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, pretrained) -> Path:
    out = tmp_path_factory.mktemp("ft")
    finetune(out, pretrained, "run.max_steps=100", "run.log_interval=10", "optimizer.params.lr=3e-3")
    return out


def test_the_classifier_learns_from_the_pretrained_lm(finetuned):
    summary = json.loads((finetuned / "train_summary.json").read_text())
    losses = [h["loss"] for h in summary["history"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:2]) / 2 - 0.03, losses
    assert {r["k"] for r in summary["self_slimming"]} == {1, 2, 4}


def test_the_export_scores_the_dev_set_as_the_engine_did_at_every_k(finetuned):
    from transformers import AutoModelForSequenceClassification

    assert isinstance(
        AutoModelForSequenceClassification.from_pretrained(finetuned / "model"), SMoEForSequenceClassification
    )
    rows = engine_rows(finetuned)
    for k, (loss, accuracy) in export_losses_on_dev(finetuned / "model", list(rows)).items():
        assert abs(loss - rows[k]["loss"]) <= TOL, k
        assert accuracy == pytest.approx(rows[k]["accuracy"], abs=1e-9), k


def test_every_pretrained_weight_reaches_the_engine(tmp_path, pretrained):
    """At learning rate 0 (AdamW's decay is lr x weight_decay, so 0 too) nothing moves: the export
    after a step holds exactly the pretrained export's LM weights. (That the export gathers them
    back from 2 ranks is what the dev-set comparison above shows.)"""
    finetune(
        tmp_path, pretrained, "run.max_steps=1", "optimizer.params.lr=0", "moe.ep_size=1", ranks=1, launcher="python"
    )
    before, after = load_file(pretrained / "model.safetensors"), load_file(tmp_path / "model" / "model.safetensors")
    assert {k for k in after if not k.startswith("lm.")} == {"score.weight", "score.bias"}
    for name, value in before.items():
        assert torch.equal(after[name], value), name


@pytest.mark.parametrize(
    "setting, message",
    [
        ("moe.num_experts=8", "pretrained with moe.mode=smoe_dropout, moe.num_experts=4: set the same"),
        ("hf.max_length=100", "hf.max_length makes inputs of 100 tokens, beyond"),
    ],
)
def test_a_fine_tune_that_does_not_fit_the_pretrained_model_is_refused_in_one_line(
    tmp_path, pretrained, setting, message
):
    proc = finetune(tmp_path / "out", pretrained, setting, "moe.ep_size=1", ranks=1, launcher="python", check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_continued_pretraining_of_the_exported_lm_runs_and_exports_a_causal_lm(tmp_path, pretrained):
    """causal_lm on a text file: blocks of hf.max_length + 1 = 64 tokens, the pretrained context."""
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(600)))
    out = tmp_path / "out"
    finetune(
        out,
        pretrained,
        "hf.task=causal_lm",
        f"data.path={text}",
        "data.validation=null",
        "hf.max_length=63",
        "data.val_fraction=0.2",
        "run.max_steps=4",
        "run.log_interval=2",
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert type(model).__name__ == "SMoEForCausalLM" and model.num_experts == 4
    rows = json.loads((out / "train_summary.json").read_text())["self_slimming"]
    assert [r["k"] for r in rows] == [1, 2, 4] and all(r["loss"] > 0 for r in rows)


def test_the_transfer_experiment_fine_tunes_each_pretrained_model_alike_and_tables_them(tmp_path, pretrained):
    """Two pretrained models (here the export, and a copy of the run's checkpoint folder under
    another name, which the fine-tune converts first), one seed each, at k = N throughout (the
    paper's transfer setting); the table has every k of each."""
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(pretrained.parent, twin)  # the run folder: checkpoints/ and config.json
    out = tmp_path / "transfer"
    args = ["--pretrained", str(pretrained), str(twin / "checkpoints"), "--train", str(SENTIMENT / "train.tsv")]
    args += ["--validation", str(SENTIMENT / "dev.tsv"), "--out", str(out), "--seeds", "0", "--steps", "3"]
    args += ["--set", "train_micro_batch_size_per_gpu=8", "--set", "scheduler.params.warmup_num_steps=1"]
    args += ["--set", "moe.ep_size=1", "--ranks", "1"]
    run_ranks("python", 1, ["smoe_ds.experiments.transfer", *args], module=True, timeout=600)
    found = json.loads((out / "results.json").read_text())
    assert sorted(found) == ["pretrain0", "twin"]
    config = json.loads((out / "configs" / "twin_seed0.json").read_text())
    assert config["moe"]["k_schedule"] == {"kind": "linear", "k_min": 4, "k_max": 4} and config["run"]["max_steps"] == 3
    table = (out / "results.md").read_text()
    assert all(f"| twin | 1 | {k} |" in table for k in (1, 2, 4))
    assert (out / "runs" / "twin" / "seed0" / "pretrained" / "model.safetensors").is_file()  # converted first
    # same weights, same seed, same data: the two fine-tunes agree
    a, b = (found[n][0]["rows"] for n in ("pretrain0", "twin"))
    assert all(abs(x["loss"] - y["loss"]) <= TOL for x, y in zip(a, b))
    assert (out / "accuracy_vs_k.png").stat().st_size > 0


def test_pretrained_models_are_named_by_their_run_folder_or_by_name_equals_dir():
    from smoe_ds.experiments.transfer import model_name, parse_pretrained

    assert model_name(Path("runs/dense/seed0/checkpoints")) == "dense_seed0"
    assert model_name(Path("runs/smoe/seed12/export")) == "smoe_seed12"
    assert model_name(Path("out/my_lm/export")) == "my_lm" and model_name(Path("exported")) == "exported"
    assert parse_pretrained("base=runs/x/seed0/checkpoints") == ("base", Path("runs/x/seed0/checkpoints"))
    assert parse_pretrained("runs/dense/seed1/checkpoints")[0] == "dense_seed1"


def test_the_transfer_table_compares_each_model_at_full_width_with_the_first_given():
    from smoe_ds.experiments.transfer import results_table

    def runs(accuracies_at_full_width, full_k):  # a slimmable model also has a poor k = 1 row
        narrow = [{"k": 1, "accuracy": 0.1, "loss": 1.0}] if full_k > 1 else []
        return [
            {"seed": s, "rows": [*narrow, {"k": full_k, "accuracy": a, "loss": 0.5}]}
            for s, a in enumerate(accuracies_at_full_width)
        ]

    found = {"smoe": runs([0.70, 0.72], 8), "dense": runs([0.60, 0.61], 1), "close": runs([0.605, 0.59], 8)}
    table = results_table(found, baseline="dense")
    assert "against `dense`" in table
    assert "- `smoe`: +0.1050 accuracy (2 se = " in table and "a real difference" in table.split("`smoe`")[-1]
    assert "- `close`: -0.0075 accuracy" in table and "inconclusive" in table.split("`close`")[-1].split("\n")[0]
    one_seed = results_table({"dense": runs([0.6], 1), "smoe": runs([0.7], 8)}, baseline="dense")
    assert "- `smoe`: +0.1000 accuracy (one seed on a side: no verdict)" in one_seed
