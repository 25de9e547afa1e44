"""What every variant's reference shares: mask mods for the sparse patterns of VARIANTS.md §8, GQA
repetition, and the input checks.

A mask mod follows the FlexAttention convention (§8.3): ``mask_mod(b, h, q_idx, kv_idx) -> bool
tensor``, True where query ``q_idx`` may attend to key ``kv_idx``. The arguments are integer tensors
that broadcast against each other (``dense_mask`` passes ``[B,1,1,1]``, ``[1,H,1,1]``, ``[1,1,Tq,1]``,
``[1,1,1,Tk]``; FlexAttention passes scalars under vmap).

**Causal queries end the key sequence.** When a causal site has fewer queries than keys (a decode
step, a chunked prefill: the keys are a cache plus the new tokens), query i sits at position
Tk - Tq + i, so it computes exactly what the same position computes in the full sequence. Mask mods
see that position as ``q_idx`` (``dense_mask(..., q_offset=Tk - Tq)``); with Tq == Tk nothing changes.

Every factory returns a function whose
``__name__`` describes it (e.g. ``sliding_window_1024_sinks_4``), because names end up in cache keys
and reports.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

NO_KEY = torch.finfo(torch.float16).min / 2  # an additive mask entry at or below this allows no key (-inf, finfo.min)


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, heads, T, D]: query head h reads kv head h // (heads // Hkv)."""
    kv_heads = x.shape[-3]
    if kv_heads == heads:
        return x
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} kv heads evenly")
    return x.repeat_interleave(heads // kv_heads, dim=-3)


def _named(name: str, mask_mod: MaskMod) -> MaskMod:
    mask_mod.__name__ = name
    mask_mod.__qualname__ = name
    return mask_mod


def causal() -> MaskMod:
    """Query position i sees keys j <= i."""

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    return causal


def sliding_window(window: int, sinks: int = 0) -> MaskMod:
    """StreamingLLM allowed set (§8.1): j <= i and (i - j < window or j < sinks)."""
    if window < 1:
        raise ValueError(f"sliding_window: window must be >= 1, got {window}")
    if sinks < 0:
        raise ValueError(f"sliding_window: sinks must be >= 0, got {sinks}")

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((q_idx - kv_idx < window) | (kv_idx < sinks))

    return _named(f"sliding_window_{window}_sinks_{sinks}", mask_mod)


def power(block: int, window_blocks: int) -> MaskMod:
    """PowerAttention (§8.2), causal, with block distance d = i // block - j // block.

    allowed(i, j) <=> j <= i and (d < window_blocks or d is 0 or a power of two or j < block);
    the first block is the sink. The power-of-two test is ``d & (d - 1) == 0``, which admits d = 0.
    """
    if block < 1:
        raise ValueError(f"power: block must be >= 1, got {block}")
    if window_blocks < 0:
        raise ValueError(f"power: window_blocks must be >= 0, got {window_blocks}")

    def mask_mod(b, h, q_idx, kv_idx):
        distance = q_idx // block - kv_idx // block
        power_of_two = (distance & (distance - 1)) == 0
        return (kv_idx <= q_idx) & ((distance < window_blocks) | power_of_two | (kv_idx < block))

    return _named(f"power_block_{block}_window_{window_blocks}", mask_mod)


def padding(key_padding: Tensor) -> MaskMod:
    """Keys whose ``key_padding[b, kv_idx]`` is True (bool [B, Tk], True = real token)."""
    if key_padding.dtype != torch.bool or key_padding.dim() != 2:
        raise ValueError(
            f"padding: key_padding must be a bool tensor [B, Tk], got {key_padding.dtype} "
            f"{tuple(key_padding.shape)}"
        )

    def key_padding_mask(b, h, q_idx, kv_idx):
        return key_padding[b, kv_idx]

    return key_padding_mask


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """Allowed where every mask mod allows."""
    if not mask_mods:
        raise ValueError("and_masks needs at least one mask mod")

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = mask_mods[0](b, h, q_idx, kv_idx)
        for other in mask_mods[1:]:
            allowed = allowed & other(b, h, q_idx, kv_idx)
        return allowed

    return _named("_and_".join(m.__name__ for m in mask_mods), mask_mod)


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """Allowed where any mask mod allows."""
    if not mask_mods:
        raise ValueError("or_masks needs at least one mask mod")

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = mask_mods[0](b, h, q_idx, kv_idx)
        for other in mask_mods[1:]:
            allowed = allowed | other(b, h, q_idx, kv_idx)
        return allowed

    return _named("_or_".join(m.__name__ for m in mask_mods), mask_mod)


def dense_mask(
    mask_mod: MaskMod,
    B: int | None,
    H: int | None,
    Tq: int,
    Tk: int,
    device: torch.device | str | None = None,
    q_offset: int = 0,
) -> Tensor:
    """Evaluate ``mask_mod`` on every index: bool [B or 1, H or 1, Tq, Tk].

    Pass ``B=None`` / ``H=None`` for a mask that does not depend on the batch / head index; that
    axis then has size 1 and ``mask_mod`` only ever sees index 0 there. Query row i is position
    ``q_offset + i`` (``causal_offset``).
    """
    shape = (B or 1, H or 1, Tq, Tk)
    b = torch.arange(shape[0], device=device).view(-1, 1, 1, 1)
    h = torch.arange(shape[1], device=device).view(1, -1, 1, 1)
    q_idx = (torch.arange(Tq, device=device) + q_offset).view(1, 1, -1, 1)
    kv_idx = torch.arange(Tk, device=device).view(1, 1, 1, -1)
    mask = mask_mod(b, h, q_idx, kv_idx)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask mod {mask_mod.__name__!r} returned {mask.dtype}, expected torch.bool")
    return mask.expand(shape).contiguous()


def causal_offset(tq: int, tk: int) -> int:
    """Position of a causal site's first query: Tk - Tq (its queries end the key sequence)."""
    if tq > tk:
        raise ValueError(f"causal attention needs at most as many queries as keys (the queries end the key "
                         f"sequence), got Tq={tq}, Tk={tk}")
    return tk - tq


def prepare_qkv(q: Tensor, k: Tensor, v: Tensor, key_padding: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Check the shapes every reference accepts and return float32 q, k, v with H heads each.

    q [B, H, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv], key_padding bool [B, Tk] or None.
    GQA: query head h uses kv head h // (H // Hkv), so k and v are repeated along the head axis
    (``repeat_kv``).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, _, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch or head dim")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} must match k {tuple(k.shape)} in batch, heads and length")
    if H % Hkv != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if key_padding is not None and (key_padding.dtype != torch.bool or tuple(key_padding.shape) != (B, Tk)):
        raise ValueError(
            f"key_padding must be a bool tensor of shape {(B, Tk)} (True = real token), got "
            f"{key_padding.dtype} {tuple(key_padding.shape)}"
        )
    # contiguous: AOT autograd can mis-trace views of transposed inputs in the backward (torch 2.13)
    return q.float().contiguous(), repeat_kv(k.float(), H).contiguous(), repeat_kv(v.float(), H).contiguous()
