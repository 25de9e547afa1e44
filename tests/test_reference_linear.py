"""Linear attention reference (VARIANTS.md §2, §3.1, §4) against the masked quadratic form in float64:
O = ((φQ φKᵀ) ⊙ M) V / (rowsum + eps), M = causal/decay/padding mask, outputs and gradients."""

import math

import pytest
import torch

from attncc.codegen.variants.linear.reference import (
    constant_decay_rates,
    feature_map,
    lightning_decay_rates,
    linear_attention,
)
from reference_cases import (
    PADDING,
    SHAPES_WITH_D12,
    check_against_naive,
    elu1,
    make_key_padding,
    make_qkv,
    repeat_kv_heads,
)


RATES = torch.tensor([0.5, 0.1, 0.0, 0.02])


def taylor2_kernel(q, k):
    s = q @ k.mT / math.sqrt(q.shape[-1])
    return 1 + s + s**2 / 2


KERNELS = {
    "elu1": lambda q, k: elu1(q) @ elu1(k).mT,
    "relu": lambda q, k: q.clamp(min=0) @ k.clamp(min=0).mT,
    "identity": lambda q, k: q @ k.mT,
    "taylor2": taylor2_kernel,
}


def naive_linear(q, k, v, *, causal, kernel="elu1", normalize=True, rates=None, key_padding=None, eps=1e-6):
    H, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    k, v = repeat_kv_heads(k, H), repeat_kv_heads(v, H)
    weights = KERNELS[kernel](q, k)
    t, s = torch.arange(Tq).view(-1, 1), torch.arange(Tk).view(1, -1)
    mask = torch.ones(1, 1, Tq, Tk, dtype=torch.float64)
    if causal:
        rate = torch.zeros(H) if rates is None else rates
        decay = torch.exp(-rate.double().view(1, H, 1, 1) * (t - s))
        mask = torch.where(s <= t, decay, 0.0)
    if key_padding is not None:
        mask = mask * key_padding[:, None, None, :]
    weights = weights * mask
    out = weights @ v
    if normalize:
        out = out / (weights.sum(dim=-1, keepdim=True) + eps)
    return out


@pytest.mark.parametrize("pad", PADDING)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("B,H,Hkv,T,D,Dv", SHAPES_WITH_D12)
def test_matches_quadratic_form(B, H, Hkv, T, D, Dv, causal, pad):
    key_padding = make_key_padding(pad, B, T)
    check_against_naive(
        lambda q, k, v: linear_attention(q, k, v, causal=causal, key_padding=key_padding, chunk=16),
        lambda q, k, v: naive_linear(q, k, v, causal=causal, key_padding=key_padding),
        *make_qkv(B, H, Hkv, T, D, Dv),
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(
    "name,normalize", [("elu1", False), ("relu", False), ("identity", False), ("taylor2", True)]
)
def test_feature_maps(name, normalize, causal):
    key_padding = make_key_padding("right", 2, 63)
    check_against_naive(
        lambda q, k, v: linear_attention(
            q, k, v, causal=causal, feature_map=name, normalize=normalize, key_padding=key_padding, chunk=16
        ),
        lambda q, k, v: naive_linear(
            q, k, v, causal=causal, kernel=name, normalize=normalize, key_padding=key_padding
        ),
        *make_qkv(2, 4, 2, 63, 16, 16),
    )


@pytest.mark.parametrize("chunk", [7, 64])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "unnormalized"])
@pytest.mark.parametrize("pad", PADDING)
@pytest.mark.parametrize("B,H,Hkv,T,D,Dv", SHAPES_WITH_D12)
def test_decay_matches_masked_decay_matrix(B, H, Hkv, T, D, Dv, pad, normalize, chunk):
    """Lightning-2 intra/inter split (§4.5) == O = ((φQ φKᵀ) ⊙ M) V with M_ts = λ^{t−s} (§4.1)."""
    key_padding, rates = make_key_padding(pad, B, T), RATES[:H]
    check_against_naive(
        lambda q, k, v: linear_attention(
            q, k, v, causal=True, normalize=normalize, decay=rates, key_padding=key_padding, chunk=chunk
        ),
        lambda q, k, v: naive_linear(
            q, k, v, causal=True, normalize=normalize, rates=rates, key_padding=key_padding
        ),
        *make_qkv(B, H, Hkv, T, D, Dv),
    )


def test_taylor2_identity():
    """§3.1 / §10.3 item 5: φ(x)·φ(y) = 1 + s + s²/2, s = x·y/√d', feature size 273 for d' = 16."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=g, dtype=torch.float64)
    y = torch.randn(7, 16, generator=g, dtype=torch.float64)
    fx, fy = feature_map(x, "taylor2"), feature_map(y, "taylor2")
    assert fx.shape == (5, 273)
    s = x @ y.T / 4
    torch.testing.assert_close(fx @ fy.T, 1 + s + s**2 / 2, rtol=1e-12, atol=1e-12)


def test_lightning_decay_rates_formula():
    """§4.2 code convention, H = 8, L = 4: s_{h,l} = 2^{−8h/8} (1 − l/3 + 1e−5), h = 1..8."""
    for layer in range(4):
        expected = torch.tensor([2.0 ** -h * (1 - layer / 3 + 1e-5) for h in range(1, 9)])
        torch.testing.assert_close(lightning_decay_rates(8, layer, 4), expected.float())


def test_lightning_decay_rates_non_power_of_two_heads():
    """ALiBi fallback for H = 6: slopes of H = 4, then every other slope of H = 8."""
    expected = torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]) * (1 + 1e-5)
    torch.testing.assert_close(lightning_decay_rates(6, 0, 2), expected.float())


def test_constant_decay_rates():
    torch.testing.assert_close(constant_decay_rates(3, 0.5), torch.full((3,), math.log(2.0)))
    assert torch.equal(constant_decay_rates(2, 1.0), torch.zeros(2))


def test_keeps_input_dtype():
    q, k, v = (x.bfloat16() for x in make_qkv(1, 2, 1, 9, 8, 8))
    assert linear_attention(q, k, v, causal=True).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(
            lambda q, k, v: linear_attention(q, k, v, causal=True, feature_map="softmax"), id="bad-map"
        ),
        pytest.param(lambda q, k, v: feature_map(q, "cosine"), id="bad-map-fn"),
        pytest.param(
            lambda q, k, v: linear_attention(q, k, v, causal=False, decay=RATES[:2]), id="decay-bidirectional"
        ),
        pytest.param(lambda q, k, v: linear_attention(q, k, v, causal=True, decay=RATES), id="decay-shape"),
        pytest.param(
            lambda q, k, v: linear_attention(q, k, v, causal=True, decay=-RATES[:2]), id="decay-negative"
        ),
        pytest.param(
            lambda q, k, v: linear_attention(q, k[:, :, :5], v[:, :, :5], causal=True), id="causal-Tq-ne-Tk"
        ),
        pytest.param(lambda q, k, v: linear_attention(q, k, v, causal=True, chunk=0), id="chunk-0"),
        pytest.param(
            lambda q, k, v: linear_attention(
                torch.randn(1, 3, 9, 8), k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), causal=True
            ),
            id="heads-not-multiple",
        ),
        pytest.param(lambda q, k, v: lightning_decay_rates(8, 4, 4), id="layer-out-of-range"),
        pytest.param(lambda q, k, v: constant_decay_rates(8, 0.0), id="lam-0"),
    ],
)
def test_invalid_arguments(call):
    with pytest.raises(ValueError):
        call(*make_qkv(1, 2, 1, 9, 8, 8))
