"""One feed-forward network: an expert, or the whole dense FFN of the dense baseline."""

from __future__ import annotations

import torch
from torch import nn


class FeedForward(nn.Module):
    """x [..., D] -> GELU(x W_in^T) W_out^T [..., D], hidden width H, no biases.

    Without biases, N experts of width H hold exactly the parameters of one dense FFN of
    width N * H, which keeps the dense baseline's parameter count equal.
    """

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, d_hidden, bias=False)
        self.w_out = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(nn.functional.gelu(self.w_in(x)))
