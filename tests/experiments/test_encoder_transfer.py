"""python -m smoe_ds.experiments.encoder_transfer --scale tiny on a copy of ../shared/data's layout made
of the test fixtures: both encoders pretrained and exported, a math word problem fold fine-tuned
from the SMoE-Dropout export at k = N/2 (the variants differ only in their configs' k and export,
checked here without running; each launch costs about 15 s of CPU), the report, and a rerun that
skips everything done."""

import json
import shutil

from tests.helpers.corpora import SENTIMENT
from tests.helpers.launch import REPO, run_ranks

TINY_MWP = REPO / "tests" / "data" / "mwp" / "tiny.csv"


def test_tiny_scale_pretrains_both_encoders_fine_tunes_from_the_export_and_resumes(tmp_path):
    data = tmp_path / "data"
    fold = data / "mwp" / "cv_asdiv-a" / "fold0"
    fold.mkdir(parents=True)
    for name in ("train.csv", "dev.csv"):
        shutil.copy(TINY_MWP, fold / name)
    shutil.copytree(SENTIMENT, data / "sst2")
    out = tmp_path / "out"
    args = ["smoe_ds.experiments.encoder_transfer", "--out", str(out), "--data", str(data), "--scale", "tiny"]
    args += ["--sets", "asdiv-a", "--folds", "0", "--seeds", "0", "--variants", "smoe_dropout_k2", "--ranks", "1"]
    first = run_ranks("python", 1, args, module=True, timeout=600)

    corpus = (out / "corpus.txt").read_text()
    dev = [line.split("\t")[0].strip() for line in (SENTIMENT / "dev.tsv").read_text().splitlines()[1:]]
    assert "number0" not in corpus and not any(f"\n{s}\n" in f"\n{corpus}\n" for s in dev)
    configs = {e: json.loads((out / "configs" / f"pretrain_{e}.json").read_text()) for e in ("dense", "smoe_dropout")}
    assert configs["dense"]["model"] == configs["smoe_dropout"]["model"]  # equal parameters, steps and data
    assert configs["dense"]["run"]["max_steps"] == configs["smoe_dropout"]["run"]["max_steps"] == 3
    assert configs["smoe_dropout"]["moe"]["router_init_std"] == 0.02
    for encoder in ("dense", "smoe_dropout"):
        export = json.loads((out / "pretrain" / encoder / "export" / "config.json").read_text())
        assert export["model"]["objective"] == "masked_lm" and export["moe"]["mode"] == encoder
    found = json.loads((out / "results.json").read_text())
    assert list(found["asdiv-a"]) == ["smoe_dropout_k2"] and len(found["asdiv-a"]["smoe_dropout_k2"]) == 1
    half = json.loads((out / "configs" / "asdiv-a_fold0_smoe_dropout_k2_seed0.json").read_text())
    assert half["moe"]["k_schedule"] == {"kind": "linear", "k_min": 2, "k_max": 2} and half["run"]["eval_ks"] == [2]
    assert half["hf"]["model"] == str(out / "pretrain" / "smoe_dropout" / "export")
    run = out / "runs" / "asdiv-a" / "fold0" / "smoe_dropout_k2" / "seed0"
    assert (run / "model" / "solver.json").is_file() and not (run / "checkpoints").exists()  # finished: no resume
    table = (out / "results.md").read_text()
    assert "| asdiv-a |" in table and "+1.03" in table
    assert "| smoe_dropout | 4 |" in table  # the pretraining's table at k = N
    assert "[1/1, " in first.stdout  # progress: fine-tune i of n, and the time so far

    again = run_ranks("python", 1, args, module=True, timeout=300)
    assert again.stdout.count("done already, skipped") == 3  # 2 pretrainings, 1 fine-tune
    (out / "results.md").unlink()
    only = run_ranks(
        "python", 1, [*args[:5], "--sets", "asdiv-a", "--folds", "0", "--report-only"], module=True, timeout=120
    )
    assert "skipped" not in only.stdout and (out / "results.md").read_text() == table

    # A finished run counts only for the config it ran: changed, it is refused, not silently kept.
    recorded = out / "configs" / "asdiv-a_fold0_smoe_dropout_k2_seed0.json"
    changed = json.loads(recorded.read_text())
    changed["optimizer"]["params"]["lr"] *= 2
    recorded.write_text(json.dumps(changed))
    refused = run_ranks("python", 1, args, module=True, timeout=300, check=False)
    assert refused.returncode != 0
    assert "was fine-tuned with another config (differs in optimizer.params.lr)" in refused.stderr


