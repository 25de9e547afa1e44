"""The run-time mask check against its definition: mask == structure & key padding, built out in full,
for the site's T queries (a mask with one row is shared by every query; causal queries end the keys)."""

from __future__ import annotations

import pytest
import torch

from attncc.codegen.runtime_mask import check

T = 9


def _structure(kind: str, window: int, tq: int, tk: int) -> torch.Tensor:
    i, j = torch.arange(tk - tq, tk)[:, None], torch.arange(tk)[None, :]
    if kind == "none":
        return torch.ones(tq, tk, dtype=torch.bool)
    out = j <= i
    return out & (i - j < window) if kind == "sliding_window" else out


def _definition(mask: torch.Tensor, kind: str, window: int, tq: int) -> bool:
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(*m.shape[:-2], tq, m.shape[-1])
    ok = m if m.dtype == torch.bool else m > torch.finfo(torch.float16).min / 2
    if m.dtype != torch.bool and bool((torch.where(ok, m, 0) != 0).any()):
        return False
    keys = ok.any(dim=-2)
    if not bool((keys == keys[:, :1]).all()):
        return False
    tk = ok.shape[-1]
    if kind != "none" and (tq > tk or tq < tk and not bool(keys[..., tk - tq:].all())):
        return False
    return bool((ok == (_structure(kind, window, tq, tk) & keys[:, :, None, :])).all())


def _keys(b: int, pad: str) -> torch.Tensor:
    keys = torch.ones(b, T, dtype=torch.bool)
    if pad == "left":
        keys[0, :3] = False
    elif pad == "right":
        keys[-1, -2:] = False
    elif pad == "empty":
        keys[-1] = False
    return keys


def _masks():
    g = torch.Generator().manual_seed(0)
    for kind, window in (("none", 0), ("causal", 0), ("sliding_window", 3)):
        for pad in ("none", "left", "right", "empty"):
            base = _structure(kind, window, T, T) & _keys(2, pad)[:, None, None, :]
            yield f"{kind}-{pad}", base
            yield f"{kind}-{pad}-additive", torch.zeros(base.shape).masked_fill(~base, torch.finfo(torch.float32).min)
            yield f"{kind}-{pad}-neg-inf", torch.zeros(base.shape).masked_fill(~base, float("-inf"))
            broken = base.clone()
            broken[0, 0, T - 1, 0] = ~broken[0, 0, T - 1, 0]
            yield f"{kind}-{pad}-one-flipped", broken
    causal = _structure("causal", 0, T, T)
    doc = torch.arange(T) >= 5
    yield "packed-documents", causal & (doc[:, None] == doc[None, :])
    yield "per-head", torch.stack([causal, causal & _keys(1, "left")[0]])[None]
    yield "bias", torch.randn(1, 1, T, T, generator=g)
    yield "query-broadcast", _keys(2, "right")[:, None, None, :]
    yield "2-d", causal
    yield "rectangular", torch.ones(1, 1, 1, T, dtype=torch.bool)
    yield "random", torch.rand(2, 1, T, T, generator=g) > 0.5


@pytest.mark.parametrize("kind,window", [("none", 0), ("causal", 0), ("sliding_window", 3)])
@pytest.mark.parametrize("name,mask", list(_masks()), ids=[name for name, _ in _masks()])
def test_check_is_the_definition(name, mask, kind, window):
    keys, problem = check(mask, kind, window, T)
    assert (problem is None) == _definition(mask, kind, window, T), problem
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(torch.float16).min / 2
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    assert torch.equal(keys, allowed.any(dim=-2)[:, 0])
