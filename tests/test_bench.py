"""The benchmark runs end to end and its numbers hang together (no timing is asserted)."""

import json
import math

from .launch import run_ranks


def test_bench_tiny_shape_writes_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_ranks(
        "python",
        1,
        [
            "smoe_ds.bench",
            "--d-model",
            "32",
            "--experts",
            "4",
            "--d-expert",
            "16",
            "--tokens",
            "64",
            "--repeats",
            "1",
            "--out",
            str(out),
        ],
        module=True,
        timeout=300,
    )
    assert "stock/ours" in proc.stdout
    result = json.loads(out.read_text())
    (shape,) = result["shapes"]
    assert [r["k"] for r in shape["rows"]] == [1, 2, 4]
    for r in shape["rows"]:
        assert all(math.isfinite(r[key]) and r[key] > 0 for key in ("ours_vs_dense", "stock_vs_dense", "dense_s"))
        if r["k"] > 1:  # DeepSpeed weights a single expert by its full-softmax probability, so k = 1 differs
            assert r["max_abs_diff_vs_stock"] <= 1e-5
    ep = result["expert_parallel"]  # the 2-rank part (ranks spawned by the benchmark itself)
    assert ep["ep_size"] == 2 and [r["k"] for r in ep["rows"]] == [1, 2, 4]
    for r in ep["rows"]:
        assert r["ours_s"] > 0 and r["stock_s"] > 0
        # each token crosses to the other rank at most once: d_model 32 fp32 out with its gates for the
        # 2 experts there, and 32 values back
        assert 0 < r["ours_bytes_per_token"] <= (32 + 2 + 32) * 4
    assert ep["rows"][-1]["stock_bytes_per_token"] > ep["rows"][-1]["ours_bytes_per_token"]
