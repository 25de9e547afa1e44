"""Softplus attention with re-weighting reference: LSSA and LSSAR (VARIANTS.md §5; equations [S]).

Stage 1, LSSA (§5.1), over the allowed set A_i (j <= i if causal, minus padded keys), n_i = |A_i|:
    c_i = log(D) · log(n_i),  a_ij = softplus(c_i · q̂_i·k̂_j) for j ∈ A_i (else 0),
    A1_ij = a_ij / (Σ_j a_ij + eps),
with q̂, k̂ the l2-normalized rows (no 1/√D). n_i is the count of keys row i really attends to:
i + 1 (0-indexed) causal without padding, the number of valid keys otherwise.

Stage 2, LSSAR (``reweight_p = p > 0``), in the overflow-safe log-domain form of §5.4:
    x_ij = n_i · A1_ij − o_i,  A2_i = softmax_j(p · log x_ij) over j ∈ A_i with x_ij > 0,
which equals ReLU(x_ij)^p / Σ_j ReLU(x_ij)^p without ever forming (n A1)^p (overflows fp32 for
n ≳ 350 at p = 15). Offset o_i = 0 for the first three query rows (i = 0, 1, 2, 0-indexed), else 1.

Rows where every x_ij <= 0 (a uniform row: n_i · A1_ij <= 1 for all j) make the direct formula 0/0.
Such rows keep their stage-1 weights, A2_i = A1_i: no key stands out above uniform, so no
sharpening is applied. A row with no allowed key outputs 0. Everything is computed in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attncc.codegen.masks import causal_offset, prepare_qkv

UNSHIFTED_ROWS = 3


def softplus_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    reweight_p: float = 15.0,
    key_padding: Tensor | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """LSSA (``reweight_p = 0``) or LSSAR with exponent ``reweight_p`` (§5.1, §5.4).

    q [B, H, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv] -> [B, H, Tq, Dv] in q's dtype.
    Causal queries end the key sequence (masks.py: query i is position Tk - Tq + i, and LSSAR's row
    offset counts that position). ``key_padding`` is bool [B, Tk], True = real token.
    """
    if reweight_p < 0:
        raise ValueError(f"reweight_p must be >= 0 (0 = plain LSSA), got {reweight_p}")
    out_dtype = q.dtype
    B, _, Tq, D = q.shape
    Tk = k.shape[-2]
    q, k, v = prepare_qkv(q, k, v, key_padding)
    allowed = torch.ones(1, 1, Tq, Tk, dtype=torch.bool, device=q.device)
    first = causal_offset(Tq, Tk) if causal else 0  # the position of query row 0
    if causal:
        allowed = allowed.tril(diagonal=first)
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, None, :]
    n = allowed.sum(dim=-1, keepdim=True).float()
    scale = math.log(D) * torch.log(n.clamp(min=1))
    cosine = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).mT
    a = F.softplus(scale * cosine) * allowed
    weights = a / (a.sum(dim=-1, keepdim=True) + eps)
    if reweight_p > 0:
        weights = _reweight(weights, n, allowed, reweight_p, first)
    return (weights @ v).to(out_dtype)


def _reweight(a1: Tensor, n: Tensor, allowed: Tensor, p: float, first: int) -> Tensor:
    rows = (torch.arange(a1.shape[-2], device=a1.device) + first).view(-1, 1)
    offset = (rows >= UNSHIFTED_ROWS).float()
    x = n * a1 - offset
    kept = allowed & (x > 0)
    logits = torch.where(kept, p * torch.log(torch.where(kept, x, 1.0)), float("-inf"))
    any_kept = kept.any(dim=-1, keepdim=True)
    a2 = torch.softmax(logits.masked_fill(~any_kept, 0.0), dim=-1)
    return torch.where(any_kept, a2, a1)
