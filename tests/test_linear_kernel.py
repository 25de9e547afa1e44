"""The chunked linear-attention kernels (codegen/variants/linear/chunked.py) against the linear reference.

The reference (reference.py) is itself checked against independent float64 computations in
test_reference_linear.py. CPU: the Triton interpreter in float32, every configuration the kernels
take (feature maps, normalize, decay none / constant / per-head, causal and bidirectional, GQA, key
padding, lengths that are not a multiple of the chunk), outputs and all three gradients, with the
launchers' buffers NaN-poisoned (conftest.py). GPU (`-m gpu`): bfloat16 at long sequences.
"""

from __future__ import annotations

import pytest
import torch

import attncc.codegen.variants  # noqa: F401  (registers the ops)
from attncc.codegen.variants.linear import chunked, ops
from attncc.codegen.variants.linear.reference import constant_decay_rates, lightning_decay_rates

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _rates(kind: str, heads: int):
    if kind == "none":
        return None
    if kind == "constant":
        return constant_decay_rates(heads, 0.9)
    return lightning_decay_rates(heads, 0, 3) * 16  # steep enough that the decay matters inside a chunk


def case(B, H, Hkv, T, D, Dv, *, causal=True, feature_map="elu1", normalize=True, decay="none", padded=False):
    name = (f"B{B}-H{H}-Hkv{Hkv}-T{T}-D{D}-Dv{Dv}-{'causal' if causal else 'bidir'}-{feature_map}"
            f"-{'norm' if normalize else 'raw'}-decay_{decay}" + ("-padded" if padded else ""))
    return pytest.param(dict(B=B, H=H, Hkv=Hkv, T=T, D=D, Dv=Dv, causal=causal, feature_map=feature_map,
                             normalize=normalize, decay=decay, padded=padded), id=name)


CASES = [
    case(2, 4, 2, 70, 16, 16),
    case(2, 4, 2, 70, 16, 24, padded=True),
    case(1, 2, 2, 64, 32, 16, feature_map="relu", normalize=False),
    case(1, 2, 1, 129, 16, 16, feature_map="identity", normalize=False, padded=True),
    case(1, 4, 2, 150, 16, 16, feature_map="relu", decay="lightning", padded=True),
    case(1, 2, 2, 100, 16, 32, feature_map="identity", normalize=False, decay="constant"),
    case(2, 2, 2, 65, 20, 16, causal=False),
    case(2, 4, 1, 33, 16, 16, causal=False, feature_map="identity", normalize=False, padded=True),
    case(1, 2, 2, 7, 16, 16, feature_map="elu1", decay="constant"),
    case(1, 2, 1, 70, 80, 48, padded=True),  # the scans split the state into 2 x 2 blocks
    case(1, 2, 2, 70, 80, 48, causal=False, feature_map="relu", normalize=False),
]


def _inputs(p, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(p["B"], p["H"], p["T"], p["D"], generator=g)
    k = torch.randn(p["B"], p["Hkv"], p["T"], p["D"], generator=g)
    v = torch.randn(p["B"], p["Hkv"], p["T"], p["Dv"], generator=g)
    q, k, v = (x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v))
    key_padding = None
    if p["padded"]:
        key_padding = torch.ones(p["B"], p["T"], dtype=torch.bool, device=device)
        key_padding[0, : min(5, p["T"] - 1)] = False  # left padding: the first rows see no key
        key_padding[-1, -3:] = False
    rates = _rates(p["decay"], p["H"])
    rates = None if rates is None else rates.to(device)
    return q, k, v, key_padding, rates


def _constants(p):
    return p["causal"], p["feature_map"], p["normalize"], 1e-6


