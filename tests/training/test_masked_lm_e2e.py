"""The encoder (model.objective masked_lm) trained as users launch it: 2 ranks under the deepspeed
launcher, ep_size 2, ZeRO-2, MiniLM's WordPiece tokenizer, BERT's masking. One run serves the loss,
table and export checks and is the reference of a second run that is killed and relaunched."""

import json

import pytest
import torch

from smoe_ds.checkpoint import latest_tag
from smoe_ds.checkpoint.export import convert
from smoe_ds.config.schema import DataConfig
from smoe_ds.data import load_corpus
from smoe_ds.masking import MaskingSpec, masked_eval_batches
from smoe_ds.moe.layer import uniform_full_capacity
from tests.helpers.corpora import write_stdlib_text
from tests.helpers.launch import REPO, run_ranks
from tests.helpers.resume_runs import fixed_schedules, losses, trainer_args

CONFIG = str(REPO / "tests" / "configs" / "e2e_tiny_mlm.json")
STEPS, SAVE_EVERY = 40, 10
NAN_AT_12 = "nan:1:train:12:1"  # one skipped micro-batch: the data and mask position is more than the step


def launch(out, corpus, tokenizer, faults: str = "", check: bool = True):
    sets = [*fixed_schedules(STEPS, SAVE_EVERY), "run.eval_interval=20", f"run.out_dir={out}"]
    sets += [f"data.path={corpus}", f"data.tokenizer={tokenizer}"]
    env = {"SMOE_DS_INJECT_FAULT": faults} if faults else {}
    return run_ranks("deepspeed", 2, trainer_args(CONFIG, sets), module=True, env=env, check=check)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, minilm_dir):
    """(root, the run's folder, its output): 40 steps, a checkpoint every 10, one NaN micro-batch skipped."""
    root = tmp_path_factory.mktemp("mlm")
    corpus = write_stdlib_text(root / "corpus.txt", 300_000)
    out = root / "whole"
    proc = launch(out, corpus, minilm_dir, NAN_AT_12)
    return root, out, proc


def test_validation_loss_falls_and_the_table_has_loss_and_accuracy_at_every_k(trained):
    _, out, proc = trained
    val = json.loads((out / "train_summary.json").read_text())["val_history"]
    assert [v["step"] for v in val] == [0, 20, 40]
    start, end = val[0]["k=4"], val[-1]["k=4"]
    assert end < start - 1.0, f"validation loss at k=N went {start:.3f} -> {end:.3f}"
    assert "smoe_dropout encoder (masked LM)" in proc.stdout and "accuracy" in proc.stdout
    rows = json.loads((out / "self_slimming.json").read_text())["results"]
    assert [r["k"] for r in rows] == [1, 2, 4]
    assert all(0 < r["accuracy"] <= 1 and r["loss"] < start for r in rows)


def masked_metrics(model, batches: list, k: int) -> dict:
    """The export's loss and accuracy on the masked tokens, through its Hugging Face forward."""
    model.set_active_experts(k)
    total = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for x, labels in batches:
            logits = model(input_ids=x).logits.float()
            scored = labels != -100
            loss = torch.nn.functional.cross_entropy(logits[scored], labels[scored], reduction="sum")
            right = (logits[scored].argmax(-1) == labels[scored]).sum()
            total += torch.tensor([loss.item(), right.item(), scored.sum().item()], dtype=torch.float64)
    return {"loss": float(total[0] / total[2]), "accuracy": float(total[1] / total[2])}


def test_export_loads_as_masked_lm_and_equals_the_engine_at_every_k(trained, minilm_dir, tmp_path):
    """The engine's final table (2 ranks, ep_size 2) against the export on one device, on the same
    masked validation batches: the loss to 1e-5 and the same accuracy at every k, 1/N included."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    import smoe_ds  # noqa: F401

    root, out, _ = trained
    convert(out / "checkpoints", tmp_path / "export")
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "export").eval()
    assert type(model).__name__ == "SMoEForMaskedLM" and (tmp_path / "export" / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="is an encoder .* AutoModelForMaskedLM"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())
    corpus = load_corpus(DataConfig(path=str(root / "corpus.txt"), tokenizer=str(minilm_dir)), 32)
    spec = MaskingSpec.of_tokenizer(str(minilm_dir))
    batches = [
        b
        for rank in (0, 1)
        for b in masked_eval_batches(corpus.val_blocks, spec, 0, 8, rank, 2, cfg["run"]["final_eval_batches"])
    ]
    for row in json.loads((out / "self_slimming.json").read_text())["results"]:
        mine = masked_metrics(model, batches, row["k"])
        assert abs(mine["loss"] - row["loss"]) <= 1e-5 and mine["accuracy"] == row["accuracy"], (row, mine)
        if "loss_uniform" in row:
            with uniform_full_capacity(model):
                assert abs(masked_metrics(model, batches, row["k"])["loss"] - row["loss_uniform"]) <= 1e-5


def test_a_killed_run_relaunched_gives_the_uninterrupted_losses(trained, minilm_dir, tmp_path):
    """Rank 1 dies at step 25 (checkpoints at 10 and 20); the relaunch resumes from step 20 and logs
    the uninterrupted run's loss at every step, masks and dropout included, to 1e-6."""
    root, whole, _ = trained
    killed = launch(tmp_path, root / "corpus.txt", minilm_dir, f"{NAN_AT_12},kill:1:train:25", check=False)
    assert killed.returncode != 0 and latest_tag(tmp_path / "checkpoints") == "step20"
    proc = launch(tmp_path, root / "corpus.txt", minilm_dir)
    assert f"resumed from {tmp_path / 'checkpoints' / 'step20'}" in proc.stdout
    reference, resumed = losses(whole), losses(tmp_path)
    assert sorted(resumed) == sorted(reference) == list(range(1, STEPS + 1))
    worst = max(abs(resumed[s] - reference[s]) for s in reference)
    assert worst <= 1e-6, worst
