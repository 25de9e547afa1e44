"""The LSSA and LSSAR kernels (codegen/variants/softplus/flash.py) against the softplus reference.

The reference is checked against independent float64 computations in test_reference_softplus.py.
CPU: the Triton interpreter in float32 (causal and bidirectional, GQA, key padding, odd lengths, a
head dim that is not a power of two), outputs and all three gradients through `ops.lssa` (which
normalizes the rows and computes the row scales), NaN-poisoned buffers (conftest.py). LSSAR through
`ops.lssar` the same way, at p = 3 and 15, with rows that keep no entry and fall back to LSSA. GPU: bfloat16.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import triton
import triton.language as tl

import attncc.codegen.variants  # noqa: F401  (registers the ops)
from attncc.codegen.variants.softplus import flash, ops

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def case(B, H, Hkv, Tq, D, Dv, *, causal=True, padded=False, Tk=None):
    name = f"B{B}-H{H}-Hkv{Hkv}-T{Tq}" + (f"-Tk{Tk}" if Tk else "") + f"-D{D}-Dv{Dv}-" + \
        ("causal" if causal else "bidir") + ("-padded" if padded else "")
    return pytest.param(dict(B=B, H=H, Hkv=Hkv, Tq=Tq, Tk=Tk or Tq, D=D, Dv=Dv, causal=causal, padded=padded), id=name)


CASES = [
    case(2, 4, 2, 37, 16, 16),
    case(2, 4, 2, 37, 16, 24, padded=True),
    case(1, 2, 1, 29, 32, 16, causal=False, padded=True),
    case(1, 2, 2, 50, 20, 16),
    case(2, 2, 1, 9, 16, 16, causal=False, Tk=33),
]


def _inputs(p, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(p["B"], p["H"], p["Tq"], p["D"], generator=g)
    k = torch.randn(p["B"], p["Hkv"], p["Tk"], p["D"], generator=g)
    v = torch.randn(p["B"], p["Hkv"], p["Tk"], p["Dv"], generator=g)
    q, k, v = (x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v))
    key_padding = None
    if p["padded"]:
        key_padding = torch.ones(p["B"], p["Tk"], dtype=torch.bool, device=device)
        key_padding[0, :3] = False  # left padding: the first rows of a causal site see no key
        key_padding[-1, -2:] = False
    return q, k, v, key_padding


@pytest.mark.parametrize("p", CASES)
def test_lssa_kernel_matches_the_reference(p):
    q, k, v, key_padding = _inputs(p)
    got = ops.lssa(q, k, v, key_padding, p["causal"])
    want = ops.reference(q, k, v, key_padding, p["causal"], 0.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(want)
    for name, a, b in zip("qkv", torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        scale = b.abs().max().clamp(min=1.0)
        torch.testing.assert_close(a / scale, b / scale, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_rows_with_no_allowed_key_are_zero():
    q, k, v, key_padding = _inputs(CASES[1].values[0])
    out = ops.lssa(q, k, v, key_padding, True)
    assert torch.equal(out[0, :, :3], torch.zeros_like(out[0, :, :3]))


@pytest.mark.parametrize("p", CASES[:1] + CASES[2:3])
def test_opcheck(p):
    q, k, v, key_padding = _inputs(p)
    qn, kn = (torch.nn.functional.normalize(x, dim=-1).detach().requires_grad_() for x in (q, k))
    c = torch.full((p["B"], p["Tq"]), 2.0)
    torch.library.opcheck(torch.ops.attncc.lssa_flash.default, (qn, kn, v, c, key_padding, p["causal"], ops.EPS))


def test_supports_names_what_it_cannot_do():
    assert "head dims" in flash.supports(256, 64, torch.bfloat16, 15.0)
    assert "dtype" in flash.supports(64, 64, torch.float64, 0.0)
    assert flash.supports(128, 128, torch.bfloat16, 0.0) is None
    assert flash.supports(128, 128, torch.bfloat16, 15.0) is None


# --- LSSAR (reweight_p > 0) ---------------------------------------------------------------------------

LSSAR_CASES = [
    pytest.param(15.0, CASES[0].values[0], id="p15-" + CASES[0].id),
    pytest.param(3.0, CASES[1].values[0], id="p3-" + CASES[1].id),
    pytest.param(15.0, CASES[2].values[0], id="p15-" + CASES[2].id),
    pytest.param(3.0, CASES[3].values[0], id="p3-" + CASES[3].id),
    pytest.param(15.0, CASES[4].values[0], id="p15-" + CASES[4].id),
    # p not an integer: the log form (exp2 of p·log2 x) instead of powers by multiplication; p = 1: x^(p-1) = 1
    pytest.param(2.5, CASES[0].values[0], id="p2.5-" + CASES[0].id),
    pytest.param(1.0, CASES[1].values[0], id="p1-" + CASES[1].id),
]


def _check_lssar(q, k, v, key_padding, causal, reweight_p, tol=1e-4):
    """LSSAR (or LSSA at reweight_p = 0) on the kernels against the reference: outputs and gradients."""
    got = ops.lssar(q, k, v, key_padding, causal, reweight_p) if reweight_p else ops.lssa(q, k, v, key_padding, causal)
    want = ops.reference(q, k, v, key_padding, causal, reweight_p)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    grad = torch.randn_like(want)
    for name, a, b in zip("qkv", torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        scale = b.abs().max().clamp(min=1.0)
        torch.testing.assert_close(a / scale, b / scale, rtol=tol, atol=tol, msg=lambda m: f"d{name}: {m}")
    return got


@pytest.mark.parametrize("reweight_p,p", LSSAR_CASES)
def test_lssar_kernel_matches_the_reference(reweight_p, p):
    q, k, v, key_padding = _inputs(p)
    _check_lssar(q, k, v, key_padding, p["causal"], reweight_p)


def test_lssar_rows_that_keep_nothing_fall_back_to_lssa():
    """Left padding of 5 keys, causal: rows 0-4 see no key (output 0); row 5 sees one key, so n·A1 = 1 and
    x = 0 (offset 1): it keeps no entry and returns its LSSA output; row 6 on is sharpened."""
    p = dict(B=1, H=2, Hkv=1, Tq=21, Tk=21, D=16, Dv=16, causal=True, padded=False)
    q, k, v, _ = _inputs(p)
    key_padding = torch.ones(1, 21, dtype=torch.bool)
    key_padding[0, :5] = False
    got = _check_lssar(q, k, v, key_padding, True, 15.0)
    assert torch.equal(got[0, :, :5], torch.zeros_like(got[0, :, :5]))
    lssa = ops.lssa(q, k, v, key_padding, True)
    torch.testing.assert_close(got[0, :, 5], lssa[0, :, 5])
    assert not torch.allclose(got[0, :, 6:], lssa[0, :, 6:], rtol=1e-3, atol=1e-3)


def test_lssar_uniform_rows():
    """Constant keys make every row uniform (n·A1 = 1, x ≈ 0 past the first three rows): the output is the
    mean of the allowed values whichever branch the rounding picks."""
    p = dict(B=1, H=2, Hkv=2, Tq=19, Tk=19, D=16, Dv=16, causal=False, padded=False)
    q, k, v, _ = _inputs(p)
    k = k[:, :, :1].detach().expand_as(k).contiguous()
    got = ops.lssar(q.detach(), k, v.detach(), None, False, 15.0)
    want = ops.reference(q.detach(), k, v.detach(), None, False, 15.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, v.detach().mean(-2, keepdim=True).expand_as(got), rtol=1e-4, atol=1e-4)


def test_lssar_opcheck():
    p = CASES[1].values[0]
    q, k, v, key_padding = _inputs(p)
    qn, kn = (torch.nn.functional.normalize(x, dim=-1).detach().requires_grad_() for x in (q, k))
    n = key_padding.float().cumsum(-1)
    c = 2.0 * torch.log(n.clamp(min=1))
    torch.library.opcheck(torch.ops.attncc.lssar_flash.default, (qn, kn, v, c, n, key_padding, True, 15.0, ops.EPS))


def test_lssar_kernel_name():
    q, k = torch.zeros(1, 4, 8, 16), torch.zeros(1, 4, 8, 16)
    assert ops.kernel_spec(q, k, causal=True, padded=True, reweight_p=15.0).name == \
        "lssar_flash_p15_causal_d16_g1_padded_fp32"


# Tiles of other shapes than the interpreter's default: the split of each pass into tiles at an edge (the
# diagonal, the lengths) and tiles away from it must hold for any BM, BN; Config's ten fields.
TILE_CONFIGS = [
    pytest.param([16, 32, 4, 1, 32, 16, 16, 32, 4, 1], id="bm<bn"),
    pytest.param([16, 16, 4, 1, 16, 16, 16, 16, 4, 1], id="bm=bn"),
]


@pytest.mark.parametrize("tiles", TILE_CONFIGS)
@pytest.mark.parametrize("reweight_p,p", [pytest.param(0.0, CASES[1].values[0], id="lssa-" + CASES[1].id),
                                          pytest.param(15.0, CASES[3].values[0], id="p15-" + CASES[3].id),
                                          pytest.param(3.0, CASES[4].values[0], id="p3-" + CASES[4].id)])
def test_kernels_match_the_reference_with_other_tiles(tiles, reweight_p, p, monkeypatch):
    monkeypatch.setenv("ATTNCC_SOFTPLUS_CONFIG", json.dumps(tiles))
    assert flash.config().bm == tiles[0]
    q, k, v, key_padding = _inputs(p)
    _check_lssar(q, k, v, key_padding, p["causal"], reweight_p)


@pytest.mark.gpu
@pytest.mark.parametrize("p", [case(1, 16, 4, 8192, 128, 128), case(2, 8, 8, 3001, 64, 64, causal=False, padded=True)])
def test_lssa_bf16_on_gpu(p):
    q, k, v, key_padding = _inputs(p, torch.bfloat16, "cuda")
    got = ops.lssa(q, k, v, key_padding, p["causal"])
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    want = ops.reference(q32, k32, v32, key_padding, p["causal"], 0.0)
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 2e-2
    grad = torch.randn_like(want)
    for name, a, b in zip("qkv", torch.autograd.grad(got, (q, k, v), grad.to(got.dtype)),
                          torch.autograd.grad(want, (q32, k32, v32), grad)):
        # dS is rounded to bf16 before the tile products: dk's error at T = 8192, 4 query heads per kv head
        # measured 0.033 on the H200
        assert ((a.float() - b).abs().max() / b.abs().max()).item() < 4e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("reweight_p,p", [
    pytest.param(15.0, case(1, 8, 2, 4096, 64, 64).values[0], id="p15-T4096-causal"),
    pytest.param(3.0, case(2, 4, 4, 4096, 128, 128, causal=False, padded=True).values[0], id="p3-T4096-bidir-padded"),
])
def test_lssar_bf16_on_gpu(reweight_p, p):
    """Against the fp32 reference on the rows the kernel sees: q̂, k̂ rounded to bf16. Sharpening amplifies
    that rounding (z = p log x): at p = 15, T = 4096 it alone moves the reference's dk by about 5% (measured
    on CPU), which would hide the kernel's own error; the gradients still flow through the fp32 normalization."""
    q, k, v, key_padding = _inputs(p, torch.bfloat16, "cuda")
    got = ops.lssar(q, k, v, key_padding, p["causal"], reweight_p)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    qn, kn = (torch.nn.functional.normalize(x, dim=-1).to(torch.bfloat16).float() for x in (q32, k32))
    want = ops.reference(qn, kn, v32, key_padding, p["causal"], reweight_p)
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 2e-2
    grad = torch.randn_like(want)
    for name, a, b in zip("qkv", torch.autograd.grad(got, (q, k, v), grad.to(got.dtype)),
                          torch.autograd.grad(want, (q32, k32, v32), grad)):
        assert ((a.float() - b).abs().max() / b.abs().max()).item() < 4e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("reweight_p", [0.0, 15.0, 15.5])
