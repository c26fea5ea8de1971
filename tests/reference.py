"""Plain references the fast code is checked against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_moe(x_SD: torch.Tensor, router_ND: torch.Tensor, w_in: list, w_out: list, k: int) -> torch.Tensor:
    """SMoE-Dropout FFN by a loop over experts and route ranks: no slots, no capacity.

    x_SD tokens, router_ND the router weight, w_in[e] [H, D] and w_out[e] [D, H] expert e's
    weights. Each token's output is the sum over its top-k experts of
    softmax(top-k logits)_j * expert_j(x).
    """
    logits = x_SD.float() @ router_ND.float().t()
    top = logits.topk(k, dim=-1)
    weights = torch.softmax(top.values, dim=-1)
    out = torch.zeros_like(x_SD)
    for e in range(router_ND.shape[0]):
        for j in range(k):
            sel = top.indices[:, j] == e
            if sel.any():
                y = F.gelu(x_SD[sel] @ w_in[e].t()) @ w_out[e].t()
                out[sel] = out[sel] + weights[sel, j : j + 1].to(y.dtype) * y
    return out
