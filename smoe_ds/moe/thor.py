"""THOR (Zuo et al., 2022), the paper's random-routing baseline: every forward sends each token
to one expert drawn at random (``FrozenRandomGate(routing="random", weighting="uniform")``), and
training runs two such passes over the same batch, adding a consistency loss that pulls their
predictions together, so that whichever expert a token meets, the model says the same thing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """(KL(p_a || p_b) + KL(p_b || p_a)) / 2 per token, averaged: logits [..., V] -> scalar (fp32)."""
    log_a = F.log_softmax(logits_a.float(), dim=-1)
    log_b = F.log_softmax(logits_b.float(), dim=-1)
    kl_ab = (log_a.exp() * (log_a - log_b)).sum(-1)
    kl_ba = (log_b.exp() * (log_b - log_a)).sum(-1)
    return 0.5 * (kl_ab + kl_ba).mean()


def thor_loss(first, second, alpha: float) -> torch.Tensor:
    """Training loss from two passes (``LMOutput``s) over one batch: mean LM loss + alpha x consistency."""
    return 0.5 * (first.loss + second.loss) + alpha * symmetric_kl(first.logits, second.logits)


def training_loss(run_forward: Callable[[], Any], mode: str, alpha: float) -> tuple[torch.Tensor, Any]:
    """One batch's loss to backpropagate, and the first pass's output: ``run_forward()``'s loss, or
    under THOR (``mode == "thor"``) a second pass with fresh random routes, and the mean of the two
    losses plus ``alpha`` x their consistency. The trainer and the fine-tuner both train through it."""
    out = run_forward()
    if mode != "thor":
        return out.loss, out
    return thor_loss(out, run_forward(), alpha), out
