"""Reference softmax attention: the math every matched site computes (VARIANTS.md §1).

o_i = Σ_j softmax_j(scale · q_i·k_j + bias_ij) v_j, with the causal set j <= Tk - Tq + i (causal
queries end the key sequence, codegen/masks.py; SDPA's is_causal agrees when Tq == Tk) and an optional mask: boolean (True = attend) or additive (float). A query
with no allowed key (every key masked, by -inf, finfo.min or False) outputs 0, as SDPA does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attncc.codegen.masks import NO_KEY, causal_offset, repeat_kv


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | torch.Tensor,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """q [..., H, Tq, D], k [..., Hkv, Tk, D], v [..., Hkv, Tk, Dv] -> [..., H, Tq, Dv] in q's dtype.

    Scores, softmax and the weighted sum run in fp32.
    """
    heads = q.shape[-3]
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    allowed = None
    if causal:
        tq, tk = scores.shape[-2], scores.shape[-1]
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=causal_offset(tq, tk))
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
        given = mask if mask.dtype == torch.bool else mask > NO_KEY
        allowed = given if allowed is None else allowed & given
    if allowed is not None:  # a row with no allowed key outputs 0, as SDPA does (and its gradients are 0)
        any_key = allowed.any(dim=-1, keepdim=True)
        scores = torch.where(any_key, scores, 0.0)
    probs = torch.softmax(scores, dim=-1)
    if allowed is not None:
        probs = probs * any_key
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v.float()).to(q.dtype)


def softmax_attention_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `softmax_attention(q, k, v, scale=scale, mask=mask)`, written out (for ops whose
    backward runs where autograd is off): with P the probabilities and O = P·V,
    dV = Pᵀ·dO, dS = P ⊙ (dO·Vᵀ − rowsum(dO ⊙ O)), dQ = scale·dS·K, dK = scale·dSᵀ·Q;
    GQA sums the gradients of the query heads that share a kv head. The mask gets no gradient."""
    heads, kv_heads = q.shape[-3], k.shape[-3]
    kr, vr = repeat_kv(k, heads).float(), repeat_kv(v, heads).float()
    qf, dof = q.float(), do.float()
    scores = torch.matmul(qf, kr.transpose(-2, -1)) * scale
    allowed = mask if mask.dtype == torch.bool else mask > NO_KEY
    scores = scores.masked_fill(~allowed, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    any_key = allowed.any(dim=-1, keepdim=True)
    probs = torch.softmax(torch.where(any_key, scores, 0.0), dim=-1) * any_key
    out = torch.matmul(probs, vr)
    dv = torch.matmul(probs.transpose(-2, -1), dof)
    ds = probs * (torch.matmul(dof, vr.transpose(-2, -1)) - (dof * out).sum(-1, keepdim=True))
    dq = torch.matmul(ds, kr) * scale
    dk = torch.matmul(ds.transpose(-2, -1), qf) * scale
    if kv_heads != heads:
        group = heads // kv_heads
        dk = dk.unflatten(-3, (kv_heads, group)).sum(-3)
        dv = dv.unflatten(-3, (kv_heads, group)).sum(-3)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
