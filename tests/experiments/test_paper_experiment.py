"""The paper experiment: its method table follows the paper's recipe, and at --scale tiny it runs
end to end under the deepspeed launcher, with seeds, and every table, plot, config and verdict
comes out (the claims themselves need --scale overparam; tiny only proves the pipeline). Its
learned and THOR checkpoints are then fine-tuned in their own mode (issue 15)."""

import copy
import json
import math

import pytest
import torch

from smoe_ds.config.schema import config_from_dict
from smoe_ds.experiments import factors
from smoe_ds.experiments.corpus import cut_at_break, write_slice
from smoe_ds.experiments.methods import SCALES, build_config, methods
from smoe_ds.experiments.report import compare
from smoe_ds.moe.schedule import active_k
from tests.helpers.corpora import write_stdlib_text
from tests.helpers.launch import run_ranks
from tests.helpers.smoe_finetune_runs import TOL, engine_rows, export_losses_on_dev, finetune

FILES = ("results.md", "results.json", "self_slimming.png", "val_vs_time.png", "loss_vs_step.png")
ONE_PER_MODE = ("dense", "learned", "thor", "random_fixed", "smoe_dropout_linear")


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_every_method_uses_the_papers_recipe_and_smoe_dropout_grows_k_from_half_to_all_over_the_run(scale):
    steps, n = SCALES[scale]["steps"], SCALES[scale]["moe"]["num_experts"]
    for method in methods(n, steps):
        raw = build_config(scale, method, None, "unused", seed=3)
        assert raw["optimizer"]["type"] == "Adam" and raw["optimizer"]["params"]["weight_decay"] == 0.0
        assert raw["model"]["dropout"] == 0.1 and raw["model"]["init_seed"] == 3 and raw["run"]["seed"] == 3
        assert raw["data"]["seed"] == 0  # the same validation text for every seed
        cfg = config_from_dict(raw).resolve()
        ks = [active_k(cfg, step) for step in range(steps)]
        if method == "smoe_dropout_linear_rsqrt_router":
            assert cfg.moe.router_init_std is None
        else:
            assert cfg.moe.router_init_std == 0.02
        if method.startswith("smoe_dropout"):
            first = 1 if method.endswith("from1") else n // 2
            assert ks[0] == first and ks[-1] == n and ks == sorted(ks), method
            ramp = cfg.moe.k_schedule  # the ramp is the whole run, not its first 3/4
            assert (ramp.start_step, ramp.end_step, ramp.k_max) == (0, steps, n), method
        else:
            assert set(ks) == {{"dense": n, "thor": 1}.get(method, 2)}, method
    linear = [
        active_k(config_from_dict(build_config(scale, "smoe_dropout_linear", None, "x")).resolve(), s)
        for s in (0, steps // 2, steps - 1)
    ]
    assert linear == [n // 2, round(n * 3 / 4), n]


def test_the_paper_scale_is_table_1s_model_and_batch():
    s = SCALES["paper"]
    assert s["model"] == {"d_model": 256, "n_layers": 4, "n_heads": 8, "block_size": 512}
    assert (s["moe"]["num_experts"], s["moe"]["d_expert"], s["micro_batch"], s["lr"]) == (16, 512, 22, 2.5e-4)
    assert s["steps"] == 400_000


def test_each_factor_changes_only_its_keys_of_the_default_job_and_methods_differ_only_in_mode():
    base = {m: factors.build_config("base", m, "corpus.txt", "out", seed=1) for m in factors.METHODS}
    assert base["smoe_dropout_linear"]["moe"]["mode"] == "smoe_dropout" and base["dense"]["moe"]["mode"] == "dense"
    assert base["smoe_dropout_linear"]["moe"]["router_seed"] == 1235 and base["dense"]["model"]["init_seed"] == 1
    for factor, overrides in factors.FACTORS.items():
        for method in factors.METHODS:
            raw = factors.build_config(factor, method, "corpus.txt", "out", seed=1)
            cfg = config_from_dict(copy.deepcopy(raw)).resolve()  # a valid trainer config
            changed = {
                key
                for key in ("moe.d_expert", "model.dropout", "run.max_steps", "moe.ep_size")
                if _get(raw, key) != _get(base[method], key)
            }
            assert changed == set(overrides), (factor, method, changed)
            steps = cfg.run.max_steps
            if method == "smoe_dropout_linear":  # k 4 -> 8 over the whole run, whatever its length
                assert active_k(cfg, 0) == 4 and active_k(cfg, steps - 1) == 8
            assert cfg.run.eval_interval == steps // factors.EVALUATIONS and cfg.data.path == "corpus.txt"
    assert factors.FACTORS["all"] == {
        k: v for f in ("width", "dropout", "length", "ep_size") for k, v in factors.FACTORS[f].items()
    }


def _get(raw: dict, dotted: str):
    node = raw
    for part in dotted.split("."):
        node = node.get(part, {}) if isinstance(node, dict) else None
    return node


def test_the_corpus_slice_ends_at_a_paragraph_break_and_is_at_most_the_limit(tmp_path):
    text = "".join(f"para {i}\nline two of {i}\n\n" for i in range(1000))
    src = tmp_path / "in.txt"
    src.write_text(text)
    out, written, available = write_slice(str(src), 5000, tmp_path / "slice.txt")
    sliced = out.read_text()
    assert written == len(sliced.encode()) <= 5000 and available == len(text.encode())
    assert text.startswith(sliced) and sliced.endswith("\n\n") and written > 4900
    assert cut_at_break("no breaks here at all", 5) == "no br"


def test_a_difference_counts_only_beyond_two_standard_errors():
    assert compare([1.0, 1.1, 0.9], [2.0, 2.1, 1.9])["significant"]
    assert not compare([1.0, 1.5, 0.5], [1.2, 1.7, 0.7])["significant"]
    assert compare([1.0], [2.0])["se"] is None and not compare([1.0], [2.0])["significant"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny experiment, one run per mode (2 ranks, ep_size 2, ZeRO-2), then smoe_dropout_linear
    again with seeds 0 and 1: (its folder, the launches' outputs, the first launch's arguments)."""
    tmp = tmp_path_factory.mktemp("paper")
    data = write_stdlib_text(tmp / "text.txt", 300_000)
    out = tmp / "out"
    base = ["smoe_ds.experiments.paper", "--out", str(out), "--scale", "tiny", "--data", str(data)]
    first = base + ["--methods", ",".join(ONE_PER_MODE), "--max-bytes", "100000"]
    proc = run_ranks("python", 1, first, module=True, timeout=900)
    seeds = run_ranks("python", 1, base + ["--methods", "smoe_dropout_linear", "--seeds", "0,1"], module=True)
    return out, proc, seeds, first


@pytest.mark.slow
def test_tiny_scale_runs_with_seeds_writes_every_file_and_resumes_by_skipping(tiny_run):
    out, proc, seeds, first = tiny_run
    assert "[5/5] smoe_dropout_linear seed 0: training" in proc.stdout
    assert "corpus: the first " in proc.stdout and (out / "corpus.txt").stat().st_size <= 100_000
    assert seeds.stdout.count("done already, skipped") == 1 and "[2/2] smoe_dropout_linear seed 1" in seeds.stdout
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    for name in FILES[2:]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["runs"]) == sorted(ONE_PER_MODE)
    assert sorted(results["runs"]["smoe_dropout_linear"]) == ["0", "1"] and list(results["runs"]["thor"]) == ["0"]
    for name, runs in results["runs"].items():
        for seed, r in runs.items():
            assert sorted(int(k) for k in r["bpb"]) == ([4] if name == "dense" else [1, 2, 4])
            assert all(math.isfinite(v) and 0 < v < 8 for v in r["bpb"].values()), (name, r["bpb"])
            assert r["train_wall_s"] > 0 and r["tokens_per_s"] > 0 and r["history"]
            # learned is validated at its fixed k only during training; the others also at k = N
            assert bool(r["val_curve"]) == (name != "learned"), name
            assert all(c["train_wall_s"] <= r["train_wall_s"] + 1e-6 for c in r["val_curve"])
            config = json.loads((out / "configs" / f"{name}_seed{seed}.json").read_text())
            assert config["run"]["max_steps"] == 40 and config["model"]["init_seed"] == int(seed)
            # 1/N weighting at k = N where the router's softmax weights the experts
            assert (r["bpb_uniform"] is not None) == (name in ("smoe_dropout_linear", "random_fixed")), name
    summary = results["summary"]["smoe_dropout_linear"]
    assert summary["bpb"]["4"][2] == 2 and summary["bpb"]["4"][1] is not None  # mean, std, n over 2 seeds
    assert [c["claim"][:2] for c in results["claims"]] == ["1.", "2.", "3.", "4.", "5."]
    assert all(c["verdict"] in ("held", "not held", "inconclusive") for c in results["claims"])
    # the schedule ends at k = N; the fixed-k methods never move
    assert results["runs"]["smoe_dropout_linear"]["0"]["history"][-1]["k"] == 4
    assert {h["k"] for h in results["runs"]["random_fixed"]["0"]["history"]} == {2}
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in ONE_PER_MODE) and "| **" in table

    again = run_ranks("python", 1, first, module=True, timeout=300)
    assert again.stdout.count("done already, skipped") == len(ONE_PER_MODE)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["learned", "thor"])
def test_learned_and_thor_checkpoints_fine_tune_sharded_and_export_whole(tmp_path, tiny_run, mode):
    """The paper's two other routers, pretrained above, fine-tuned (2 ranks, ep_size 2) in their own
    mode: the learned baseline is DeepSpeed's own MoE, whose experts are numbered per rank (rank 1's
    expert 0 is global expert 2), and THOR trains on two passes with their consistency loss.

    At learning rate 0 nothing moves, so the export, gathered back from both ranks, must hold exactly
    the pretrained weights; and it must score the dev set as the engine did (THOR at k = N only,
    where its routing is not random)."""
    from safetensors.torch import load_file

    ckpt = tiny_run[0] / "runs" / mode / "seed0" / "checkpoints"
    out = tmp_path / "ft"  # given the checkpoint folder, the fine-tune exports it into ft/pretrained first
    finetune(out, ckpt, f"moe.mode={mode}", "run.max_steps=2", "optimizer.params.lr=0")

    before = load_file(out / "pretrained" / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    assert {k for k in after if not k.startswith("lm.")} == {"score.weight", "score.bias"}
    assert set(before) <= set(after)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    if mode == "learned":
        assert any(".deepspeed_experts.3." in name for name in before)  # experts 2 and 3 came from rank 1

    rows = engine_rows(out)
    history = json.loads((out / "train_summary.json").read_text())["history"]
    assert history and all(math.isfinite(h["loss"]) for h in history)
    checked = [k for k in rows if mode == "learned" or k == 4]
    assert checked
    for k, (loss, _) in export_losses_on_dev(out / "model", checked).items():
        assert abs(loss - rows[k]["loss"]) <= TOL, k
