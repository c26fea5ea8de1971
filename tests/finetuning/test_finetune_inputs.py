"""The fine-tuning inputs on their own: labelled files in every format, the validation shards,
and the one-line errors for bad configs and data (no process group needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smoe_ds.checkpoint import META_FILE, CheckpointError, check_resumable, read_meta
from smoe_ds.checkpoint.read import saved_config
from smoe_ds.config.schema import ConfigError, load_config
from smoe_ds.finetuning.config import FinetuneConfig, TaskDataConfig
from smoe_ds.finetuning.labelled_data import eval_shards, load_labelled
from tests.helpers.launch import REPO, run_ranks

CONFIG = str(REPO / "ds_configs" / "finetune_minilm_sst2.json")
REVIEWS = [("a joy to watch", "pos"), ("dull and far too long", "neg"), ("sharp, funny, humane", "pos")] * 4


@pytest.mark.parametrize("n,world,micro", [(1, 2, 4), (7, 2, 3), (8, 2, 4), (10, 4, 2), (3, 4, 8)])
def test_eval_shards_score_every_example_once_with_equal_batch_counts(n, world, micro):
    shards = [eval_shards(n, micro, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of forwards
    scored = [int(i) for s in shards for idx, counts in s for i, c in zip(idx, counts) if c > 0]
    assert sorted(scored) == list(range(n))
    assert all(len(idx) == micro for s in shards for idx, _ in s)


def write_table(path, rows, kind):
    if kind == "csv":
        path.write_text("review,sentiment\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    elif kind == "tsv":
        path.write_text("review\tsentiment\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    else:
        path.write_text("".join(json.dumps({"review": t, "sentiment": y}) + "\n" for t, y in rows))
    return path


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl"])
def test_a_users_file_with_string_labels(tmp_path, kind):
    train = write_table(tmp_path / f"train.{kind}", REVIEWS, kind)
    dev = write_table(tmp_path / f"dev.{kind}", REVIEWS[:3], kind)
    d = TaskDataConfig(path=str(train), validation=str(dev), text_column="review", label_column="sentiment")
    splits = load_labelled(d)
    assert splits.label_names == ["neg", "pos"]
    assert splits.validation["labels"] == [1, 0, 1] and splits.validation["text"][1] == "dull and far too long"
    assert len(splits.train) == len(REVIEWS)


def test_without_a_validation_file_a_seeded_share_is_held_out(tmp_path):
    train = write_table(tmp_path / "train.csv", REVIEWS * 5, "csv")
    d = TaskDataConfig(path=str(train), text_column="review", label_column="sentiment", val_fraction=0.25)
    a, b = load_labelled(d), load_labelled(d)
    assert len(a.validation) == 15 and len(a.train) == 45
    assert a.validation["text"] == b.validation["text"]


def test_a_hub_style_dataset_folder_keeps_its_class_names_and_skips_the_unlabelled_test_split(tmp_path):
    """GLUE's layout, offline: parquet splits with a ClassLabel column, test labels all -1."""
    import datasets

    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])}
    )
    rows = {"sentence": [t for t, _ in REVIEWS], "label": [int(y == "pos") for _, y in REVIEWS]}
    for split, labels in (("train", rows["label"]), ("validation", rows["label"]), ("test", [-1] * len(REVIEWS))):
        ds = datasets.Dataset.from_dict({**rows, "label": labels}, features=features)
        ds.to_parquet(str(tmp_path / f"{split}-00000-of-00001.parquet"))
    splits = load_labelled(TaskDataConfig(path=str(tmp_path), text_column="sentence"))
    assert splits.label_names == ["negative", "positive"]
    assert len(splits.validation) == len(REVIEWS) and splits.validation["labels"][:3] == [1, 0, 1]


def test_an_unreachable_hub_dataset_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ConfigError,
        match="data.path 'glue' is not a local file or folder, and loading it from the Hugging Face hub failed",
    ):
        load_labelled(TaskDataConfig(path="glue", hub_config="sst2"))


