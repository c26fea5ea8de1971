"""Labelled data for sequence classification, through the ``datasets`` library.

Sources: a local ``.csv``, ``.tsv``, ``.json``/``.jsonl`` or ``.parquet`` file (train, and
optionally a validation file), or a hub dataset (e.g. ``glue`` with config ``sst2``) or a local
folder laid out like one. Labels
may be integers or strings; they are mapped to ids 0..C-1 (a ClassLabel column keeps its own
names), and the validation labels must be among the training ones.

Every rank reads the same (small) tables; ``smoe_ds.data.train_order`` gives each its disjoint
share of every step, and ``eval_shards`` pads the validation set so that every rank runs the
same number of batches (the MoE layers exchange tokens in each forward) while each example
counts once.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from smoe_ds.config.schema import ConfigError
from smoe_ds.data import load_hub_dataset, load_local_files, looks_like_local_path
from smoe_ds.finetuning.config import TaskDataConfig

# suffix -> (datasets builder, its options). TSV phrases may hold quote characters: no quoting.
TABLE_FORMATS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}


@dataclass
class LabelledSplits:
    train: "datasets.Dataset"  # noqa: F821  columns: text (, text_pair), labels (int ids)
    validation: "datasets.Dataset"  # noqa: F821
    label_names: list[str]
    description: str


def _read_table(path_text: str, key: str):
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.{key} not found: {path_text}")
    fmt = TABLE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"data.{key} {path_text}: unknown table format {path.suffix!r}; use one of {', '.join(TABLE_FORMATS)}"
        )
    builder, options = fmt
    return load_local_files(builder, [str(path)], split="train", **options)


def _read_hub(d: TaskDataConfig):
    ds = load_hub_dataset(d.path, d.hub_config, "data.path")
    # GLUE-style test splits have no labels (-1), so only a validation split is taken as one.
    val_name = next((s for s in ("validation", "validation_matched", "valid", "dev") if s in ds), None)
    return ds["train"], (ds[val_name] if val_name else None)


def _check_columns(ds, d: TaskDataConfig, where: str) -> None:
    wanted = {"text_column": d.text_column, "label_column": d.label_column}
    if d.text_pair_column:
        wanted["text_pair_column"] = d.text_pair_column
    for key, column in wanted.items():
        if column not in ds.column_names:
            raise ConfigError(
                f"{where} has no column {column!r} (its columns: {', '.join(ds.column_names)}); set data.{key}"
            )


def _label_names(train, d: TaskDataConfig) -> list:
    """The label values, in id order: a ClassLabel's names, else the sorted distinct training values."""
    import datasets

    feature = train.features[d.label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = set(train.unique(d.label_column))
    values.discard(None)
    if len(values) < 2:
        raise ConfigError(f"column {d.label_column!r} of data.path has {len(values)} distinct label(s); need 2 or more")
    return sorted(values)


def _standardise(ds, d: TaskDataConfig, label_ids: dict | None, where: str):
    """Columns text (, text_pair) and labels (ids); rows with no text or label dropped."""
    keep = [d.text_column, d.label_column] + ([d.text_pair_column] if d.text_pair_column else [])
    ds = ds.select_columns(keep)
    ds = ds.filter(lambda row: isinstance(row[d.text_column], str) and row[d.label_column] is not None)
    if label_ids is not None:
        unknown = sorted({str(v) for v in ds.unique(d.label_column)} - {str(v) for v in label_ids})
        if unknown:
            raise ConfigError(f"{where} has labels that data.path does not: {', '.join(unknown[:5])}")
        ds = ds.map(lambda row: {"labels": label_ids[row[d.label_column]]}, remove_columns=[d.label_column])
    else:  # a ClassLabel column holds ids already; GLUE marks unlabelled rows with -1
        ds = ds.filter(lambda row: row[d.label_column] >= 0).rename_column(d.label_column, "labels")
    ds = ds.rename_column(d.text_column, "text")
    if d.text_pair_column:
        ds = ds.rename_column(d.text_pair_column, "text_pair")
    if len(ds) == 0:
        raise ConfigError(f"{where} has no rows with both a text and a label")
    return ds


def load_labelled(d: TaskDataConfig) -> LabelledSplits:
    """The configured training and validation examples, labels as ids."""
    import datasets

    path = Path(d.path).expanduser()
    if path.is_file() or (looks_like_local_path(d.path) and not path.is_dir()):
        train, where = _read_table(d.path, "path"), d.path
        val = _read_table(d.validation, "validation") if d.validation else None
    else:  # a hub name, or a local folder laid out like a hub dataset (train-*.parquet, validation-*.parquet, ...)
        if d.validation:
            raise ConfigError("data.validation must be a local file; a hub dataset brings its own validation split")
        (train, val), where = _read_hub(d), f"hub dataset {d.path}" + (f" ({d.hub_config})" if d.hub_config else "")
    _check_columns(train, d, f"data.path {d.path}")
    if val is not None:
        _check_columns(val, d, f"the validation split of {where}")
    names = _label_names(train, d)
    label_ids = (
        None if isinstance(train.features[d.label_column], datasets.ClassLabel) else {v: i for i, v in enumerate(names)}
    )
    train = _standardise(train, d, label_ids, f"data.path {d.path}")
    if val is None:
        if len(train) < 2:
            raise ConfigError(f"data.path {d.path} needs at least 2 rows to hold out a validation set")
        parts = train.train_test_split(test_size=d.val_fraction, seed=d.seed)
        train, val = parts["train"], parts["test"]
    else:
        val = _standardise(val, d, label_ids, f"the validation split of {where}")
    if d.max_train_examples is not None and d.max_train_examples < len(train):
        train = train.shuffle(seed=d.seed).select(range(d.max_train_examples))
    if d.max_eval_examples is not None and d.max_eval_examples < len(val):
        val = val.select(range(d.max_eval_examples))
    description = f"{where}: {len(train)} train / {len(val)} validation examples, {len(names)} classes"
    return LabelledSplits(train, val, [str(n) for n in names], description)


def tokenize(ds, tokenizer, max_length: int):
    """Add the model inputs (input_ids, attention_mask, ...) of each row, truncated to ``max_length``."""
    pair = "text_pair" in ds.column_names

    def encode(rows):
        return tokenizer(rows["text"], rows["text_pair"] if pair else None, truncation=True, max_length=max_length)

    return ds.map(encode, batched=True, remove_columns=[c for c in ("text", "text_pair") if c in ds.column_names])


def collate(ds, indices: torch.Tensor, tokenizer) -> dict[str, torch.Tensor]:
    """The rows ``indices`` [B] of a tokenised dataset as one padded batch: input_ids [B, L], labels [B], ..."""
    rows = ds[indices.tolist()]
    features = [{key: rows[key][i] for key in rows} for i in range(len(indices))]
    return dict(tokenizer.pad(features, return_tensors="pt"))


def eval_shards(
    n_examples: int, micro_batch: int, rank: int, world_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's validation batches as (indices [B], counts [B]) pairs, the same number on every rank.

    Rank r takes examples r, r + W, r + 2W, ...; the shorter shards are topped up by repeating
    their first example with count 0, so the padding runs through the model but is never scored.
    """
    per_rank = -(-n_examples // world_size)
    n_batches = -(-per_rank // micro_batch)
    mine = torch.arange(rank, n_examples, world_size)
    counts = torch.ones(n_batches * micro_batch)
    counts[len(mine) :] = 0
    # fewer examples than ranks: this rank has none of its own, and runs example 0 unscored
    filler = mine[:1] if len(mine) else torch.zeros(1, dtype=torch.long)
    padded = torch.cat([mine, filler.repeat(n_batches * micro_batch - len(mine))])
    return list(zip(padded.split(micro_batch), counts.split(micro_batch)))
