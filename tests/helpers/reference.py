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


def naive_split_ffn(
    x_SD: torch.Tensor, router_ND: torch.Tensor, ffn: dict, activation, k: int, weighting: str
) -> torch.Tensor:
    """A pretrained FFN split into N contiguous experts, by a loop over tokens and their experts.

    ``ffn`` holds the dense weights as the model's own modules compute them: ``w_in`` [F, D]
    (with ``b_in`` [F]), optionally ``w_gate`` [F, D] (SwiGLU: act(x w_gate^T) * (x w_in^T)),
    ``w_down`` [D, F] and ``b_out`` [D]. Expert e owns hidden units e*F/N .. (e+1)*F/N - 1.
    Weights: softmax over the top-k fp32 logits, or N / k each ("rescale"); b_out is added once.
    Computes in the dtype of ``x_SD`` (float64 for a reference with negligible rounding).
    """
    n = router_ND.shape[0]
    h = ffn["w_in"].shape[0] // n
    out = torch.empty_like(x_SD)
    for t, x in enumerate(x_SD):
        top = (router_ND.float() @ x.float()).topk(k)
        weights = torch.softmax(top.values, -1) if weighting == "softmax" else torch.full((k,), n / k)
        y = ffn["b_out"].clone() if "b_out" in ffn else torch.zeros_like(x)
        for weight, e in zip(weights.tolist(), top.indices.tolist()):
            rows = slice(e * h, (e + 1) * h)
            pre = ffn["w_in"][rows] @ x + (ffn["b_in"][rows] if "b_in" in ffn else 0)
            hidden = activation(ffn["w_gate"][rows] @ x) * pre if "w_gate" in ffn else activation(pre)
            y = y + weight * (ffn["w_down"][:, rows] @ hidden)
        out[t] = y
    return out
