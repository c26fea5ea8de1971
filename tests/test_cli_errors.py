"""Bad input costs a second: one line naming the problem, exit code 2, nothing written."""

import pytest

from .launch import REPO, run_ranks

CONFIG = str(REPO / "tests" / "configs" / "e2e_tiny.json")

CASES = {
    "experts_not_divisible_by_ep": (
        ["moe.num_experts=6", "moe.ep_size=4"],
        "moe.num_experts (6) is not divisible by moe.ep_size (4)",
    ),
    "world_not_divisible_by_ep": (["moe.ep_size=2"], "the world size (1) is not divisible by moe.ep_size (2)"),
    "k_max_above_n": (["moe.k_schedule.k_max=5"], "moe.k_schedule.k_max (5) must be in [1, num_experts=4]"),
    "k_min_below_1": (["moe.k_schedule.k_min=0"], "moe.k_schedule.k_min (0) must be in [1, num_experts=4]"),
    "unknown_key": (["moe.expert_count=4"], "unknown config key moe.expert_count"),
    "missing_data": (["data.path=/no/such/corpus.txt"], "data.path not found: /no/such/corpus.txt"),
    "negative_lr": (["optimizer.params.lr=-0.001"], "optimizer.params.lr must be >= 0, got -0.001"),
    "zero3_with_moe": (
        ["zero_optimization.stage=3"],
        "zero_optimization.stage 3 is not supported with DeepSpeed's native MoE",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_one_line_exit_2_nothing_written(tmp_path, case):
    sets, message = CASES[case]
    out = tmp_path / "run"
    sets = ["moe.ep_size=1", *sets]  # one process: only the world-size case asks for more ranks
    args = ["smoe_ds.train", "--config", CONFIG, "--set", f"run.out_dir={out}"] + sum([["--set", s] for s in sets], [])
    proc = run_ranks("python", 1, args, module=True, check=False, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("smoe-ds: error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists()


def test_bad_config_under_the_deepspeed_launcher_exits_nonzero(tmp_path):
    out = tmp_path / "run"
    args = [
        "smoe_ds.train",
        "--config",
        CONFIG,
        "--set",
        f"run.out_dir={out}",
        "--set",
        "moe.ep_size=4",
        "--set",
        "moe.num_experts=8",
        "--set",
        "moe.k_schedule.k_max=8",
    ]
    proc = run_ranks("deepspeed", 2, args, module=True, check=False, timeout=300)
    assert proc.returncode != 0
    combined = proc.stdout + proc.stderr
    assert combined.count("smoe-ds: error: the world size (2) is not divisible by moe.ep_size (4)") == 1
    assert not out.exists()


def test_missing_config_file_and_bad_json(tmp_path):
    proc = run_ranks("python", 1, ["smoe_ds.train", "--config", str(tmp_path / "none.json")], module=True, check=False)
    assert proc.returncode == 2 and "smoe-ds: error: config file not found" in proc.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{\n "optimizer": {\n}\n "model": 1}')
    proc = run_ranks("python", 1, ["smoe_ds.train", "--config", str(bad)], module=True, check=False)
    assert proc.returncode == 2 and "invalid JSON at line 4" in proc.stderr
