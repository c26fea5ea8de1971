"""Corpus loading (via ``datasets``), tokenisation, packing into blocks, and per-rank sharding.

Sources, by ``data.path``:
- ``None``: the embedded default corpus, the Python standard library's ``.py`` sources of the
  running interpreter (tests and site-packages excluded). Every machine with Python has it.
- a local text file: its paragraphs are the documents;
- a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file: each row is a document, its text in
  the column ``data.text_column`` (default ``text``);
- a local folder: each text file in it is a document;
- anything else: a Hugging Face hub dataset name, loaded with ``datasets.load_dataset``.

The embedded default's byte streams are cached on disk (``stdlib_streams``; ``cache_dir``).

Documents are split into train and validation deterministically: by a hash of each file's
relative path for folders (so the split never depends on the file count or order), and by
``Dataset.train_test_split(seed=data.seed)`` for a single file's paragraphs or a hub dataset
without a validation split.

Tokens are UTF-8 bytes (vocabulary 256) unless ``data.tokenizer`` names a local Hugging
Face tokenizer. Text files are decoded as UTF-8 in both cases (bytes are the text's UTF-8
encoding), so a file that is not UTF-8 is an error naming the file and the offset of its first
bad byte. The token stream is packed into non-overlapping blocks of block_size + 1
tokens; a block gives the input ``x = block[:-1]`` and the target ``y = block[1:]``.
"""

from __future__ import annotations

import codecs
import itertools
import os
import shutil
import sys
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smoe_ds.config.schema import ConfigError, DataConfig

STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text", ".tsv", ".csv", ".json", ".jsonl"}
# A single data.path file with one of these suffixes is a table: one document per row, in data.text_column.
# (Inside a folder, such files are read as plain text documents, like every file there.)
TABLE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Corpus:
    """Packed token blocks for training and validation."""

    train_blocks: torch.Tensor  # [M_train, block_size + 1], int64
    val_blocks: torch.Tensor  # [M_val, block_size + 1], int64
    vocab_size: int
    bytes_per_token: float  # UTF-8 bytes per token in the validation text; 1.0 for bytes
    description: str


# -- finding the documents ----------------------------------------------------------------


def stdlib_files() -> tuple[Path, list[Path]]:
    """The running interpreter's standard-library sources, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not STDLIB_EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    return root, files


def folder_files(root: Path) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise ConfigError(f"data.path {root} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
    return files


def split_files_by_hash(root: Path, files: list[Path], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split of files by a hash of their relative paths."""
    train, val = [], []
    for f in files:
        bucket = zlib.crc32(str(f.relative_to(root)).encode()) % 10_000
        (val if bucket < val_fraction * 10_000 else train).append(str(f))
    if not val or not train:  # tiny folders: keep both splits non-empty
        if len(files) < 2:
            raise ConfigError(f"data.path {root} needs at least 2 files to split off a validation set")
        train, val = [str(f) for f in files[:-1]], [str(files[-1])]
    return train, val


def looks_like_local_path(path: str) -> bool:
    suffix = Path(path).suffix.lower()
    return path.startswith(("/", ".", "~")) or suffix in TEXT_SUFFIXES | set(TABLE_BUILDERS) or os.sep * 2 in path


def load_text_splits(cfg: DataConfig):
    """A ``datasets.DatasetDict`` with ``train`` and ``validation`` splits and a ``text`` column."""
    if cfg.path is None:
        root, files = stdlib_files()
        train, val = split_files_by_hash(root, files, cfg.val_fraction)
        return _load_local_documents({"train": train, "validation": val})
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        train, val = split_files_by_hash(path, folder_files(path), cfg.val_fraction)
        return _load_local_documents({"train": train, "validation": val})
    if path.is_file():
        if path.stat().st_size == 0:
            raise ConfigError(f"data.path {path} is empty")
        if path.suffix.lower() in TABLE_BUILDERS:
            return _split_documents(_load_table(path, cfg.text_column), path, "rows", cfg)
        ds = load_local_files("text", [str(path)], split="train", sample_by="paragraph")
        return _split_documents(ds, path, "paragraphs", cfg)
    if looks_like_local_path(cfg.path):
        raise ConfigError(f"data.path not found: {cfg.path}")
    return _load_hub(cfg)


