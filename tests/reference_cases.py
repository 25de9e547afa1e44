"""Helpers shared by the reference tests (test_reference_*.py) and the flash-kernel tests: the shape
tables, the q/k/v and key-padding makers, pieces of the naive float64 formulas, and the comparison of
a reference (float32 leaves) against a naive computation (float64 leaves), outputs and gradients."""

import pytest
import torch


def case(B, H, Hkv, T, D, Dv=None):
    Dv = Dv or D
    suffix = f"-Dv{Dv}" if Dv != D else ""
    return pytest.param(B, H, Hkv, T, D, Dv, id=f"B{B}-H{H}-Hkv{Hkv}-T{T}-D{D}{suffix}")


# For @pytest.mark.parametrize("B,H,Hkv,T,D,Dv", ...).
SHAPES = [
    case(1, 1, 1, 1, 8),
    case(2, 4, 2, 7, 16),
    case(2, 4, 1, 63, 16, 8),
    case(1, 4, 4, 130, 8),
]
SHAPES_WITH_D12 = [*SHAPES, case(2, 2, 1, 33, 12)]
PADDING = ["none", "right", "left"]


def make_key_padding(kind, B, T, divisor=4):
    """None for "none"; else batch row b has its last ("right") or first ("left") (b + 1) * T // divisor
    keys masked out."""
    if kind == "none":
        return None
    key_padding = torch.ones(B, T, dtype=torch.bool)
    for b in range(B):
        pad = (b + 1) * T // divisor
        if kind == "right":
            key_padding[b, T - pad :] = False
        else:
            key_padding[b, :pad] = False
    return key_padding


def make_qkv(B, H, Hkv, Tq, D, Dv, Tk=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    Tk = Tk or Tq
    return (
        torch.randn(B, H, Tq, D, generator=g),
        torch.randn(B, Hkv, Tk, D, generator=g),
        torch.randn(B, Hkv, Tk, Dv, generator=g),
    )


def repeat_kv_heads(x, H):
    """(B, Hkv, T, d) -> (B, H, T, d): query head h reads key/value head h // (H // Hkv)."""
    return x[:, torch.arange(H) // (H // x.shape[1])]


def causal_padding_mask(Tq, Tk, *, causal, key_padding, dtype):
    """(1 or B, 1, Tq, Tk) mask in dtype: 1 where key j is visible to query i (j <= i when causal),
    times the key padding."""
    i, j = torch.arange(Tq).view(-1, 1), torch.arange(Tk).view(1, -1)
    mask = (j <= i) if causal else torch.ones(Tq, Tk, dtype=torch.bool)
    mask = mask.view(1, 1, Tq, Tk).to(dtype)
    if key_padding is not None:
        mask = mask * key_padding[:, None, None, :]
    return mask


def elu1(x):
    return torch.where(x > 0, x + 1, torch.exp(x))


def is_power_of_two_or_zero(d):
    return d == 0 or (d > 0 and d & (d - 1) == 0)


def assert_close_scaled(name, actual, expected, tol):
    """|actual - expected| <= tol * max(1, max |expected|), compared in float64."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=0, atol=tol * scale, msg=lambda m: f"{name}: {m}"
    )


def check_against_naive(reference, naive, q, k, v, tol=1e-4):
    """reference on float32 leaves vs naive on float64 leaves: output and dq, dk, dv."""
    ours = [x.clone().requires_grad_() for x in (q, k, v)]
    theirs = [x.double().requires_grad_() for x in (q, k, v)]
    out, expected = reference(*ours), naive(*theirs)
    assert out.dtype == q.dtype and out.shape == expected.shape
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out * grad_out.float()).sum().backward()
    (expected * grad_out).sum().backward()
    pairs = [("out", out, expected)] + [(f"d{n}", a.grad, b.grad) for n, a, b in zip("qkv", ours, theirs)]
    for name, actual, want in pairs:
        assert_close_scaled(name, actual, want, tol)