def test_backward_is_deterministic_on_gpu(reweight_p):
    """The kernels use no atomics: two backward passes over the same inputs give the same bits. With bm1 <
    bn1 tiles, dk differed from call to call on the H200 (triton 3.6), by up to half its scale."""
    p = case(1, 16, 16, 2048, 128, 128).values[0]
    q, k, v, _ = _inputs(p, torch.bfloat16, "cuda")
    grad = torch.randn_like(q)
    runs = []
    for _ in range(2):
        out = ops.lssar(q, k, v, None, True, reweight_p) if reweight_p else ops.lssa(q, k, v, None, True)
        runs.append(torch.autograd.grad(out, (q, k, v), grad))
    for name, a, b in zip("qkv", *runs):
        assert torch.equal(a, b), f"d{name} differs between two identical calls"


@triton.jit
def _apply_log2_1p(t_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    t = tl.load(t_ptr + offs, mask=offs < N, other=0.0)
    tl.store(out_ptr + offs, flash._log2_1p(t), mask=offs < N)


def test_log2_1p_polynomial_is_accurate_on_its_whole_range():
    """The kernels' log2(1 + t) (a polynomial, t in [0, 1]) against float64: relative error below 2e-6,
    exact 0 at t = 0 (a vanishing weight keeps its relative accuracy: t = 1e-30 gives t·log2(e))."""
    t = torch.cat([torch.linspace(0, 1, 4097), torch.logspace(-30, 0, 257)]).float()
    out = torch.empty_like(t)
    _apply_log2_1p[(triton.cdiv(t.numel(), 1024),)](t, out, t.numel(), BLOCK=1024)
    want = torch.log1p(t.double()) / math.log(2)
    rel = ((out.double() - want).abs() / want.clamp(min=1e-300)).max().item()
    assert out[0] == 0 and rel < 2e-6, rel