def _split_documents(ds, path: Path, what: str, cfg: DataConfig):
    """Train/validation split of one file's documents (``text`` column), empty ones dropped."""
    import datasets

    ds = ds.filter(lambda row: bool(row["text"] and row["text"].strip()))
    if len(ds) < 2:
        raise ConfigError(f"data.path {path} needs at least 2 non-empty {what} to split off a validation set")
    parts = ds.train_test_split(test_size=cfg.val_fraction, seed=cfg.seed)
    return datasets.DatasetDict(train=parts["train"], validation=parts["test"])


def _load_local_documents(files: dict):
    return load_local_files("text", files, sample_by="document")


def _load_table(path: Path, column: str):
    """One ``.json``/``.jsonl``/``.csv``/``.parquet`` file; its ``column`` becomes the ``text`` column."""
    import datasets

    ds = load_local_files(TABLE_BUILDERS[path.suffix.lower()], [str(path)], split="train")
    if column not in ds.column_names:
        raise ConfigError(
            f"data.path {path} has no column {column!r} (its columns: {', '.join(ds.column_names)}); "
            "set data.text_column to the one that holds the text"
        )
    feature = ds.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
        raise ConfigError(
            f"column {column!r} of data.path {path} holds {kind}, not text; set data.text_column to a text column"
        )
    ds = ds.select_columns([column])
    return ds if column == "text" else ds.rename_column(column, "text")


def load_local_files(builder: str, files, **kwargs):
    """``datasets.load_dataset`` on local files; a file it cannot read is one line naming the file."""
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=files, **kwargs)
    except Exception as e:  # datasets wraps the reader's error (UnicodeDecodeError, a parse error, ...)
        paths = list(files.values()) if isinstance(files, dict) else [files]
        paths = [p for group in paths for p in ([group] if isinstance(group, str) else group)]
        bad = first_non_utf8(paths)
        if bad:
            raise ConfigError(bad) from None
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        where = paths[0] if len(paths) == 1 else f"data.path ({len(paths)} files)"
        raise ConfigError(f"cannot read {where} as {builder}: {reason}") from None


def first_non_utf8(paths: list[str], chunk: int = 1 << 20) -> str | None:
    """A one-line message naming the first file that is not UTF-8 and its first bad byte; None if all are.

    Called only when loading failed, so a good corpus is never read twice.
    """
    for path in paths:
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        with open(path, "rb") as f:
            while True:
                data = f.read(chunk)
                pending = len(decoder.getstate()[0])  # bytes of an unfinished character from the last chunk
                try:
                    decoder.decode(data, final=not data)
                except UnicodeDecodeError as e:
                    at = offset - pending + e.start
                    return (
                        f"{path} is not UTF-8: byte 0x{e.object[e.start]:02x} at offset {at} ({e.reason}); "
                        "smoe-ds decodes every data file as UTF-8 (in byte mode too): convert it, "
                        "e.g. iconv -f latin1 -t utf-8"
                    )
                if not data:
                    break
                offset += len(data)
    return None


def load_hub_dataset(name: str, config: str | None, key: str):
    """``datasets.load_dataset(name, config)`` with a 'train' split; ConfigError naming ``key`` otherwise."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config)
    except Exception as e:  # offline, unknown name, gated: all end the same way for the user
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{key} {name!r} is not a local file or folder, and loading it from the Hugging Face hub "
            f"failed (offline? set HF_DATASETS_OFFLINE=1 to fail fast): {first_line}"
        ) from None
    if "train" not in ds:
        raise ConfigError(f"hub dataset {name!r} has no 'train' split (it has: {', '.join(ds)})")
    return ds


def _load_hub(cfg: DataConfig):
    import datasets

    ds = load_hub_dataset(cfg.path, cfg.hub_config, "data.path")
    if cfg.text_column not in ds["train"].column_names:
        raise ConfigError(
            f"hub dataset {cfg.path!r} has no column {cfg.text_column!r} (set data.text_column; "
            f"columns: {', '.join(ds['train'].column_names)})"
        )
    val_name = next((s for s in ("validation", "valid", "test") if s in ds), None)
    if val_name is None:
        parts = ds["train"].train_test_split(test_size=cfg.val_fraction, seed=cfg.seed)
        train, val = parts["train"], parts["test"]
    else:
        train, val = ds["train"], ds[val_name]
    keep = lambda d: d.select_columns([cfg.text_column]).rename_column(cfg.text_column, "text")  # noqa: E731
    return datasets.DatasetDict(train=keep(train), validation=keep(val))


# -- tokenising and packing ---------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to download."""

    vocab_size = 256

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer from a local path; an EOS token separates documents."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        if not Path(path).exists():
            raise ConfigError(f"data.tokenizer not found: {path}")
        try:
            self.tok = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a folder that is not one
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"data.tokenizer {path} is not a Hugging Face tokenizer folder (tokenizer.json or "
                f"tokenizer_config.json with its vocabulary): {reason}"
            ) from None
        self.vocab_size = len(self.tok)
        self.sep = [self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.sep_token_id]
        self.sep = [i for i in self.sep if i is not None]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        ids = self.tok(texts, add_special_tokens=False)["input_ids"]
        return [np.asarray(row + self.sep, dtype=np.int64) for row in ids]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def make_tokenizer(cfg: DataConfig):
    return HFTokenizer(cfg.tokenizer) if cfg.tokenizer else ByteTokenizer()


