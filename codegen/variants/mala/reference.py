"""Magnitude-Aware Linear Attention reference (MALA; VARIANTS.md §6), without rotary.

Over the allowed set A_i (every valid key, or j <= i if causal) with n_i = |A_i|, φ = elu1:
    sim_ij = c_i φ(q_i)·φ(k_j),  c_i = sim_scale / n_i,  Z_i = Σ_{j∈A_i} sim_ij,
    α_ij = β_i sim_ij − γ_i,  β_i = 1 + 1/(Z_i + eps),  γ_i = Z_i / n_i,
    y_i = Σ_{j∈A_i} α_ij v_j = β_i c_i φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ − γ_i Σ_j v_j,
so Σ_j α_ij = Z_i / (Z_i + eps) ≈ 1.

``sim_scale`` is the factor s of the official code (default D^{-1/2}) and is always divided by the
row's key count n_i: N for the bidirectional form (§6.1: c = s/N = 1/(√D·N), the code's default),
the prefix count i (1-indexed) for the causal form (§6.2: c_i = s/i). With key padding n_i counts
valid keys only. Unlike §6.1's wording, where ``sim_scale`` would already include the 1/N, the
parameter here excludes it, because the count varies per row in the causal and padded cases.

Bidirectional: global sums Σ φ(k) vᵀ, Σ φ(k), Σ v. Causal: the chunked prefix sums of §2.4 with the
two extra carried quantities of §6.5 (Σ v and the count), O(N·C) memory. A row with no allowed key
outputs 0. Everything is computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attncc.codegen.masks import causal_offset, prepare_qkv


def mala_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    sim_scale: float | None = None,
    key_padding: Tensor | None = None,
    eps: float = 1e-6,
    chunk: int = 64,
) -> Tensor:
    """MALA (§6.1 bidirectional, §6.2 causal); see the module docstring for the formula.

    q [B, H, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv] -> [B, H, Tq, Dv] in q's dtype.
    Causal queries end the key sequence (masks.py). ``key_padding`` is bool [B, Tk], True = real token.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    out_dtype = q.dtype
    s = q.shape[-1] ** -0.5 if sim_scale is None else sim_scale
    q, k, v = prepare_qkv(q, k, v, key_padding)
    q, k = F.elu(q) + 1, F.elu(k) + 1
    valid = q.new_ones(1, 1, k.shape[-2], 1)
    if key_padding is not None:
        valid = key_padding[:, None, :, None].float()
    k, v_valid = k * valid, v * valid
    if causal and q.shape[-2] != k.shape[-2]:
        qkv, qk, v_sum, count = _causal_sums_at_end(q, k, v, v_valid, valid)
    elif causal:
        (qkv, qk, v_sum, count), _ = _causal_sums(q, k, v, v_valid, valid, chunk)
    else:
        qkv = q @ (k.mT @ v)
        qk = q @ k.sum(dim=-2).unsqueeze(-1)
        v_sum = v_valid.sum(dim=-2, keepdim=True)
        count = valid.sum(dim=-2, keepdim=True)
    return _combine(qkv, qk, v_sum, count, s, eps).to(out_dtype)


def causal_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: tuple[Tensor, ...] | None,
    *,
    sim_scale: float | None = None,
    key_padding: Tensor | None = None,
    eps: float = 1e-6,
    chunk: int = 64,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Causal MALA of queries aligned with their keys, continuing the sums of every earlier key: the
    recurrent form a decode step runs (from state None, a whole prefill).

    state is (Σ φ(k) vᵀ [B, H, D, Dv], Σ φ(k) [B, H, 1, D], Σ v [B, H, 1, Dv], valid-key count
    [B, 1, 1, 1]) float32 over every key before this block; None = no earlier key. Returns (out, the
    state after the block). Chained over consecutive blocks it equals ``mala_attention``.
    """
    out_dtype = q.dtype
    s = q.shape[-1] ** -0.5 if sim_scale is None else sim_scale
    q, k, v = prepare_qkv(q, k, v, key_padding)
    q, k = F.elu(q) + 1, F.elu(k) + 1
    valid = q.new_ones(1, 1, k.shape[-2], 1) if key_padding is None else key_padding[:, None, :, None].float()
    (qkv, qk, v_sum, count), state = _causal_sums(q, k * valid, v, v * valid, valid, chunk, state)
    return _combine(qkv, qk, v_sum, count, s, eps).to(out_dtype), state


def _combine(qkv: Tensor, qk: Tensor, v_sum: Tensor, count: Tensor, s: float, eps: float) -> Tensor:
    count = count.clamp(min=1)
    c = s / count
    z = c * qk
    beta = 1 + 1 / (z + eps)
    gamma = z / count
    return beta * c * qkv - gamma * v_sum


def _causal_sums_at_end(q: Tensor, k: Tensor, v: Tensor, v_valid: Tensor, valid: Tensor):
    """`_causal_sums` for queries that end a longer key sequence (query i at position Tk - Tq + i), in
    the quadratic form: O(Tq·Tk·D), so a decode step reads each key once."""
    tq, tk = q.shape[-2], k.shape[-2]
    allowed = (torch.arange(tk, device=q.device) <= torch.arange(causal_offset(tq, tk), tk, device=q.device)
               .view(-1, 1)).float()
    scores = (q @ k.mT) * allowed
    return scores @ v, scores.sum(dim=-1, keepdim=True), allowed @ v_valid, allowed @ valid


def _causal_sums(q: Tensor, k: Tensor, v: Tensor, v_valid: Tensor, valid: Tensor, chunk: int,
                 state: tuple[Tensor, ...] | None = None):
    """Per query row i, by chunks: φ(q_i)ᵀ Σ_{j≤i} φ(k_j) v_jᵀ, φ(q_i)·Σ_{j≤i} φ(k_j),
    Σ_{j≤i} v_j and the valid-key count (k and v_valid are already zeroed at padded keys), each sum
    starting from `state` (the sums before the first row); and the sums after the last row."""
    B, H, T, D = q.shape
    if state is None:
        state = (q.new_zeros(B, H, D, v.shape[-1]), q.new_zeros(B, H, 1, D), q.new_zeros(B, H, 1, v.shape[-1]),
                 q.new_zeros(valid.shape[0], 1, 1, 1))
    kv, k_sum, v_sum, count = state
    qkv, qk, v_sums, counts = [], [], [], []
    for start in range(0, T, chunk):
        rows = slice(start, start + chunk)
        qc, kc, vc = q[:, :, rows], k[:, :, rows], v[:, :, rows]
        vc_valid, valid_c = v_valid[:, :, rows], valid[:, :, rows]
        scores = (qc @ kc.mT).tril()
        qkv.append(scores @ vc + qc @ kv)
        qk.append(scores.sum(dim=-1, keepdim=True) + qc @ k_sum.mT)
        v_sums.append(vc_valid.cumsum(dim=-2) + v_sum)
        counts.append(valid_c.cumsum(dim=-2) + count)
        kv = kv + kc.mT @ vc
        k_sum = k_sum + kc.sum(dim=-2, keepdim=True)
        v_sum = v_sum + vc_valid.sum(dim=-2, keepdim=True)
        count = count + valid_c.sum(dim=-2, keepdim=True)
    sums = torch.cat(qkv, dim=2), torch.cat(qk, dim=2), torch.cat(v_sums, dim=2), torch.cat(counts, dim=2)
    return sums, (kv, k_sum, v_sum, count)
