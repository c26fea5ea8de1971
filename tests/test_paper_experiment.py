"""The paper experiment at --scale tiny, end to end: every method trains under the deepspeed
launcher, and every table, plot, config and number comes out (the claims themselves need
--scale small; tiny only proves the pipeline)."""

import json
import math

import pytest

from .corpora import write_stdlib_text
from .launch import run_ranks

FILES = ("results.md", "results.json", "self_slimming.png", "loss_vs_step.png", "k_vs_step.png")
METHODS = (
    "dense",
    "learned",
    "thor",
    "random_fixed",
    "smoe_dropout_linear",
    "smoe_dropout_cosine",
    "smoe_dropout_exponential",
)


@pytest.mark.slow
def test_tiny_scale_writes_every_file_with_finite_numbers_and_resumes_by_skipping(tmp_path):
    data = write_stdlib_text(tmp_path / "text.txt", 300_000)
    out = tmp_path / "out"
    args = ["smoe_ds.experiments.paper", "--out", str(out), "--scale", "tiny", "--data", str(data)]
    proc = run_ranks("python", 1, args, module=True, timeout=900)
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    for name in FILES[2:]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    results = json.loads((out / "results.json").read_text())
    assert list(results) == list(METHODS)
    for name, r in results.items():
        assert sorted(int(k) for k in r["bpb"]) == ([4] if name == "dense" else [1, 2, 4])
        assert all(math.isfinite(v) and 0 < v < 8 for v in r["bpb"].values()), (name, r["bpb"])
        assert r["train_wall_s"] > 0 and r["tokens_per_s"] > 0 and r["history"]
        config = json.loads((out / "configs" / f"{name}.json").read_text())
        assert config["run"]["max_steps"] == 40 and config["moe"]["num_experts"] == 4
    # the schedules end at k = N; the fixed-k methods never move
    assert results["smoe_dropout_linear"]["history"][-1]["k"] == 4
    assert {h["k"] for h in results["random_fixed"]["history"]} == {2}
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in METHODS)
    assert "[7/7] smoe_dropout_exponential: training" in proc.stdout

    again = run_ranks("python", 1, args, module=True, timeout=300)
    assert again.stdout.count("done already, skipped") == len(METHODS)