def token_stream(ds, tokenizer) -> tuple[np.ndarray, int]:
    """A text split's documents tokenised into one stream [n_tokens], and its UTF-8 byte count."""

    def tokenize(batch):
        return {
            "ids": tokenizer.encode_batch(batch["text"]),
            "n_bytes": [len(t.encode("utf-8")) for t in batch["text"]],
        }

    tokenized = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc="tokenizing")
    tokenized = tokenized.with_format("numpy")
    ids_column = tokenized["ids"]
    stream = np.concatenate(list(ids_column)) if len(ids_column) else np.zeros(0, dtype=np.int64)
    n_bytes = int(np.sum(tokenized["n_bytes"])) if len(tokenized) else 0
    return stream, n_bytes


def pack_stream(stream: np.ndarray, block_size: int) -> np.ndarray:
    """A token stream [n] cut into non-overlapping int64 blocks [n // (block_size + 1), block_size + 1]."""
    width = block_size + 1
    n_blocks = len(stream) // width
    return stream[: n_blocks * width].reshape(n_blocks, width).astype(np.int64)


# -- the embedded default, cached -----------------------------------------------------------
# Every rank of every launch would otherwise walk, read and tokenise the standard library again
# (about 2 s of a core each, most of a test suite's data time). Its byte streams depend on the
# interpreter and data.val_fraction only, so they are kept on disk per (interpreter, fraction).
DEFAULT_CACHE_FORMAT = 1  # bump when what is cached, or how it is split, changes


