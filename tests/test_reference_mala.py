"""MALA reference (VARIANTS.md §6) against explicit float64 weights α_ij = β_i sim_ij − γ_i over the
allowed set (§6.1 bidirectional, §6.2 causal); outputs and gradients."""

import pytest
import torch

from attncc.codegen.variants.mala.reference import mala_attention
from reference_cases import (
    PADDING,
    SHAPES_WITH_D12,
    causal_padding_mask,
    check_against_naive,
    elu1,
    make_key_padding,
    make_qkv,
    repeat_kv_heads,
)


def naive_weights(q, k, *, causal, key_padding=None, sim_scale=None, eps=1e-6):
    """α_ij of §6.1/§6.2 with c_i = s / n_i, n_i = number of allowed keys of row i."""
    k = repeat_kv_heads(k, q.shape[1])
    mask = causal_padding_mask(q.shape[2], k.shape[2], causal=causal, key_padding=key_padding, dtype=q.dtype)
    n = mask.sum(dim=-1, keepdim=True)
    n = torch.where(n > 0, n, 1.0)
    s = q.shape[3] ** -0.5 if sim_scale is None else sim_scale
    sim = s / n * (elu1(q) @ elu1(k).mT) * mask
    z = sim.sum(dim=-1, keepdim=True)
    beta, gamma = 1 + 1 / (z + eps), z / n
    return (beta * sim - gamma) * mask


def naive_mala(q, k, v, **kwargs):
    return naive_weights(q, k, **kwargs) @ repeat_kv_heads(v, q.shape[1])


@pytest.mark.parametrize("pad", PADDING)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("B,H,Hkv,T,D,Dv", SHAPES_WITH_D12)
def test_matches_explicit_weights(B, H, Hkv, T, D, Dv, causal, pad):
    key_padding = make_key_padding(pad, B, T)
    check_against_naive(
        lambda q, k, v: mala_attention(q, k, v, causal=causal, key_padding=key_padding, chunk=16),
        lambda q, k, v: naive_mala(q, k, v, causal=causal, key_padding=key_padding),
        *make_qkv(B, H, Hkv, T, D, Dv),
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_explicit_sim_scale(causal):
    check_against_naive(
        lambda q, k, v: mala_attention(q, k, v, causal=causal, sim_scale=0.7, chunk=5),
        lambda q, k, v: naive_mala(q, k, v, causal=causal, sim_scale=0.7),
        *make_qkv(2, 4, 2, 21, 8, 8),
    )


def test_bidirectional_more_keys_than_queries():
    check_against_naive(
        lambda q, k, v: mala_attention(q, k, v, causal=False),
        lambda q, k, v: naive_mala(q, k, v, causal=False),
        *make_qkv(2, 2, 1, 5, 8, 8, Tk=11),
    )


@pytest.mark.parametrize("pad", PADDING)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_rows_sum_to_one(causal, pad):
    """§10.3 item 6: Σ_j α_ij = Z_i / (Z_i + eps) ≈ 1, so constant values pass through unchanged."""
    q, k, v = make_qkv(2, 4, 2, 40, 16, 8)
    key_padding = make_key_padding(pad, 2, 40)
    alpha = naive_weights(q.double(), k.double(), causal=causal, key_padding=key_padding)
    has_key = alpha.ne(0).any(dim=-1)
    row_sums = alpha.sum(dim=-1)[has_key]
    torch.testing.assert_close(row_sums, torch.ones_like(row_sums), atol=1e-5, rtol=0)
    out = mala_attention(q, k, torch.ones_like(v), causal=causal, key_padding=key_padding)
    has_key = has_key.expand(out.shape[:-1])
    torch.testing.assert_close(out[has_key], torch.ones_like(out)[has_key], atol=1e-5, rtol=0)


def test_keeps_input_dtype():
    q, k, v = (x.bfloat16() for x in make_qkv(1, 2, 1, 9, 8, 8))
    assert mala_attention(q, k, v, causal=True).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(
            lambda q, k, v: mala_attention(q, k[:, :, :5], v[:, :, :5], causal=True), id="causal-Tq-ne-Tk"
        ),
        pytest.param(lambda q, k, v: mala_attention(q, k, v, causal=True, chunk=0), id="chunk-0"),
        pytest.param(lambda q, k, v: mala_attention(q, k[..., :4], v, causal=False), id="head-dim"),
    ],
)
def test_invalid_arguments(call):
    with pytest.raises(ValueError):
        call(*make_qkv(1, 2, 1, 9, 8, 8))
