"""MALA reference (VARIANTS.md §6) against explicit float64 weights α_ij = β_i sim_ij − γ_i over the
allowed set (§6.1 bidirectional, §6.2 causal); outputs and gradients."""

import pytest
import torch

from attncc.codegen.reference.mala import mala_attention


def case(B, H, Hkv, T, D, Dv=None):
    Dv = Dv or D
    suffix = f"-Dv{Dv}" if Dv != D else ""
    return pytest.param(B, H, Hkv, T, D, Dv, id=f"B{B}-H{H}-Hkv{Hkv}-T{T}-D{D}{suffix}")


SHAPES = [
    case(1, 1, 1, 1, 8),
    case(2, 4, 2, 7, 16),
    case(2, 4, 1, 63, 16, 8),
    case(1, 4, 4, 130, 8),
    case(2, 2, 1, 33, 12),
]
PADDING = ["none", "right", "left"]


def make_key_padding(kind, B, T):
    if kind == "none":
        return None
    key_padding = torch.ones(B, T, dtype=torch.bool)
    for b in range(B):
        pad = (b + 1) * T // 4
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
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(
            actual.double(), want, rtol=0, atol=tol * scale, msg=lambda m: f"{name}: {m}"
        )


def elu1(x):
    return torch.where(x > 0, x + 1, torch.exp(x))


def naive_weights(q, k, *, causal, key_padding=None, sim_scale=None, eps=1e-6):
    """α_ij of §6.1/§6.2 with c_i = s / n_i, n_i = number of allowed keys of row i."""
    H, Hkv, Tq, Tk, D = q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3]
    k = k[:, torch.arange(H) // (H // Hkv)]
    i, j = torch.arange(Tq).view(-1, 1), torch.arange(Tk).view(1, -1)
    mask = (j <= i) if causal else torch.ones(Tq, Tk, dtype=torch.bool)
    mask = mask.view(1, 1, Tq, Tk).to(q.dtype)
    if key_padding is not None:
        mask = mask * key_padding[:, None, None, :]
    n = mask.sum(dim=-1, keepdim=True)
    n = torch.where(n > 0, n, 1.0)
    s = D**-0.5 if sim_scale is None else sim_scale
    sim = s / n * (elu1(q) @ elu1(k).mT) * mask
    z = sim.sum(dim=-1, keepdim=True)
    beta, gamma = 1 + 1 / (z + eps), z / n
    return (beta * sim - gamma) * mask


def naive_mala(q, k, v, **kwargs):
    H, Hkv = q.shape[1], k.shape[1]
    return naive_weights(q, k, **kwargs) @ v[:, torch.arange(H) // (H // Hkv)]


@pytest.mark.parametrize("pad", PADDING)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("B,H,Hkv,T,D,Dv", SHAPES)
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