def cache_dir() -> Path:
    """$SMOE_DS_CACHE, else $XDG_CACHE_HOME/smoe_ds, else ~/.cache/smoe_ds."""
    if os.environ.get("SMOE_DS_CACHE"):
        return Path(os.environ["SMOE_DS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smoe_ds"


def stdlib_streams(val_fraction: float) -> dict[str, np.ndarray]:
    """{"train"/"validation": UTF-8 byte stream [n]} of the embedded default, read from the cache,
    or made and cached (written whole under a temporary name, then renamed, so that ranks starting
    together never read half a file)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    key = (DEFAULT_CACHE_FORMAT, sys.version, str(root), root.stat().st_mtime_ns, val_fraction)
    folder = cache_dir() / f"stdlib-{zlib.crc32(repr(key).encode()):08x}"
    try:
        return {split: np.load(folder / f"{split}.npy", allow_pickle=False) for split in ("train", "validation")}
    except (OSError, ValueError):
        pass
    splits = load_text_splits(DataConfig(path=None, val_fraction=val_fraction))
    streams = {split: token_stream(splits[split], ByteTokenizer())[0] for split in ("train", "validation")}
    try:
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for split, stream in streams.items():
            np.save(tmp / f"{split}.npy", stream.astype(np.uint8), allow_pickle=False)
        os.replace(tmp, folder)
    except OSError:  # a read-only home, or another rank renamed its copy first: the streams stand
        shutil.rmtree(tmp, ignore_errors=True)
    return streams


def load_corpus(cfg: DataConfig, block_size: int) -> Corpus:
    """Load, split, tokenise and pack the configured corpus (``datasets`` caches the heavy parts;
    the embedded default's byte streams are cached whole, ``stdlib_streams``)."""
    tokenizer = make_tokenizer(cfg)
    if cfg.path is None and cfg.tokenizer is None:
        # one byte, one token: a split's byte count is its stream's length
        streams = {split: (stream, len(stream)) for split, stream in stdlib_streams(cfg.val_fraction).items()}
    else:
        splits = load_text_splits(cfg)
        streams = {split: token_stream(splits[split], tokenizer) for split in ("train", "validation")}
    (train_stream, _), (val_stream, val_bytes) = streams["train"], streams["validation"]
    train, val = pack_stream(train_stream, block_size), pack_stream(val_stream, block_size)
    val_tokens = len(val_stream)
    where = cfg.path or "the Python standard library (embedded default)"
    for name, blocks in (("training", train), ("validation", val)):
        if len(blocks) == 0:
            raise ConfigError(
                f"the {name} split of {where} is shorter than one block of {block_size + 1} tokens "
                "(model.block_size + 1); use more data or a smaller model.block_size"
            )
    return Corpus(
        train_blocks=torch.from_numpy(train),
        val_blocks=torch.from_numpy(val),
        vocab_size=tokenizer.vocab_size,
        bytes_per_token=val_bytes / max(val_tokens, 1),
        description=f"{where}: {len(train)} train / {len(val)} validation blocks of {block_size} tokens",
    )


# -- per-rank iteration -------------------------------------------------------------------


def train_batches(blocks: torch.Tensor, *order_args, **order_kwargs) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (x [B, T], y [B, T]) micro-batches of ``blocks`` [n, T + 1] for this rank, in the
    order of ``train_order(len(blocks), *order_args, **order_kwargs)``."""
    for idx in train_order(len(blocks), *order_args, **order_kwargs):
        b = blocks[idx]
        yield b[:, :-1], b[:, 1:]


def train_order(
    n_items: int,
    micro_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    grad_accum: int = 1,
    start_step: int = 0,
    extra_micro_batches: int = 0,
) -> Iterator[torch.Tensor]:
    """Endless micro-batches of item indices [B] for this rank, from optimizer step ``start_step``
    on, after ``extra_micro_batches`` more (those a run skipped for bad losses before it was saved).

    The data order is global: epoch e is a permutation of the items drawn from (seed, e), and
    each optimizer step consumes the next G = micro_batch x world_size x grad_accum of it;
    micro-batch m of a step goes to rank r as items [(m x world_size + r) x micro_batch, ...).
    Ranks therefore read disjoint items, the order depends only on the seed, and a run
    resumed at step s -- even with another world size, as long as G is the same -- reads
    exactly what an uninterrupted run would. The tail of an epoch that does not fill a whole
    step is skipped, so every rank runs every step and no collective is left waiting.
    """
    steps, within = divmod(extra_micro_batches, grad_accum)
    order = _train_order(n_items, micro_batch, rank, world_size, seed, grad_accum, start_step + steps)
    return itertools.islice(order, within, None)


def _train_order(
    n_items: int, micro_batch: int, rank: int, world_size: int, seed: int, grad_accum: int, start_step: int
) -> Iterator[torch.Tensor]:
    per_step = micro_batch * world_size * grad_accum
    steps_per_epoch = train_steps_per_epoch(n_items, micro_batch, world_size, grad_accum)
    step = start_step
    while True:
        epoch, within = divmod(step, steps_per_epoch)
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for s in range(within, steps_per_epoch):
            chunk = order[s * per_step : (s + 1) * per_step]
            for m in range(grad_accum):
                start = (m * world_size + rank) * micro_batch
                yield chunk[start : start + micro_batch]
        step += steps_per_epoch - within


def train_steps_per_epoch(n_blocks: int, micro_batch: int, world_size: int, grad_accum: int) -> int:
    """Optimizer steps in one pass over ``n_blocks`` training blocks; ConfigError when not even one."""
    per_step = micro_batch * world_size * grad_accum
    if n_blocks < per_step:
        raise ConfigError(
            f"the training split has {n_blocks} blocks, too few for one step of {per_step} "
            f"({world_size} ranks x micro-batch {micro_batch} x {grad_accum} accumulation steps); "
            "use more data or a smaller batch"
        )
    return n_blocks // per_step


def eval_batches(
    blocks: torch.Tensor, micro_batch: int, rank: int, world_size: int, max_batches: int | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``max_batches`` validation micro-batches of this rank's shard (same count on all ranks)."""
    per_rank = len(blocks) // world_size
    n = per_rank // micro_batch if max_batches is None else min(max_batches, per_rank // micro_batch)
    if n < 1:
        raise ConfigError(
            f"the validation split has {len(blocks)} blocks, too few for {world_size} ranks "
            f"x micro-batch {micro_batch}; raise data.val_fraction or lower the batch size"
        )
    mine = blocks[rank::world_size][: n * micro_batch]
    return [(b[:, :-1], b[:, 1:]) for b in mine.split(micro_batch)]
