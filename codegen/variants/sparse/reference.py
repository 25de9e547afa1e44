"""Sparse softmax attention reference (VARIANTS.md §8): softmax restricted to an allowed key set.

    o_i = Σ_{j∈A_i} softmax_{j∈A_i}(scale · q_i·k_j) v_j,

with A_i given by a mask mod (``masks.py``) and intersected with the key padding:
- ``sliding_window``: StreamingLLM window + sinks (§8.1),
- ``power``: PowerAttention (§8.2),
- ``block``: any user ``mask_mod`` (§8.3).
The dense [Tq, Tk] mask is materialized (this is a reference, not a kernel). A query whose allowed
set is empty outputs 0 (and passes no gradient). Everything is computed in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attncc.codegen.masks import MaskMod, dense_mask, padding, power, prepare_qkv, sliding_window

PATTERNS = ("sliding_window", "power", "block")


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    pattern: str,
    window: int = 0,
    sinks: int = 0,
    block: int = 0,
    window_blocks: int = 0,
    mask_mod: MaskMod | None = None,
    key_padding: Tensor | None = None,
    q_offset: int = 0,
) -> Tensor:
    """Masked softmax attention over the allowed set of ``pattern``.

    q [B, H, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv] -> [B, H, Tq, Dv] in q's dtype.
    ``window``/``sinks`` configure ``sliding_window``; ``block``/``window_blocks`` configure
    ``power``; ``mask_mod`` is required for ``block`` and rejected otherwise. Query row i is position
    ``q_offset + i`` (``masks.causal_offset``: causal queries end the key sequence), key j is j. ``key_padding`` is bool [B, Tk], True = real token.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"unknown sparse pattern {pattern!r}; expected one of {list(PATTERNS)}")
    if pattern == "block" and mask_mod is None:
        raise ValueError("pattern='block' needs a mask_mod(b, h, q_idx, kv_idx) -> bool")
    if pattern != "block" and mask_mod is not None:
        raise ValueError(f"mask_mod is only used with pattern='block', not {pattern!r}")
    out_dtype = q.dtype
    B, H, Tq, _ = q.shape
    Tk = k.shape[-2]
    q, k, v = prepare_qkv(q, k, v, key_padding)
    if pattern == "sliding_window":
        allowed = dense_mask(sliding_window(window, sinks), None, None, Tq, Tk, q.device, q_offset)
    elif pattern == "power":
        allowed = dense_mask(power(block, window_blocks), None, None, Tq, Tk, q.device, q_offset)
    else:
        allowed = dense_mask(mask_mod, B, H, Tq, Tk, q.device, q_offset)
    if key_padding is not None:
        allowed = allowed & dense_mask(padding(key_padding), B, None, Tq, Tk, q.device)
    return _masked_softmax_attention(q, k, v, scale, allowed).to(out_dtype)


def _masked_softmax_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, allowed: Tensor) -> Tensor:
    scores = (q @ k.mT) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * has_key
    return probs @ v
