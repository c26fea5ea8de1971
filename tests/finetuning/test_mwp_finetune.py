"""The math_word_problem task of ``smoe_ds.finetune``: real MiniLM weights, 2 ranks with expert
parallelism (ep_size 2) and ZeRO-2 under the deepspeed launcher, on the hand-written fixture
problems; the export decodes single-process exactly what the engine decoded; bad rows stop the
run with one line naming the file and row, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from smoe_ds.finetuning.mwp_data import read_problems
from smoe_ds.finetuning.mwp_model import load_solver, question_inputs
from smoe_ds.moe.layer import set_active_experts
from tests.helpers.launch import REPO, run_ranks

CONFIG = str(REPO / "ds_configs" / "finetune_minilm_mwp.json")
TINY = REPO / "tests" / "data" / "mwp" / "tiny.csv"


def finetune(launcher: str, ranks: int, out: Path, *settings: str, check: bool = True):
    # no checkpoint unless a test asks for one (a MiniLM checkpoint is 350 MB)
    sets = [a for s in (f"run.out_dir={out}", "run.save_checkpoint=false", *settings) for a in ("--set", s)]
    return run_ranks(
        launcher, ranks, ["smoe_ds.finetune", "--config", CONFIG, *sets], module=True, timeout=420, check=check
    )


@pytest.fixture(scope="module")
def mwp_run(tmp_path_factory, minilm_dir) -> Path:
    out = tmp_path_factory.mktemp("mwp")
    finetune(
        "deepspeed",
        2,
        out,
        f"hf.model={minilm_dir}",
        f"data.path={TINY}",
        f"data.validation={TINY}",
        "train_micro_batch_size_per_gpu=4",
        "run.max_steps=30",
        "run.log_interval=5",
        "scheduler.params.warmup_num_steps=1",
        "hf.new_weights_lr=3e-3",
    )
    return out


def test_training_loss_falls_and_the_training_problems_are_learned(mwp_run):
    summary = json.loads((mwp_run / "train_summary.json").read_text())
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < 0.25 * losses[0], losses
    rows = {r["k"]: r for r in summary["self_slimming"]}
    assert sorted(rows) == [1, 2, 4, 8]
    assert rows[8]["value_accuracy"] >= 0.75 and rows[8]["equation_accuracy"] <= rows[8]["value_accuracy"]


def test_export_decodes_single_process_what_the_engine_decoded_at_every_k(mwp_run):
    model, settings = load_solver(mwp_run / "model")
    tokenizer = AutoTokenizer.from_pretrained(mwp_run / "model")
    assert type(model.encoder).__name__ == "BertModel" and settings["max_slots"] == 3
    problems = read_problems(TINY)
    engine_said = json.loads((mwp_run / "predictions.json").read_text())
    inputs = question_inputs(tokenizer, [p.question for p in problems], settings["max_slots"], settings["max_length"])
    for k in ("1", "2", "4", "8"):
        set_active_experts(model, int(k))
        solved = model.solve(**inputs, max_tokens=settings["max_tokens"])
        assert [r["source"] for r in engine_said[k]] == [p.source for p in problems]
        assert solved == [r["predicted"] for r in engine_said[k]], k


@pytest.mark.parametrize(  # every kind of bad row is checked by the reader's tests; here, how the command ends
    "row, message",
    [("q number0 number1 ?,3 4,+ number0 number5,7.0", "bad.csv:3: malformed Equation '+ number0 number5': number5")],
)
def test_a_bad_row_stops_the_run_with_one_line_naming_file_and_row(tmp_path, minilm_dir, row, message):
    bad = tmp_path / "bad.csv"
    bad.write_text(f"Question,Numbers,Equation,Answer\nq number0 ?,3,number0,3.0\n{row}\n")
    proc = finetune(
        "python",
        1,
        tmp_path / "out",
        f"hf.model={minilm_dir}",
        f"data.path={bad}",
        f"data.validation={TINY}",
        "moe.ep_size=1",
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower() and "bad.csv" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # refused before anything was written
