"""BERT's masking (smoe_ds.masking): the rates, what is never masked, the labels, and determinism."""

import pytest
import torch

from smoe_ds.config.schema import ConfigError
from smoe_ds.masking import (
    MaskingSpec,
    block_seed,
    encoder_inputs,
    mask_tokens,
    masked_eval_batches,
    masked_train_batches,
)

SPEC = MaskingSpec(cls_id=101, mask_id=103, special_ids=(0, 100, 101, 102, 103), vocab_size=1000)


@pytest.fixture(scope="module")
def sample():
    """400 blocks of 256 tokens, a tenth of them special (CLS, SEP, PAD, UNK), masked once."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(104, 1000, (400, 256), generator=gen)
    specials = torch.rand(ids.shape, generator=gen) < 0.1
    ids[specials] = torch.tensor(SPEC.special_ids[:4])[torch.randint(4, (int(specials.sum()),), generator=gen)]
    inputs, labels = mask_tokens(ids, SPEC, [block_seed(7, 1, i) for i in range(len(ids))])
    return ids, inputs, labels


def test_rates_are_berts_within_tolerance(sample):
    """15 % of ordinary tokens chosen, of which 80 % [MASK], 10 % random, 10 % kept. With ~92k
    ordinary tokens and ~14k chosen, 4 standard errors are under 0.5 and 1.4 points."""
    ids, inputs, labels = sample
    ordinary = ~torch.isin(ids, torch.tensor(SPEC.special_ids))
    chosen = labels != -100
    assert abs(chosen[ordinary].float().mean().item() - 0.15) < 0.005
    masked = (inputs[chosen] == SPEC.mask_id).float().mean().item()
    kept = (inputs[chosen] == ids[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.014 and abs(kept - 0.1) < 0.014
    assert abs(1 - masked - kept - 0.1) < 0.014  # the rest were replaced by another token


def test_special_tokens_are_never_chosen_and_labels_are_minus_100_elsewhere(sample):
    ids, inputs, labels = sample
    special = torch.isin(ids, torch.tensor(SPEC.special_ids))
    assert special.sum() > 0 and (labels[special] == -100).all() and torch.equal(inputs[special], ids[special])
    chosen = labels != -100
    assert torch.equal(labels[chosen], ids[chosen])  # a chosen position is scored on its original token
    assert torch.equal(inputs[~chosen], ids[~chosen])  # nothing else changes
    replaced = chosen & (inputs != ids) & (inputs != SPEC.mask_id)
    assert not torch.isin(inputs[replaced], torch.tensor(SPEC.special_ids)).any()  # random ids are ordinary


def test_encoder_inputs_start_with_cls_and_keep_the_block_order():
    x = torch.arange(12).view(2, 6)
    assert encoder_inputs(x, 101).tolist() == [[101, 0, 1, 2, 3, 4], [101, 6, 7, 8, 9, 10]]


def originals(inputs, labels) -> list[tuple]:
    """Each row's unmasked tokens: a scored position's label, every other position's input."""
    return [tuple(row.tolist()) for row in torch.where(labels != -100, labels, inputs)]


def test_batches_depend_on_block_and_step_not_on_the_layout():
    """A block read at the same step is masked the same on 1 rank x 2 accumulation steps and on 2
    ranks; resuming at step 3 reads what the whole run read there; a later epoch masks afresh;
    validation masks are the same at every call."""
    blocks = torch.randint(104, 1000, (16, 33), generator=torch.Generator().manual_seed(1))

    def steps(world, gas, start, count):
        """Per step from ``start``: {a block's tokens: its masked inputs}, over every rank and micro-batch."""
        ranks = [masked_train_batches(blocks, SPEC, 2, r, world, 5, gas, start) for r in range(world)]
        out = []
        for _ in range(count):
            step = {}
            for it in ranks:
                for _ in range(gas):
                    inputs, labels = next(it)
                    step.update(zip(originals(inputs, labels), map(tuple, inputs.tolist())))
            out.append(step)
        return out

    one_rank, two_ranks = steps(1, 2, 0, 6), steps(2, 1, 0, 6)
    assert one_rank == two_ranks and len(two_ranks[0]) == 4
    assert steps(2, 1, 3, 3) == two_ranks[3:]
    whole = masked_train_batches(blocks, SPEC, 16, 0, 1, 5)  # one step is one epoch
    epochs = [dict(zip(originals(*batch), map(tuple, batch[0].tolist()))) for batch in (next(whole), next(whole))]
    assert epochs[0].keys() == epochs[1].keys() and epochs[0] != epochs[1]
    val = masked_eval_batches(blocks, SPEC, 5, 2, 0, 2, None)
    again = masked_eval_batches(blocks, SPEC, 5, 2, 0, 2, None)
    assert len(val) == 4 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(val, again))


def test_a_tokenizer_without_a_mask_token_is_refused_in_one_line(tmp_path):
    import transformers  # noqa: F401  (first: smoe_ds registers its models, the byte tokenizer among them, on its import)

    from smoe_ds.models.byte_tokenizer import SMoEByteTokenizer

    SMoEByteTokenizer().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="has no mask_token or cls_token: model.objective masked_lm needs"):
        MaskingSpec.of_tokenizer(str(tmp_path))