@pytest.mark.parametrize("p", CASES)
@pytest.mark.parametrize("with_den", [False, True], ids=["site", "den"])
def test_kernel_matches_the_reference(p, with_den):
    """As a linear site calls it (the normalizer only to normalize), and with den computed too (MALA's
    call; its gradient unused here, so the backward skips the normalizer's terms either way)."""
    if p["normalize"] and with_den:
        pytest.skip("normalize computes den either way")
    q, k, v, key_padding, rates = _inputs(p)
    o, den, _, z = torch.ops.attncc.linear_chunked(q, k, v, key_padding, rates, *_constants(p), False,
                                                    p["normalize"] or with_den)
    assert (den.numel() > 0) == (p["normalize"] or with_den) == (z.numel() > 0)
    want = ops.reference(q, k, v, key_padding, rates, *_constants(p))
    torch.testing.assert_close(o, want, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(want)
    got = torch.autograd.grad(o, (q, k, v), grad)
    expected = torch.autograd.grad(want, (q, k, v), grad)
    for name, a, b in zip("qkv", got, expected):
        scale = b.abs().max().clamp(min=1.0)
        torch.testing.assert_close(a / scale, b / scale, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")


def test_rows_with_no_visible_key_are_zero():
    p = dict(B=1, H=2, Hkv=2, T=70, D=16, Dv=16, causal=True, feature_map="elu1", normalize=True, decay="none",
             padded=True)
    q, k, v, key_padding, rates = _inputs(p)
    o, *_ = torch.ops.attncc.linear_chunked(q, k, v, key_padding, rates, *_constants(p), False)
    assert torch.equal(o[0, :, :5], torch.zeros_like(o[0, :, :5]))


@pytest.mark.parametrize("p", CASES[:1] + CASES[3:5] + CASES[6:8])
def test_opcheck(p):
    q, k, v, key_padding, rates = _inputs(p)
    torch.library.opcheck(torch.ops.attncc.linear_chunked.default,
                          (q, k, v, key_padding, rates, *_constants(p), False, p["normalize"]))


def test_normalizer_output_is_the_unnormalized_row_sum():
    """den (what MALA builds on) is Σ_j w_tj with the same weights as num."""
    p = dict(B=1, H=2, Hkv=2, T=70, D=16, Dv=16, causal=True, feature_map="elu1", normalize=False, decay="none",
             padded=False)
    q, k, v, _, _ = _inputs(p)
    _, den, _, _ = torch.ops.attncc.linear_chunked(q, k, v, None, None, *_constants(p), True)
    ones = torch.ones_like(v)
    want = ops.reference(q, k, ones, None, None, True, "elu1", False, 0.0)[..., 0]
    torch.testing.assert_close(den, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_dden", [False, True], ids=["o_only", "with_dden"])
def test_normalized_grads_read_strided_dO(with_dden):
    """The fused backward of o = num / (den + eps) against its formula, with dO a transposed view (what the
    gradient of a model's o.transpose(1, 2) is), a length that is not a multiple of the chunk and Dv < 16."""
    B, H, T, DV, eps = 2, 3, 70, 12, 1e-6
    g = torch.Generator().manual_seed(0)
    do = torch.randn(B, T, H, DV, generator=g).transpose(1, 2)
    o = torch.randn(B, H, T, DV, generator=g)
    den = torch.rand(B, H, T, generator=g) + 0.1
    dden = torch.randn(B, H, T, generator=g).transpose(1, 2).contiguous().transpose(1, 2) if with_dden else None
    got_g, got_d = chunked.normalized_grads(do, o, den, dden, eps, torch.float32)
    r = 1 / (den + eps)
    want_d = -(do * o).sum(-1) * r + (dden if with_dden else 0)
    torch.testing.assert_close(got_g, do * r[..., None])
    torch.testing.assert_close(got_d, want_d)


def test_supports_names_what_it_cannot_do():
    assert "taylor2" in chunked.supports(16, 16, torch.float32, "taylor2")
    assert "128" in chunked.supports(256, 16, torch.float32, "elu1")
    assert chunked.supports(128, 128, torch.bfloat16, "elu1") is None


@pytest.mark.gpu
@pytest.mark.parametrize("p", [
    case(1, 16, 4, 8192, 128, 128),
    case(1, 16, 4, 4099, 128, 128, feature_map="identity", normalize=False, padded=True),
    case(2, 8, 8, 2048, 64, 64, feature_map="relu", decay="lightning"),
    case(1, 8, 2, 3000, 128, 128, causal=False),
])
def test_kernel_bf16_on_gpu(p):
    q, k, v, key_padding, rates = _inputs(p, torch.bfloat16, "cuda")
    o, *_ = torch.ops.attncc.linear_chunked(q, k, v, key_padding, rates, *_constants(p), False, p["normalize"])
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    want = ops.reference(q32, k32, v32, key_padding, rates, *_constants(p))
    err = ((o.float() - want).abs().max() / want.abs().max()).item()
    assert err < 2e-2, err
    grad = torch.randn_like(want)
    got = torch.autograd.grad(o, (q, k, v), grad.to(o.dtype))
    expected = torch.autograd.grad(want, (q32, k32, v32), grad)
    for name, a, b in zip("qkv", got, expected):
        err = ((a.float() - b).abs().max() / b.abs().max()).item()
        assert err < 3e-2, (name, err)


# --- MALA on the same kernels (codegen/variants/mala/ops.py: from_linear_sums) ---------------------

MALA_CASES = [
    case(2, 4, 2, 70, 16, 16, padded=True),
    case(1, 2, 2, 129, 32, 16),
    case(2, 4, 1, 33, 16, 24, causal=False, padded=True),
    case(1, 2, 2, 65, 16, 16, causal=False),
]


@pytest.mark.parametrize("p", MALA_CASES)
@pytest.mark.parametrize("sim_scale", [None, 0.5], ids=["official-scale", "sim0.5"])
def test_mala_on_the_kernels_matches_its_reference(p, sim_scale):
    from attncc.codegen.variants.mala import ops as mala_ops

    q, k, v, key_padding, _ = _inputs(p)
    got = mala_ops.from_linear_sums(q, k, v, key_padding, p["causal"], sim_scale)
    want = mala_ops.reference(q, k, v, key_padding, p["causal"], sim_scale)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(want)
    for name, a, b in zip("qkv", torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        scale = b.abs().max().clamp(min=1.0)
        torch.testing.assert_close(a / scale, b / scale, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.gpu
def test_mala_bf16_on_gpu():
    from attncc.codegen.variants.mala import ops as mala_ops

    p = case(1, 16, 4, 8192, 128, 128, padded=True).values[0]
    q, k, v, key_padding, _ = _inputs(p, torch.bfloat16, "cuda")
    got = mala_ops.from_linear_sums(q, k, v, key_padding, True, None)
    want = mala_ops.reference(q.float(), k.float(), v.float(), key_padding, True, None)
    err = ((got.float() - want).abs().max() / want.abs().max()).item()
    # MALA's output β·c·num - γ·Σv cancels: with unit-variance inputs both terms are ~16x the result, so
    # the bf16 rounding of the kernel's state (0.4%) shows up ~16x larger (measured 0.04-0.07 on the H200)
    assert err < 0.1, err


# --- the recurrent form: state in, state out (what decoding continues from) ------------------------

@pytest.mark.parametrize("decay", ["none", "lightning"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_state_in_state_out_continues_the_sequence(decay, normalize):
    """Prefill [0, t1) and then continue from its final state, chunk by chunk and token by token (the
    recurrent form a decoder steps with): the same outputs and the same final state as one call."""
    p = dict(B=2, H=4, Hkv=2, T=75, D=16, Dv=16, causal=True, feature_map="elu1", normalize=normalize, decay=decay,
             padded=False)
    q, k, v, _, rates = (x.detach() if isinstance(x, torch.Tensor) else x for x in _inputs(p))
    kwargs = dict(decay=rates, causal=True, feature_map="elu1", normalize=normalize, eps=1e-6)
    whole, _, _, final = chunked.linear_fwd(q, k, v, **kwargs)
    t1 = 67
    first, _, _, state = chunked.linear_fwd(q[:, :, :t1], k[:, :, :t1], v[:, :, :t1], **kwargs)
    outs = [first]
    for t in range(t1, 75):  # one token at a time
        o, _, _, state = chunked.linear_fwd(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], initial_state=state,
                                            **kwargs)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=2), whole, rtol=1e-4, atol=1e-4)
    for a, b in zip(state, final):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_final_state_is_the_sum_it_stands_for():
    """S = Σ_s λ^{T-1-s} φ(k_s) v_sᵀ and z = Σ_s λ^{T-1-s} φ(k_s), written out."""
    p = dict(B=1, H=2, Hkv=2, T=70, D=16, Dv=8, causal=True, feature_map="elu1", normalize=True, decay="lightning",
             padded=False)
    q, k, v, _, rates = (x.detach() if isinstance(x, torch.Tensor) else x for x in _inputs(p))
    _, _, _, (s, z) = chunked.linear_fwd(q, k, v, decay=rates, causal=True, feature_map="elu1", normalize=True,
                                         eps=1e-6)
    phik = torch.nn.functional.elu(k) + 1
    weight = torch.exp(-rates.view(1, -1, 1) * torch.arange(69, -1, -1).view(1, 1, -1))  # [1, H, T]
    torch.testing.assert_close(s, torch.einsum("bht,bhtd,bhte->bhde", weight, phik, v), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z, torch.einsum("bht,bhtd->bhd", weight, phik), rtol=1e-4, atol=1e-4)
