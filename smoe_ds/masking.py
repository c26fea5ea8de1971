"""BERT's masking for the encoder (``model.objective`` "masked_lm"), and the encoder's batches.

Shapes: B blocks, T = model.block_size tokens per input.

An input is ``[CLS]`` followed by the first T - 1 tokens of a packed block (``smoe_ds.data``:
documents joined by the tokenizer's ``[SEP]``), so pretraining sees what fine-tuning feeds. Of its
ordinary tokens (never a special one: ``[CLS]``, ``[SEP]``, ``[PAD]``, ``[MASK]``, ``[UNK]``) each is
chosen with probability 0.15; a chosen token becomes ``[MASK]`` with probability 0.8, a random
ordinary token with probability 0.1, and stays itself otherwise. Only chosen positions are scored:
``labels`` holds their original ids and -100 everywhere else.

The draws for a block are a pure function of (``data.seed``, a salt, the block's index in its split):
in training the salt is the step of the global read order, so a block is masked afresh each epoch
(RoBERTa's dynamic masking) and a resumed run masks as the uninterrupted one did, on any number of
ranks with the same global batch; in validation the salt is fixed, so every k and every evaluation
scores the same masks.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from smoe_ds.config.schema import ConfigError
from smoe_ds.data import eval_batches, train_order
from smoe_ds.models.lm import IGNORE

VALIDATION_SALT = 0  # training salts are read-order steps + 1, never 0


@dataclass(frozen=True)
class MaskingSpec:
    """The tokenizer's ids that masking needs, and BERT's rates."""

    cls_id: int
    mask_id: int
    special_ids: tuple[int, ...]
    vocab_size: int
    rate: float = 0.15  # share of ordinary tokens chosen
    mask_share: float = 0.8  # of the chosen: replaced by [MASK]
    random_share: float = 0.1  # of the chosen: replaced by a random ordinary token (the rest stay)

    @classmethod
    def of_tokenizer(cls, path: str) -> MaskingSpec:
        """The spec of the Hugging Face tokenizer at ``path`` (``data.tokenizer``); ConfigError
        when it has no mask or CLS token (a byte-level or GPT-style tokenizer)."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        missing = [name for name in ("mask_token", "cls_token") if getattr(tok, f"{name}_id") is None]
        if missing:
            raise ConfigError(
                f"data.tokenizer {path} has no {' or '.join(missing)}: model.objective masked_lm needs a "
                "BERT-style tokenizer (e.g. MiniLM's: python -m smoe_ds.hf.local_models minilm)"
            )
        return cls(tok.cls_token_id, tok.mask_token_id, tuple(sorted(tok.all_special_ids)), len(tok))

    @functools.cached_property
    def ordinary_ids(self) -> torch.Tensor:
        """[V - specials] the ids a random replacement is drawn from."""
        ids = torch.arange(self.vocab_size)
        return ids[~torch.isin(ids, torch.tensor(self.special_ids))]


def block_seed(seed: int, salt: int, index: int) -> int:
    """The generator seed of one block's draws (a pure function of its three integers)."""
    return (((seed * 1_000_003) + salt) * 1_000_000_007 + index) % (1 << 63)


def encoder_inputs(x_BT: torch.Tensor, cls_id: int) -> torch.Tensor:
    """[CLS] then the first T - 1 tokens of each block's input ``x_BT`` [B, T] -> ids [B, T]."""
    return torch.cat([x_BT.new_full((x_BT.shape[0], 1), cls_id), x_BT[:, :-1]], dim=1)


def mask_tokens(ids_BT: torch.Tensor, spec: MaskingSpec, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of ``ids_BT`` [B, T], block b drawn from ``seeds[b]`` -> (inputs [B, T], labels [B, T])."""
    B, T = ids_BT.shape
    draws, replacements = [], []
    for s in seeds:
        gen = torch.Generator().manual_seed(s)
        draws.append(torch.rand(2, T, generator=gen))
        replacements.append(torch.randint(len(spec.ordinary_ids), (T,), generator=gen))
    u = torch.stack(draws, dim=1)  # [2, B, T]: whether chosen, then how it is replaced
    chosen = (u[0] < spec.rate) & ~torch.isin(ids_BT, torch.tensor(spec.special_ids))
    labels = torch.where(chosen, ids_BT, IGNORE)
    to_mask = chosen & (u[1] < spec.mask_share)
    to_random = chosen & (u[1] >= spec.mask_share) & (u[1] < spec.mask_share + spec.random_share)
    inputs = torch.where(to_mask, spec.mask_id, ids_BT)
    inputs = torch.where(to_random, spec.ordinary_ids[torch.stack(replacements)], inputs)
    return inputs, labels


def masked_train_batches(
    blocks: torch.Tensor, spec: MaskingSpec, *order_args, **order_kwargs
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (inputs [B, T], labels [B, T]) micro-batches of ``blocks`` [n, T + 1] for this rank, in
    the order of ``train_order(len(blocks), *order_args, **order_kwargs)`` (``smoe_ds.data``)."""
    bound = inspect.signature(train_order).bind(len(blocks), *order_args, **order_kwargs)
    bound.apply_defaults()
    a = bound.arguments
    gas, seed = a["grad_accum"], a["seed"]
    read = a["start_step"] * gas + a["extra_micro_batches"]  # micro-batches of each rank read before this one
    for idx in train_order(*bound.args, **bound.kwargs):
        salt = read // gas + 1  # the step of the read order: the same on every rank and layout
        ids = encoder_inputs(blocks[idx][:, :-1], spec.cls_id)
        yield mask_tokens(ids, spec, [block_seed(seed, salt, int(i)) for i in idx])
        read += 1


def masked_eval_batches(
    blocks: torch.Tensor, spec: MaskingSpec, seed: int, micro_batch: int, rank: int, world_size: int, max_batches
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's validation micro-batches (``smoe_ds.data.eval_batches``' blocks), masked the same at every call."""
    plain = eval_batches(blocks, micro_batch, rank, world_size, max_batches)
    indices = torch.arange(len(blocks))[rank::world_size].split(micro_batch)
    return [
        mask_tokens(encoder_inputs(x, spec.cls_id), spec, [block_seed(seed, VALIDATION_SALT, int(i)) for i in idx])
        for (x, _), idx in zip(plain, indices)
    ]
