"""python -m smoe_ds.experiments.mwp end to end on a tiny copy of the data layout: both methods per
fold under the deepspeed launcher, the table, JSON and plot, and a rerun that skips finished runs."""

import json
import shutil

from tests.helpers.launch import REPO, run_ranks

TINY = REPO / "tests" / "data" / "mwp" / "tiny.csv"


def test_mwp_experiment_runs_both_methods_per_fold_writes_the_report_and_resumes(tmp_path, minilm_dir):
    data = tmp_path / "mwp"
    fold = data / "cv_asdiv-a" / "fold0"
    fold.mkdir(parents=True)
    for name in ("train.csv", "dev.csv"):
        shutil.copy(TINY, fold / name)
    out = tmp_path / "out"
    args = ["--data", str(data), "--out", str(out), "--sets", "asdiv-a", "--folds", "0", "--epochs", "2"]
    args += ["--model", str(minilm_dir)]
    sets = ("train_micro_batch_size_per_gpu=4", "run.log_interval=1", "scheduler.params.warmup_num_steps=1")
    for item in (*sets, "run.save_checkpoint=false"):
        args += ["--set", item]
    first = run_ranks("python", 1, ["smoe_ds.experiments.mwp", *args], module=True, timeout=600)
    assert "asdiv-a fold0: smoe_dropout seed 0: 2 steps" in first.stdout  # 2 epochs of 8 problems, 2 x 4 a step
    found = json.loads((out / "results.json").read_text())
    assert sorted(found["asdiv-a"]) == ["dense", "smoe_dropout"]
    assert sorted(found["asdiv-a"]["smoe_dropout"][0]["by_k"]) == ["1", "2", "4", "8"]
    assert list(found["asdiv-a"]["dense"][0]["by_k"]) == ["8"]
    config = json.loads((out / "configs" / "asdiv-a_fold0_dense_seed0.json").read_text())
    assert (
        config["moe"]["mode"] == "dense"
        and config["run"]["max_steps"] == 2
        and config["hf"]["model"] == str(minilm_dir)
    )
    table = (out / "results.md").read_text()
    assert "| asdiv-a | smoe_dropout | 1 |" in table and "+1.03" in table and "76.9-82.2" in table
    assert (out / "accuracy_vs_k.png").stat().st_size > 0
    again = run_ranks("python", 1, ["smoe_ds.experiments.mwp", *args], module=True, timeout=300)
    assert again.stdout.count("done already, skipped") == 2
