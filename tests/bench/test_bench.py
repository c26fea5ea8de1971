"""The benchmark runs end to end and its numbers hang together (no timing is asserted)."""

import json
import math

import pytest

from smoe_ds.bench import e2e as bench_e2e
from smoe_ds.bench import memory as bench_memory
from smoe_ds.config.schema import load_config
from smoe_ds.models.lm import build_model
from smoe_ds.moe.layer import moe_layers
from smoe_ds.training.step_breakdown import OTHER, PHASES
from tests.helpers.launch import REPO, run_ranks


def test_bench_tiny_shape_writes_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_ranks(
        "python",
        1,
        [
            "smoe_ds.bench.layer",
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
        # moving the weights instead: this rank's 2 experts (w_in and w_out, 16 x 32 each, fp32) to
        # the other rank, whatever k, over its 32 tokens
        assert r["weights_s"] > 0 and r["weights_bytes_per_token"] == 2 * 2 * 16 * 32 * 4 / 32
    assert ep["rows"][-1]["stock_bytes_per_token"] > ep["rows"][-1]["ours_bytes_per_token"]


def test_bench_e2e_runs_dense_and_smoe_dropout_with_the_overrides_and_writes_json(tmp_path):
    out = tmp_path / "e2e"
    tiny = ["--steps", "3", "--d-model", "32", "--layers", "1", "--experts", "4", "--d-expert", "16"]
    tiny += ["--block-size", "32", "--batch", "2", "--config", "tests/configs/e2e_tiny.json"]
    proc = run_ranks(
        "python", 1, ["smoe_ds.bench.e2e", *tiny, "--set", "run.log_interval=1", "--out", str(out)], module=True
    )
    assert "SMoE-Dropout wall time / dense" in proc.stdout
    result = json.loads((out / "bench_e2e.json").read_text())
    assert [r["mode"] for r in result["runs"]] == ["dense", "smoe_dropout"]
    for r in result["runs"]:
        assert r["train_wall_s"] > 0 and r["tokens_per_s"] > 0 and math.isfinite(r["val_loss_at_k_N"])
        config = json.loads((out / r["mode"] / "config.json").read_text())
        assert config["run"]["log_interval"] == 1 and config["run"]["max_steps"] == 3
    assert result["wall_ratio_smoe_over_dense"] > 0


def test_bench_e2e_with_two_ranks_breaks_each_step_into_phases_and_collectives(tmp_path):
    """dense, ep_size 1 and ep_size 2 under the deepspeed launcher (tests/configs/e2e_tiny.json: 2 MoE
    layers). Only structure is checked, never how long anything took (2 shared cores): every phase
    of the step is measured, every collective is timed inside its phase (so within its phase's
    time), and the dispatcher's collectives must appear exactly where
    experts are sharded: per step, per layer, one dispatch and one combine forward, and each of the
    two again backward, and a count exchange only until full routes start (k > N/2 = 2 from step 4
    of 12 on; the naive-loop tests cover the counted path at every k). Moving the weights instead:
    one all-gather of the experts forward and one reduce-scatter of their gradients backward per
    layer, and no other collective of ours."""
    out = tmp_path / "e2e"
    args = ["--ranks", "2", "--steps", "12", "--config", "tests/configs/e2e_tiny.json", "--out", str(out)]
    args += ["--full-route-dispatch", "all_to_all", "--ep-exchange", "tokens,weights"]
    proc = run_ranks("python", 1, ["smoe_ds.bench.e2e", *args], module=True)
    assert "ep_size 2 / ep_size 1" in proc.stdout and "moe_dispatch_grad" in proc.stdout
    result = json.loads((out / "bench_e2e.json").read_text())
    runs = {r["name"]: r for r in result["runs"]}
    sharded = ["smoe_dropout ep_size 2 all_to_all", "smoe_dropout ep_size 2 weights"]
    assert list(runs) == ["dense", "smoe_dropout ep_size 1", *sharded]
    layers = 2
    for name, run in runs.items():
        b = run["step_breakdown"]
        assert b["measured_steps"] == 10 and b["warmup_steps"] == 2
        assert set(b["phases"]) == {*PHASES, OTHER}, name
        assert all(b["phases"][phase]["total"]["ms"] > 0 for phase in PHASES), name
        for collective, c in b["collectives"].items():
            phase = collective.split("/")[0]
            assert 0 <= c["ms"] <= b["phases"][phase]["total"]["ms"] * 1.001, (name, collective)
        ours = {n: c["calls_per_step"] for n, c in b["collectives"].items() if "moe_" in n}
        if name.endswith("weights"):
            assert ours == {"forward/moe_experts": layers, "backward/moe_experts_grad": layers}
        elif run["ep_size"] == 2:
            counts = ours.pop("forward/moe_counts", 0)
            assert 0 < counts < layers
            assert ours == {
                "forward/moe_dispatch": layers,
                "forward/moe_combine": layers,
                "backward/moe_dispatch_grad": layers,
                "backward/moe_combine_grad": layers,
            }
        else:
            assert ours == {}
        # ZeRO-2 reduces the gradients in backward on every variant (2 ranks of data parallelism)
        assert any(n.startswith("backward/") and "moe_" not in n for n in b["collectives"]), name
    assert result["wall_ratio_ep2_over_ep1"] > 0 and result["wall_ratio_smoe_over_dense"] > 0
    assert all(result[f"wall_ratio {n} / ep_size 1"] > 0 for n in sharded)


def test_bench_overlap_times_every_mode_on_two_spawned_ranks_and_writes_json(tmp_path):
    out = tmp_path / "overlap"
    args = ["--tokens", "16", "--columns", "8", "--compute-ms", "0.2", "--iters", "3", "--rounds", "1"]
    proc = run_ranks("python", 1, ["smoe_ds.bench.overlap", *args, "--out", str(out)], module=True)
    assert "overlapped / in turn" in proc.stdout
    ms = json.loads((out / "bench_overlap.json").read_text())["ms"]
    assert set(ms) == {"all_to_all", "compute", "in turn", "overlapped", "all_gather + reduce_scatter"}
    assert all(v > 0 for v in ms.values())


def test_bench_memory_reads_each_ranks_share_from_the_engines_at_zero2_and_zero3(tmp_path):
    """2 ranks at ep_size 2 (tests/configs/e2e_tiny.json): ZeRO-2 holds the whole model less the other
    rank's experts, ZeRO-3 its own experts and half the non-expert weights (up to ZeRO-3's padding of
    each weight to a multiple of the 2 ranks: at most one element per weight), and fp32 AdamW keeps
    two moments the size of this rank's master partition. smoe-tune's memory model predicts each
    variant's model state within 10 %."""
    out = tmp_path / "memory"
    args = ["--ranks", "2", "--steps", "1", "--variants", "ZeRO-2,ZeRO-3", "--config", "tests/configs/e2e_tiny.json"]
    proc = run_ranks("python", 1, ["smoe_ds.bench.memory", *args, "--out", str(out)], module=True)
    assert "model state per rank, 2 ranks" in proc.stdout and "ZeRO-3" in proc.stdout
    result = json.loads((out / "bench_memory.json").read_text())
    ranks = result["ranks"]
    assert sorted(ranks) == ["ZeRO-2", "ZeRO-3"] and all(len(r) == 2 for r in ranks.values())
    for name, variant in ranks.items():
        measured = bench_memory.largest_state(variant)
        assert abs(result["predicted_model_state"][name] - measured) <= 0.10 * measured, (name, measured)
    for variant in ranks.values():
        for r in variant:
            assert r["optimizer_moments"] == 2 * r["master_weights"] > 0 and r["peak_rss"] > 0
    # Each rank's parameters: every weight under ZeRO-2 (its own experts only), and under ZeRO-3 its
    # partition: with ep_size 2 on 2 ranks the experts are not split further (each expert-data-parallel
    # group is one rank), so only the non-expert half goes. The model's bytes come from building it
    # here (fp32); measured: ZeRO-2 266,752 bytes, experts 65,536, ZeRO-3 166,144 = 65,536 + 201,216 / 2.
    cfg = load_config(str(REPO / "tests" / "configs" / "e2e_tiny.json"))
    model = build_model(cfg.model, cfg.moe, ep_rank=0)
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    experts = [p for layer in moe_layers(model) for p in layer.deepspeed_moe.experts.parameters()]
    expert_bytes = sum(p.numel() * p.element_size() for p in experts)
    padding = 4 * (len(list(model.parameters())) - len(experts))  # one fp32 element per partitioned weight
    for rank in range(2):
        z2, z3 = ranks["ZeRO-2"][rank]["parameters"], ranks["ZeRO-3"][rank]["parameters"]
        assert z2 == whole and 0 < expert_bytes < whole, (z2, whole, expert_bytes)
        assert 0 <= 2 * (z3 - expert_bytes) - (z2 - expert_bytes) <= 2 * padding, (z2, z3, expert_bytes)
    # and the master partitions are the same size at both stages (ZeRO-2 splits the optimizer the same way)
    assert abs(ranks["ZeRO-2"][0]["master_weights"] - ranks["ZeRO-3"][0]["master_weights"]) <= 64 * 4


def test_bench_packing_times_both_constructions_which_agree(tmp_path):
    """The dispatcher's packed full-route exchange and the repeat + cat construction it replaced
    give the same outputs and gradients on 2 spawned ranks; both are timed."""
    out = tmp_path / "packing"
    args = ["--tokens", "24", "--d-model", "8", "--experts", "4", "--iters", "3", "--rounds", "1"]
    proc = run_ranks("python", 1, ["smoe_ds.bench.packing", *args, "--out", str(out)], module=True)
    assert "packed / repeat + cat" in proc.stdout
    result = json.loads((out / "bench_packing.json").read_text())
    assert set(result["ms"]) == {"packed", "repeat + cat"} and all(v > 0 for v in result["ms"].values())
    assert result["max_abs_difference"] <= 1e-6


@pytest.mark.parametrize("bench", [bench_e2e, bench_memory])
def test_a_trainer_bench_refuses_a_folder_of_earlier_results(bench, tmp_path, capsys):
    """The trainer resumes from what it finds: rerun into an earlier bench's folder it would time
    nothing and report the old figures as new. Refused in one line, before anything runs."""
    (tmp_path / "bench_e2e.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--out", str(tmp_path), "--steps", "2"])
    assert exit_.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == f"smoe-ds: error: --out {tmp_path} already holds results; choose a new folder"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_e2e.json"]
