"""The built-in LM with a classification head (``SMoEForSequenceClassification``): an exported LM
loads into it through transformers' Auto class, single process."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import smoe_ds  # noqa: F401  (registers the smoe_lm model type with the Auto classes)
from smoe_ds.models.transformers_lm import SMoEConfig, SMoEForCausalLM, SMoEForSequenceClassification

MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "block_size": 16, "init_seed": 3}
MOE = {"mode": "smoe_dropout", "num_experts": 4, "d_expert": 16}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm_export")
    SMoEForCausalLM(SMoEConfig(model=MODEL, moe=MOE)).save_pretrained(path)
    return path


def test_an_exported_lm_loads_with_a_new_head_and_every_lm_weight_from_the_export(export_dir):
    lm = AutoModelForCausalLM.from_pretrained(export_dir)
    clf = AutoModelForSequenceClassification.from_pretrained(export_dir, num_labels=3)
    assert isinstance(clf, SMoEForSequenceClassification) and clf.score.out_features == 3
    lm_state, clf_state = lm.state_dict(), clf.state_dict()
    assert {k for k in clf_state if not k.startswith("lm.")} == {"score.weight", "score.bias"}
    for name, value in lm_state.items():
        assert torch.equal(clf_state[name], value), name
    assert clf.score.weight.std() > 0 and torch.equal(clf.score.bias, torch.zeros(3))


def test_pooling_takes_the_last_real_token_so_right_padding_changes_nothing(export_dir):
    clf = AutoModelForSequenceClassification.from_pretrained(export_dir, num_labels=2).eval()
    gen = torch.Generator().manual_seed(0)
    short, long = torch.randint(0, 256, (1, 5), generator=gen), torch.randint(0, 256, (1, 9), generator=gen)
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0, :5], batch[1] = short[0], long[0]
    mask = (torch.arange(9) < torch.tensor([[5], [9]])).long()
    labels = torch.tensor([1, 0])
    for k in (1, 2, 4):
        clf.set_active_experts(k)
        out = clf(batch, attention_mask=mask, labels=labels)
        alone = torch.cat([clf(short).logits, clf(long).logits])
        assert torch.allclose(out.logits, alone, atol=1e-5), k
        assert torch.isclose(out.loss, torch.nn.functional.cross_entropy(alone, labels), atol=1e-5)
    hidden, _ = clf.lm.hidden_states(short)
    assert torch.allclose(clf(short).logits, clf.score(hidden[:, -1]), atol=1e-6)


def test_byte_level_exports_carry_a_tokenizer_that_matches_the_trainers_bytes(export_dir):
    from transformers import AutoTokenizer

    from smoe_ds.data import ByteTokenizer
    from smoe_ds.models.byte_tokenizer import SMoEByteTokenizer

    SMoEByteTokenizer().save_pretrained(export_dir)  # what smoe_ds.convert writes for a byte-level run
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    assert isinstance(tokenizer, SMoEByteTokenizer)
    text = "naïve café ✓, 42"
    ids = tokenizer(text)["input_ids"]
    assert ids == ByteTokenizer().encode_batch([text])[0].tolist() and tokenizer.decode(ids) == text
    batch = tokenizer(["ab", "abcd"], padding=True, truncation=True, max_length=3, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[97, 98, 0], [97, 98, 99]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_each_expert_parallel_rank_takes_its_slice_of_the_exported_experts_and_every_other_weight(export_dir):
    full = SMoEForSequenceClassification.from_pretrained(export_dir, num_labels=2)
    full_state = dict(full.named_parameters())
    seen = set()
    for ep_rank in (0, 1):
        torch.manual_seed(7)  # the head is drawn from torch's RNG: the same on every rank
        shard = SMoEForSequenceClassification.from_export_sharded(
            export_dir, ep_size=2, ep_rank=ep_rank, for_deepspeed=False, num_labels=2
        )
        assert shard.lm.moe_cfg.ep_size == 2
        for name, p in shard.named_parameters():
            if name.startswith("score."):
                continue
            if ".experts." in name:  # [N/2, ...] of the stacked [N, ...]
                half = full_state[name].shape[0] // 2
                assert torch.equal(p, full_state[name][ep_rank * half : (ep_rank + 1) * half]), name
                seen.add(name)
            else:
                assert torch.equal(p, full_state[name]), name
        if ep_rank == 0:
            head = shard.score.weight.clone()
        else:
            assert torch.equal(shard.score.weight, head)
    assert len(seen) == 2 * MODEL["n_layers"]  # w_in and w_out of every MoE layer
