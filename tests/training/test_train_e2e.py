"""End to end: the trainer as users launch it, on real DeepSpeed engines over gloo."""

import csv
import json
import math
import re

import pytest
import torch

from tests.helpers.corpora import write_stdlib_text
from tests.helpers.launch import REPO, run_ranks

CONFIG = str(REPO / "tests" / "configs" / "e2e_tiny.json")


def train(launcher, out_dir, *sets, nprocs=2):
    args = [
        "smoe_ds.train",
        "--config",
        CONFIG,
        "--set",
        f"run.out_dir={out_dir}",
        *sum([["--set", s] for s in sets], []),
    ]
    return run_ranks(launcher, nprocs, args, module=True)


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_run")
    proc = train("deepspeed", out, "tensorboard.enabled=true")
    return out, proc


def test_deepspeed_launcher_ep2_zero2_lowers_validation_loss(deepspeed_run):
    out, proc = deepspeed_run
    summary = json.loads((out / "train_summary.json").read_text())
    val = summary["val_history"]
    assert [v["step"] for v in val] == [0, 25, 50]
    start, end = val[0]["k=4"], val[-1]["k=4"]
    assert end < start - 1.0, f"validation loss at k=N went {start:.3f} -> {end:.3f}"
    assert "self-slimming" in proc.stdout and "bits/byte" in proc.stdout
    # rank 0's progress bar: steps done of 50, elapsed<ETA, and the loss, k and tokens/s
    assert re.search(r"\| 50/50 \[[\d:]+<[\d:]+, +[\d.]+it/s, loss=[\d.]+, k=4, tok/s=[\d,]+\]", proc.stdout)