def test_every_variant_fine_tunes_its_encoder_densely_at_a_fixed_k(tmp_path):
    """The three variants' configs, built without running: the dense encoder at its one width, the
    SMoE-Dropout encoder at k = N and N/2; every weight trained, steps from the epochs."""
    from smoe_ds.experiments.encoder_transfer import SCALES, finetune_config, variants

    exports = {}
    for encoder in ("dense", "smoe_dropout"):
        exports[encoder] = tmp_path / encoder
        exports[encoder].mkdir()
        (exports[encoder] / "config.json").write_text(json.dumps({"moe": {"mode": encoder, "num_experts": 8}}))
    got = {}
    for name, (encoder, k) in variants(8).items():
        config = finetune_config("mwp", encoder, k, exports[encoder], TINY_MWP, TINY_MWP, tmp_path, 1, 2, SCALES["cpu"])
        got[name] = (config["moe"]["mode"], config["moe"]["k_schedule"]["k_min"], config["moe"]["k_schedule"]["k_max"])
        assert config["hf"]["model"] == str(exports[encoder]) and config["run"]["eval_ks"] == [k]
        assert config["run"]["max_steps"] == 4  # 16 epochs of 8 problems, 16 x 2 ranks a step
        assert config["optimizer"]["params"]["lr"] == 1e-3  # the math sets' own learning rate
    sst2 = finetune_config("sst2", "dense", 8, exports["dense"], TINY_MWP, TINY_MWP, tmp_path, 1, 2, SCALES["cpu"])
    assert sst2["optimizer"]["params"]["lr"] == 2e-4
    assert got == {
        "dense": ("dense", 8, 8),
        "smoe_dropout_k8": ("smoe_dropout", 8, 8),
        "smoe_dropout_k4": ("smoe_dropout", 4, 4),
    }


def test_a_gain_gets_a_verdict_only_beyond_two_standard_errors_and_from_three_pairs():
    """The report's gain cells, from hand-made runs: paired by (fold, seed), unpaired runs left out."""
    from smoe_ds.experiments.encoder_transfer import _gain_cell, paired_gain

    def runs(*accuracies):
        return [{"fold": "fold0", "seed": seed, "accuracy": a} for seed, a in enumerate(accuracies)]

    dense = runs(50.0, 50.0, 50.0, 50.0)
    assert paired_gain(runs(51.0, 52.0, 53.0), dense) == (2.0, 1.0 / 3**0.5, 3)
    assert _gain_cell(paired_gain(runs(51.0, 52.0, 53.0), dense)) == "+2.00 ± 1.15: SMoE better"
    assert _gain_cell(paired_gain(runs(47.0, 49.0, 51.0), dense)) == "-1.00 ± 2.31: inconclusive"
    assert _gain_cell(paired_gain(runs(45.0, 46.0, 47.0, 46.0), dense)).endswith(": dense better")
    assert _gain_cell(paired_gain(runs(52.0, 53.0), dense)) == "+2.50 ± 1.00 (2 pairs: too few for a verdict)"
    assert _gain_cell(paired_gain(runs(52.0), dense)) == "+2.00 (1 pair: no verdict)"
    assert _gain_cell(paired_gain(runs(52.0), [])) == ""
