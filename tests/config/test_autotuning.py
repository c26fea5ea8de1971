"""DeepSpeed's autotuner runs smoe-train: the config by the flag it passes (a file or base64), each
experiment in its own fresh folder, and ``deepspeed --autotuning tune`` on 2 CPU ranks through
``launch/autotune.sh``, whose best config smoe-train loads unchanged."""

from __future__ import annotations

import base64
import json
import subprocess

import pytest

from smoe_ds.config.schema import ConfigError, config_cli, load_config
from tests.helpers.launch import REPO, rank_env
from tests.helpers.resume_runs import CONFIG

TUNING = {"enabled": True, "fast": True, "start_profile_step": 2, "end_profile_step": 4}
TUNING |= {"max_train_micro_batch_size_per_gpu": 16, "num_tuning_micro_batch_sizes": 2}  # a few experiments


def tuning_config(tmp_path, **run) -> dict:
    raw = json.loads(open(CONFIG).read())
    raw["run"].update({"max_steps": 8, "eval_interval": 0, "log_interval": 1, "final_eval_batches": 1, **run})
    raw["autotuning"] = {**TUNING, "results_dir": str(tmp_path / "results"), "exps_dir": str(tmp_path / "exps")}
    return raw


def test_the_config_comes_by_deepspeed_config_as_a_file_or_as_the_tuners_base64(tmp_path):
    raw = tuning_config(tmp_path)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(raw))
    encoded = base64.urlsafe_b64encode(json.dumps(raw).encode()).decode()  # as deepspeed/autotuning/scheduler.py
    for value in (str(path), encoded):
        cfg = config_cli(["--deepspeed_config", value, "--set", "run.seed=3"], "smoe-train", "")()
        assert cfg.run.seed == 3 and cfg.deepspeed["autotuning"]["end_profile_step"] == 4
    with pytest.raises(ConfigError, match="config file not found: nope.json"):
        load_config("nope.json")
    with pytest.raises(ConfigError, match="the base64 config: invalid JSON"):
        load_config(base64.urlsafe_b64encode(b"{nope").decode())


def test_an_experiment_runs_fresh_in_its_own_folder_and_must_reach_the_profiled_steps(tmp_path):
    raw = tuning_config(tmp_path, out_dir="runs/shared")
    raw["autotuning"]["metric_path"] = str(tmp_path / "results" / "z2_gas1" / "metrics.json")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(raw))
    cfg = load_config(str(path))
    assert cfg.run.out_dir == str(tmp_path / "results" / "z2_gas1" / "smoe_run")
    assert (cfg.run.resume, cfg.run.save_checkpoint, cfg.run.eval_interval) == (False, False, 0)
    assert load_config(str(path), ["autotuning.enabled=false"]).run.out_dir == "runs/shared"
    with pytest.raises(ConfigError, match=r"autotuning.end_profile_step is 4: run.max_steps \(4\) must be larger"):
        load_config(str(path), ["run.max_steps=4"])


@pytest.mark.slow
def test_deepspeed_autotuning_tune_on_two_cpu_ranks_writes_a_best_config_smoe_train_loads(tmp_path):
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(tuning_config(tmp_path)))
    proc = subprocess.run(
        ["bash", "launch/autotune.sh", str(path), "tune"],
        cwd=REPO,
        env=rank_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = tmp_path / "results"
    metrics = {p.parent.name: json.loads(p.read_text()) for p in results.glob("*/metrics.json")}
    assert metrics and all(m["throughput"] > 0 for m in metrics.values()), metrics
    summary = (results / "summary.txt").read_text()
    (row,) = [line for line in summary.splitlines() if line.startswith("| global")]
    best = row.strip("| ").split("|")[-1].strip()  # the tuner's choice, among the experiments that ran
    assert best in metrics, (best, sorted(metrics))
    for name in metrics:  # every experiment trained in its own folder, none resumed another's
        assert (results / name / "smoe_run" / "monitor").is_dir()
        assert "resumed from" not in (results / name / "stdout.log").read_text()
    optimal = load_config(str(results / "ds_config_optimal.json"))  # what smoe-train loads as it is
    assert "autotuning" not in optimal.deepspeed
    assert (
        optimal.deepspeed["train_micro_batch_size_per_gpu"]
        == json.loads((results / best / "ds_config.json").read_text())["train_micro_batch_size_per_gpu"]
    )
