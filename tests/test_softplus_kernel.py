"""The LSSA kernels (codegen/variants/softplus/flash.py) against the softplus reference.

The reference is checked against independent float64 computations in test_reference_softplus.py.
CPU: the Triton interpreter in float32 (causal and bidirectional, GQA, key padding, odd lengths, a
head dim that is not a power of two), outputs and all three gradients through `ops.lssa` (which
normalizes the rows and computes the row scales), NaN-poisoned buffers (conftest.py). GPU: bfloat16.
"""

from __future__ import annotations

import pytest
import torch

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
    assert "LSSAR" in flash.supports(64, 64, torch.bfloat16, 15.0)
    assert flash.supports(128, 128, torch.bfloat16, 0.0) is None


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
        assert ((a.float() - b).abs().max() / b.abs().max()).item() < 3e-2, name