def test_outputs_table_json_plot_monitor_and_per_expert_checkpoint(deepspeed_run):
    out, _ = deepspeed_run
    result = json.loads((out / "self_slimming.json").read_text())["results"]
    assert [r["k"] for r in result] == [1, 2, 4]
    assert all(math.isfinite(r["bpb"]) and r["bpb"] > 0 for r in result)
    assert (out / "self_slimming.png").read_bytes()[:4] == b"\x89PNG"
    monitor = {p.name for p in (out / "monitor").rglob("*.csv")}
    for name in ("Train_loss.csv", "Train_k.csv", "Train_lr.csv", "Train_expert_load_layer0_expert3.csv"):
        assert name in monitor, sorted(monitor)
    assert list((out / "monitor").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    k_rows = list(csv.reader(open(next((out / "monitor").rglob("Train_k.csv")))))
    # linear 2 -> 4 over 50 steps; the row logged after step s shows the k that step s (0-based s - 1) ran at
    assert [int(float(r[1])) for r in k_rows[1:]] == [round(2 * (s - 1) / 50) + 2 for s in (10, 20, 30, 40, 50)]
    ckpt = out / "checkpoints" / "step50"
    experts = sorted(p.name for p in ckpt.glob("layer_*_expert_*_model_states.pt"))
    assert experts == [f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in (0, 1) for e in range(4)]
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    routers = [k for k in module if k.endswith("gate.wg.weight")]
    assert len(routers) == 2 and not any("deepspeed_experts" in k for k in module)


def run_files(out) -> dict:
    """Every file of a run folder but its evaluations (eval/), with its bytes."""
    files = {p.relative_to(out): p for p in out.rglob("*") if p.is_file()}
    return {name: p.read_bytes() for name, p in sorted(files.items()) if name.parts[0] != "eval"}


@pytest.mark.parametrize("stage", [2, 3])
def test_evaluate_cli_reloads_the_checkpoint_under_torchrun_at_any_zero_stage(deepspeed_run, tmp_path, stage):
    """The ZeRO-2 checkpoint evaluated by a ZeRO-2 engine and by a ZeRO-3 one: the same numbers.
    With the training config (run.out_dir the run's own folder), the evaluation writes into a folder
    of its own, run.out_dir/eval/<tag> by default or --out, and leaves every file of the training
    run as it was, its self_slimming.json and .png included, byte for byte."""
    out, _ = deepspeed_run
    before = run_files(out)
    where = ["--out", str(tmp_path)] if stage == 3 else []
    written = tmp_path if stage == 3 else out / "eval" / "step50"
    proc = run_ranks(
        "torchrun",
        2,
        [
            "smoe_ds.evaluate",
            "--config",
            CONFIG,
            "--checkpoint",
            str(out / "checkpoints"),
            "--ks",
            "1,4",
            "--set",
            f"run.out_dir={out}",
            "--set",
            f"zero_optimization.stage={stage}",
            *where,
        ],
        module=True,
    )
    assert run_files(out) == before, "the evaluation changed a file of the training run"
    rows = json.loads((written / "self_slimming.json").read_text())["results"]
    assert (written / "self_slimming.png").read_bytes()[:4] == b"\x89PNG"
    assert f"wrote {written / 'self_slimming.json'}" in proc.stdout
    trained = {r["k"]: r["loss"] for r in json.loads((out / "self_slimming.json").read_text())["results"]}
    assert [r["k"] for r in rows] == [1, 4]
    for r in rows:  # same weights, same validation batches: the same numbers
        assert abs(r["loss"] - trained[r["k"]]) < 1e-5
    assert "bits/byte" in proc.stdout


def test_mpirun_runs_the_same_job_and_lowers_validation_loss(tmp_path):
    """The deepspeed-launcher run above (2 ranks, ep_size 2, ZeRO-2, 50 steps), under mpirun."""
    proc = train("mpirun", tmp_path)
    val = json.loads((tmp_path / "train_summary.json").read_text())["val_history"]
    assert [v["step"] for v in val] == [0, 25, 50]
    assert val[-1]["k=4"] < val[0]["k=4"] - 1.0, val
    assert "self-slimming" in proc.stdout


def test_mpirun_4_ranks_with_mpi_discovery_the_logged_expert_layout_and_dropped_tokens(tmp_path):
    corpus = [f"data.path={write_stdlib_text(tmp_path / 'text.txt', 300_000)}"]  # a local text file
    sets = ("zero_optimization.stage=1", "run.max_steps=30", "run.eval_interval=30", "data.val_fraction=0.2")
    # A tight capacity (cf 0.5: each expert takes half of its even share) must drop routes.
    proc = train("mpirun", tmp_path, *corpus, *sets, "moe.capacity_factor=0.5", nprocs=4)
    val = json.loads((tmp_path / "train_summary.json").read_text())["val_history"]
    assert val[-1]["k=4"] < val[0]["k=4"] - 0.5
    dropped = list(csv.reader(open(next((tmp_path / "monitor").rglob("Train_dropped_fraction.csv")))))[1:]
    assert [int(float(r[0])) for r in dropped] == [10, 20, 30]
    # k grows 2 -> 4 and every rank has 8 x 64 tokens: at least half of the routes beyond C are dropped
    assert all(0.4 <= float(r[1]) < 1.0 for r in dropped), dropped
    # ep_size 2 on 4 ranks: two expert-parallel groups of consecutive ranks, experts averaged across them
    layout = json.loads((tmp_path / "layout.json").read_text())
    assert layout["world_size"] == 4 and layout["expert_parallel_groups"] == [[0, 1], [2, 3]]
    assert layout["expert_data_parallel_groups"] == [[0, 2], [1, 3]]
    assert layout["experts_of_rank"] == [[0, 1], [2, 3], [0, 1], [2, 3]]
    assert "expert-parallel groups: [[0, 1], [2, 3]]" in proc.stdout


@pytest.mark.parametrize("mode, zero", [("dense", 0), ("learned", 1), ("random_fixed", 2), ("thor", 2)])
def test_baseline_modes_train_under_torchrun(tmp_path, mode, zero):
    train(
        "torchrun",
        tmp_path,
        f"moe.mode={mode}",
        f"zero_optimization.stage={zero}",
        "run.max_steps=20",
        "run.eval_interval=20",
    )
    val = json.loads((tmp_path / "train_summary.json").read_text())["val_history"]
    # dense runs every unit; learned keeps its fixed k (moe.k = 2); random_fixed trains at k = 2 behind the
    # frozen router and, like SMoE-Dropout, is also validated at k = N; thor trains at k = 1 (random routes)
    keys = {"dense": ["k=4"], "learned": ["k=2"], "random_fixed": ["k=2", "k=4"], "thor": ["k=1", "k=4"]}[mode]
    assert list(val[0]) == ["step", "train_wall_s", *keys]
    assert val[-1][keys[0]] < val[0][keys[0]] - 0.5


def test_local_launcher_fits_ep_size_to_an_odd_rank_count(tmp_path):
    """launch/local.sh on 3 CPU ranks with a config for ep_size 2 falls back to ep_size 1, says so, and trains."""
    import subprocess
    import sys

    from smoe_ds.distributed.process_group import free_port
    from tests.helpers.launch import BIN, rank_env

    env = rank_env({"NPROC": "3", "PYTHON": sys.executable, "MASTER_PORT": str(free_port())})
    env["PATH"] = f"{BIN}:{env['PATH']}"
    sets = [f"run.out_dir={tmp_path}", "run.max_steps=3", "run.eval_interval=0", "run.final_eval_batches=1"]
    cmd = ["bash", str(REPO / "launch" / "local.sh"), CONFIG, *sum([["--set", s] for s in sets], [])]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 rank(s): using moe.ep_size=1 (the config's 2 does not divide them)" in proc.stdout
    layout = json.loads((tmp_path / "layout.json").read_text())
    assert layout["world_size"] == 3 and layout["experts_of_rank"] == [[0, 1, 2, 3]] * 3
