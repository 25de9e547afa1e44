"""LSSA / LSSAR reference (VARIANTS.md §5) against the direct (non-log) formula in float64:
A1 = softplus(c q̂k̂ᵀ) ⊙ M / rowsum, A2 = ReLU(n A1 − o)^p / rowsum; outputs and gradients."""

import math

import pytest
import torch

from attncc.codegen.variants.softplus.reference import softplus_attention
from reference_cases import (
    PADDING,
    SHAPES,
    causal_padding_mask,
    check_against_naive,
    make_key_padding,
    make_qkv,
    repeat_kv_heads,
)


def naive_weights(q, k, *, causal, p, key_padding=None, eps=1e-8):
    """Direct formula of §5.1; a row whose re-weights are all zero keeps its LSSA weights."""
    Tq, D = q.shape[2], q.shape[3]
    k = repeat_kv_heads(k, q.shape[1])
    mask = causal_padding_mask(Tq, k.shape[2], causal=causal, key_padding=key_padding, dtype=q.dtype)
    n = mask.sum(dim=-1, keepdim=True)
    c = math.log(D) * torch.log(torch.where(n > 0, n, 1.0))
    cosine = (q / q.norm(dim=-1, keepdim=True)) @ (k / k.norm(dim=-1, keepdim=True)).mT
    a = torch.log1p(torch.exp(c * cosine)) * mask
    a1 = a / (a.sum(dim=-1, keepdim=True) + eps)
    if p == 0:
        return a1
    offset = (torch.arange(Tq).view(-1, 1) >= 3).to(q.dtype)
    w = torch.relu(n * a1 - offset) ** p * mask
    total = w.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, w / torch.where(total > 0, total, 1.0), a1)


def naive_softplus(q, k, v, **kwargs):
    return naive_weights(q, k, **kwargs) @ repeat_kv_heads(v, q.shape[1])


@pytest.mark.parametrize("p", [0.0, 3.0, 15.0], ids=["lssa", "lssar-p3", "lssar-p15"])
@pytest.mark.parametrize("pad", PADDING)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("B,H,Hkv,T,D,Dv", SHAPES)
def test_matches_direct_formula(B, H, Hkv, T, D, Dv, causal, pad, p):
    key_padding = make_key_padding(pad, B, T)
    check_against_naive(
        lambda q, k, v: softplus_attention(q, k, v, causal=causal, reweight_p=p, key_padding=key_padding),
        lambda q, k, v: naive_softplus(q, k, v, causal=causal, p=p, key_padding=key_padding),
        *make_qkv(B, H, Hkv, T, D, Dv),
    )


def peaked_inputs(T=1000, D=16, seed=0):
    """Every query points along e0 and every key against it, except key 7: rows with n_i ≳ 370 then
    have n_i · A1 ≈ n_i on key 7, and (n_i · A1)^15 overflows float32."""
    g = torch.Generator().manual_seed(seed)
    e0 = torch.zeros(D)
    e0[0] = 1.0
    q = e0 + 0.1 * torch.randn(1, 1, T, D, generator=g)
    k = -e0 + 0.1 * torch.randn(1, 1, T, D, generator=g)
    k[:, :, 7] = e0
    v = torch.randn(1, 1, T, 8, generator=g)
    return q, k, v


def test_log_domain_stays_finite_where_direct_overflows():
    """§10.3 item 7: the log-domain form equals the direct one (float64) where float32 direct overflows."""
    q, k, v = peaked_inputs()
    direct32 = naive_softplus(q, k, v, causal=True, p=15.0)
    assert not torch.isfinite(direct32[0, 0, 500:]).any(), "inputs should overflow the float32 direct formula"
    check_against_naive(
        lambda q, k, v: softplus_attention(q, k, v, causal=True, reweight_p=15.0),
        lambda q, k, v: naive_softplus(q, k, v, causal=True, p=15.0),
        q,
        k,
        v,
    )


def test_uniform_rows_fall_back_to_lssa_weights():
    """Rows where every n_i · A1_ij − 1 <= 0 keep A1 (no NaN): identical keys give uniform rows, and a
    row past the first three with a single visible key has x = A1 − 1 <= 0."""
    q = torch.ones(1, 1, 8, 4).requires_grad_()
    k = torch.ones(1, 1, 8, 4).requires_grad_()
    v = torch.randn(1, 1, 8, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    out = softplus_attention(q, k, v, causal=True, reweight_p=15.0)
    prefix_mean = v.detach().cumsum(dim=2) / torch.arange(1, 9).view(1, 1, -1, 1)
    torch.testing.assert_close(out.detach(), prefix_mean)
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))

    q, k, v = (x.requires_grad_() for x in make_qkv(1, 2, 1, 6, 8, 8))
    key_padding = torch.tensor([[False, False, False, True, True, True]])
    out = softplus_attention(q, k, v, causal=True, reweight_p=15.0, key_padding=key_padding)
    torch.testing.assert_close(out[0, :, 3].detach(), v[0, 0, 3].detach().expand(2, -1))
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_keeps_input_dtype():
    q, k, v = (x.bfloat16() for x in make_qkv(1, 2, 1, 9, 8, 8))
    assert softplus_attention(q, k, v, causal=True).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(
            lambda q, k, v: softplus_attention(q, k, v, causal=True, reweight_p=-1.0), id="negative-p"
        ),
        pytest.param(lambda q, k, v: softplus_attention(q, k, v[:, :, :4], causal=True), id="v-length"),
        pytest.param(
            lambda q, k, v: softplus_attention(q, k, v, causal=False, key_padding=torch.ones(1, 9)),
            id="padding-not-bool",
        ),
    ],
)
def test_invalid_arguments(call):
    with pytest.raises(ValueError):
        call(*make_qkv(1, 2, 1, 9, 8, 8))