@pytest.mark.parametrize(
    "change,message",
    [
        (
            {"text_column": "sentence"},
            "has no column 'sentence' (its columns: review, sentiment); set data.text_column",
        ),
        ({"label_column": "stars"}, "set data.label_column"),
        ({"path": "missing.tsv"}, "data.path not found: missing.tsv"),
        ({"validation": "dev.xml"}, "unknown table format '.xml'"),
        ({"validation": "dev_other.csv"}, "has labels that data.path does not: meh"),
    ],
)
def test_bad_data_is_one_line_naming_the_fix(tmp_path, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)
    write_table(tmp_path / "train.csv", REVIEWS, "csv")
    write_table(tmp_path / "dev_other.csv", [("so-so", "meh")], "csv")
    (tmp_path / "dev.xml").write_text("<x/>")
    d = TaskDataConfig(path="train.csv", text_column="review", label_column="sentiment")
    for key, value in change.items():
        setattr(d, key, value)
    with pytest.raises(ConfigError) as err:
        load_labelled(d)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "sets,message",
    [
        ([], "set hf.model to a local model directory or a hub name"),
        (["hf.model=m", "hf.task=qa"], "hf.task must be one of classification, causal_lm"),
        (["hf.model=m", "hf.weighting=uniform"], "hf.weighting must be one of softmax, rescale"),
        (
            ["hf.model=m", "data.path=t", "hf.task=causal_lm", "data.validation=v"],
            "data.validation is for classification",
        ),
        (["hf.model=m", "moe.ep_size=3"], "moe.num_experts (8) is not divisible by moe.ep_size (3)"),
        (["hf.model=m", "hf.max_len=3"], "unknown config key hf.max_len"),
        # keys of the trainer's sections that a fine-tune does not read are refused, not ignored
        (["hf.model=m", "moe.d_expert=64"], "moe.d_expert is not used by smoe-finetune: an expert's width is"),
        (["hf.model=m", "moe.capacity_factor=1.5"], "moe.capacity_factor is not used by smoe-finetune"),
        (["hf.model=m", "run.eval_batches=4"], "run.eval_batches is not used by smoe-finetune"),
    ],
)
def test_bad_config_is_refused_before_anything_runs(sets, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, ["data.path=t", *sets], cls=FinetuneConfig)
    assert message in str(err.value)


@pytest.mark.parametrize("mode", ["thor", "learned"])
def test_a_hugging_face_model_does_not_convert_to_thor_or_the_learned_router(mode):
    """They fine-tune only models pretrained in that mode by smoe_ds.train
    (tests/finetuning/test_finetune_smoe_export.py)."""
    cfg = load_config(CONFIG, ["data.path=t", "hf.model=m", f"moe.mode={mode}"], cls=FinetuneConfig)
    with pytest.raises(ConfigError, match=f"moe.mode '{mode}' is not available for fine-tuning a Hugging Face model"):
        cfg.check_mode_for_hf_model()


def test_the_cli_refuses_a_missing_model_in_one_line(tmp_path):
    proc = run_ranks(
        "python",
        1,
        [
            "smoe_ds.finetune",
            "--config",
            CONFIG,
            "--set",
            "hf.model=./no/such/model",
            "--set",
            "data.path=x.tsv",
            "--set",
            "moe.ep_size=1",
        ],
        module=True,
        check=False,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("smoe-ds: error:")]
    assert errors == ["smoe-ds: error: ./no/such/model: no such model directory"], proc.stderr


def fine_tune_checkpoint(tmp_path, cfg: FinetuneConfig, world_size: int, ep_size: int) -> Path:
    """A checkpoint folder holding only the meta file a fine-tune's save writes (enough for the checks)."""
    tag_dir = tmp_path / "checkpoints" / "step4"
    tag_dir.mkdir(parents=True)
    meta = {"step": 4, "world_size": world_size, "ep_size": ep_size, "moe_layers": 6, "config": cfg.to_dict()}
    (tag_dir / META_FILE).write_text(json.dumps(meta))
    return tag_dir


def test_a_fine_tune_resumes_only_at_the_layout_it_was_saved_at(tmp_path):
    """DeepSpeed's own loader reads a fine-tune's checkpoint: another world size or ep_size is refused
    in one line before anything loads (this process is world size 1)."""
    saved = load_config(CONFIG, ["data.path=t", "hf.model=m"], cls=FinetuneConfig)  # ep_size 2
    tag_dir = fine_tune_checkpoint(tmp_path, saved, world_size=2, ep_size=2)
    now = load_config(CONFIG, ["data.path=t", "hf.model=m", "moe.ep_size=1"], cls=FinetuneConfig)
    with pytest.raises(CheckpointError) as err:
        check_resumable(now, tag_dir, read_meta(tag_dir))
    message = str(err.value)
    assert "saved at world size 2, ep_size 2, ZeRO-2; a fine-tune resumes only at that layout" in message
    assert "not at world size 1, ep_size 1, ZeRO-2" in message and "\n" not in message
    other_model = load_config(CONFIG, ["data.path=t", "hf.model=other", "moe.ep_size=1"], cls=FinetuneConfig)
    with pytest.raises(CheckpointError, match="hf.model: 'm' in the checkpoint vs 'other' now"):
        check_resumable(other_model, tag_dir, read_meta(tag_dir))


def test_a_fine_tunes_checkpoint_is_not_read_as_a_language_models(tmp_path):
    """smoe-convert and smoe-evaluate read the trainer's checkpoints; a fine-tune's names its export instead."""
    cfg = load_config(CONFIG, ["data.path=t", "hf.model=m"], cls=FinetuneConfig)
    tag_dir = fine_tune_checkpoint(tmp_path, cfg, world_size=2, ep_size=2)
    with pytest.raises(CheckpointError, match="was saved by smoe-finetune: its model is the Hugging Face folder"):
        saved_config(read_meta(tag_dir)["config"], tag_dir)
