"""Sparse attention reference (VARIANTS.md §8) against a float64 dense masked softmax whose mask is
built by explicit python loops over (b, h, i, j); outputs and gradients."""

import functools
import math

import pytest
import torch

from attncc.codegen.variants.sparse.reference import sparse_attention
from reference_cases import (
    PADDING,
    SHAPES,
    check_against_naive,
    is_power_of_two_or_zero,
    make_key_padding,
    make_qkv,
    repeat_kv_heads,
)


def allowed_sliding_window(b, h, i, j, *, window, sinks):
    return j <= i and (i - j < window or j < sinks)


def allowed_power(b, h, i, j, *, block, window_blocks):
    distance = i // block - j // block
    return j <= i and (distance < window_blocks or is_power_of_two_or_zero(distance) or j < block)


def allowed_user(b, h, i, j):
    return j <= i + b or (h % 2 == 1 and abs(i - j) < 3)


def user_mask_mod(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx + b) | ((h % 2 == 1) & ((q_idx - kv_idx).abs() < 3))


@functools.lru_cache(maxsize=None)
def loop_mask(allowed, B, H, Tq, Tk):
    return torch.tensor(
        [[[[allowed(b, h, i, j) for j in range(Tk)] for i in range(Tq)] for h in range(H)] for b in range(B)]
    )


def naive_sparse(q, k, v, allowed, key_padding, scale):
    k, v = repeat_kv_heads(k, q.shape[1]), repeat_kv_heads(v, q.shape[1])
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, None, :]
    scores = q @ k.mT * scale
    row_max = scores.masked_fill(~allowed, -math.inf).amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    weights = torch.exp(scores - row_max) * allowed
    total = weights.sum(dim=-1, keepdim=True)
    return (weights / torch.where(total > 0, total, 1.0)) @ v


PATTERNS = [
    pytest.param(
        dict(pattern="sliding_window", window=5, sinks=2),
        functools.partial(allowed_sliding_window, window=5, sinks=2),
        id="swa-5-sinks-2",
    ),
    pytest.param(
        dict(pattern="sliding_window", window=16),
        functools.partial(allowed_sliding_window, window=16, sinks=0),
        id="swa-16",
    ),
    pytest.param(
        dict(pattern="power", block=4, window_blocks=2),
        functools.partial(allowed_power, block=4, window_blocks=2),
        id="power-4-2",
    ),
    pytest.param(
        dict(pattern="power", block=3, window_blocks=1),
        functools.partial(allowed_power, block=3, window_blocks=1),
        id="power-3-1",
    ),
    pytest.param(dict(pattern="block", mask_mod=user_mask_mod), allowed_user, id="block-user"),
]


@pytest.mark.parametrize("pad", PADDING)
@pytest.mark.parametrize("kwargs,allowed", PATTERNS)
@pytest.mark.parametrize("B,H,Hkv,T,D,Dv", SHAPES)
def test_matches_dense_masked_softmax(B, H, Hkv, T, D, Dv, kwargs, allowed, pad):
    key_padding, scale = make_key_padding(pad, B, T), D**-0.5
    mask = loop_mask(allowed, B, H, T, T)
    check_against_naive(
        lambda q, k, v: sparse_attention(q, k, v, scale=scale, key_padding=key_padding, **kwargs),
        lambda q, k, v: naive_sparse(q, k, v, mask, key_padding, scale),
        *make_qkv(B, H, Hkv, T, D, Dv),
    )


def test_more_keys_than_queries_is_top_left_aligned():
    mask = loop_mask(functools.partial(allowed_sliding_window, window=3, sinks=1), 1, 1, 5, 9)
    check_against_naive(
        lambda q, k, v: sparse_attention(q, k, v, scale=0.3, pattern="sliding_window", window=3, sinks=1),
        lambda q, k, v: naive_sparse(q, k, v, mask, None, 0.3),
        *make_qkv(2, 2, 1, 5, 8, 8, Tk=9),
    )


def test_row_without_keys_outputs_zero_with_finite_grads():
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 2, 1, 6, 8, 8))
    key_padding = torch.tensor([[False, False, True, True, True, True]])
    out = sparse_attention(q, k, v, scale=1.0, pattern="sliding_window", window=4, key_padding=key_padding)
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_keeps_input_dtype():
    q, k, v = (x.bfloat16() for x in make_qkv(1, 2, 1, 9, 8, 8))
    assert sparse_attention(q, k, v, scale=0.5, pattern="power", block=2).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(pattern="dilated"), id="bad-pattern"),
        pytest.param(dict(pattern="block"), id="block-without-mask-mod"),
        pytest.param(dict(pattern="power", mask_mod=user_mask_mod), id="mask-mod-with-power"),
        pytest.param(dict(pattern="sliding_window", window=0), id="window-0"),
        pytest.param(dict(pattern="power", block=0), id="block-size-0"),
        pytest.param(
            dict(pattern="power", key_padding=torch.ones(1, 8, dtype=torch.bool)), id="padding-shape"
        ),
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        sparse_attention(*make_qkv(1, 2, 1, 9, 8, 8), scale=1.0, **kwargs)
