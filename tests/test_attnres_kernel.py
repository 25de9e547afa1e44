"""The fused AttnRes aggregation (codegen/variants/attnres/fused.py) against reference.attnres.

The reference is itself checked against the spec's oracles in test_attnres.py. CPU: the Triton
interpreter in float32, over numbers of sources (a power of two or not), hidden sizes (one that is not a
power of two), leading shapes and zero / random queries: outputs and the gradients of every source, the
query and the key-norm weight (which checks fused.py's derivation of the backward against autograd of
the reference), with the launchers' buffers NaN-poisoned (conftest.py). The rewritten stream of a tiny
Llama with kernels="triton" against kernels="reference". GPU (`-m gpu`): bfloat16 at T = 8192, d = 2048.
"""

from __future__ import annotations

import copy

import pytest
import torch

import attncc
from attncc.codegen import emit
from attncc.codegen.variants.attnres import aggregate, fused, ops
from attncc.codegen.variants.attnres.reference import attnres
from models import zoo

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
EPS = 1e-6


def _inputs(S, d, lead, query, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    sources = [torch.randn(*lead, d, generator=g) * (1 + i) for i in range(S)]  # sources of different scales
    w = torch.zeros(d) if query == "zero" else torch.randn(d, generator=g)
    weight = 1 + 0.5 * torch.randn(d, generator=g)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (*sources, w, weight)]


def _check(got, want, name, tol=1e-4):
    scale = want.abs().max().clamp(min=1.0)
    torch.testing.assert_close(got / scale, want / scale, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


CASES = [pytest.param(S, d, lead, query, id=f"S{S}-d{d}-{'x'.join(map(str, lead))}-{query}")
         for S in (2, 3, 5, 9) for d in (16, 40, 64) for lead in ((2, 7), (13,)) for query in ("zero", "random")]


@pytest.mark.parametrize("S,d,lead,query", CASES)
def test_kernel_matches_the_reference(S, d, lead, query):
    *sources, w, weight = tensors = _inputs(S, d, lead, query)
    out, r, p = torch.ops.attncc.attnres_fused(sources, w, weight, EPS)
    want = attnres(sources, w, weight, EPS)
    assert out.shape == want.shape and out.dtype == want.dtype
    _check(out, want, "o")
    assert r.shape == p.shape == (S, *lead)
    _check(p.sum(0), torch.ones(lead), "Σp")
    if query == "zero":
        _check(p, torch.full_like(p, 1 / S), "p")
    grad = torch.randn_like(want)
    got = torch.autograd.grad(out, tensors, grad)
    expected = torch.autograd.grad(want, tensors, grad)
    names = [f"dv{i}" for i in range(S)] + ["dquery", "dnorm_weight"]
    for name, a, b in zip(names, got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        _check(a, b, name)


def test_the_backward_formula_in_double_precision():
    """fused.py's formulas, written out in PyTorch in float64, against autograd of the reference: what the
    kernel computes, without its fp32 rounding."""
    S, d = 4, 24
    *sources, w, weight = tensors = _inputs(S, d, (5,), "random", torch.float64)
    out = attnres(sources, w, weight, EPS)
    do = torch.randn_like(out)
    expected = torch.autograd.grad(out, tensors, do)
    v = torch.stack(sources).detach()
    c = (w * weight).detach()
    r = torch.rsqrt(v.pow(2).mean(-1) + EPS)
    xhat = r[..., None] * v
    logits = xhat @ c
    p = torch.softmax(logits, 0)
    dp = (v * do).sum(-1)
    dlogits = p * (dp - (p * dp).sum(0))
    dv = p[..., None] * do + (dlogits * r)[..., None] * (c - xhat * (logits / d)[..., None])
    u = (dlogits[..., None] * xhat).sum((0, 1))
    for a, b in zip([*dv, u * weight.detach(), u * w.detach()], expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_half_precision_inputs_keep_their_dtype():
    *sources, w, weight = tensors = _inputs(3, 40, (2, 7), "random", torch.float16)
    out = aggregate(sources, w, weight, EPS, kernels="triton")
    assert out.dtype == torch.float16
    want = attnres([s.float() for s in sources], w.float(), weight.float(), EPS)
    _check(out.float(), want, "o", tol=2e-3)
    grads = torch.autograd.grad(out, tensors, torch.ones_like(out))
    assert all(g.dtype == torch.float16 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("S,d,lead,query", [CASES[0].values, CASES[19].values, CASES[-1].values])
def test_opcheck(S, d, lead, query):
    *sources, w, weight = _inputs(S, d, lead, query)
    torch.library.opcheck(torch.ops.attncc.attnres_fused.default, (sources, w, weight, EPS))
    out, r, p = torch.ops.attncc.attnres_fused(sources, w, weight, EPS)
    do = torch.randn_like(out)
    torch.library.opcheck(torch.ops.attncc.attnres_fused_backward.default,
                          (do, [s.detach() for s in sources], w.detach(), weight.detach(), r, p))


def test_aggregate_chooses_and_records():
    *sources, w, weight = _inputs(3, 16, (4,), "random")
    assert aggregate(sources[:1], w, weight, kernels="triton") is sources[0]
    emit.RAN.pop("t#site", None)
    aggregate(sources, w, weight, kernels="auto", site="t#site")  # CPU tensors: the reference
    assert emit.RAN["t#site"] == "reference"
    aggregate(sources, w, weight, kernels="triton", site="t#site")
    assert emit.RAN["t#site"] == ops.kernel_spec(sources).name == "attnres_fused_S3_d16_fp32"
    mixed = [sources[0], sources[1].detach().double(), sources[2]]
    with pytest.warns(UserWarning, match="runs the reference"):
        got = aggregate(mixed, w, weight, kernels="triton", site="t#site")
    torch.testing.assert_close(got, attnres(mixed, w, weight))
    assert emit.RAN["t#site"] == "reference (attnres kernel: the sources have different dtypes)"
    with pytest.raises(ValueError, match="kernels="):
        aggregate(sources, w, weight, kernels="cuda")


@pytest.mark.parametrize("S,d,lead,bl", [(3, 40, (2, 7), 1), (9, 64, (13,), 4), (5, 40, (37,), 8)])
def test_configs_and_looping_programs(S, d, lead, bl, monkeypatch):
    """Other steps over the sources (BL = 1, 4, 8, through ATTNCC_ATTNRES_CONFIG) with a backward whose
    programs loop over several tokens (PROGRAMS = 2), against the reference."""
    monkeypatch.setenv("ATTNCC_ATTNRES_CONFIG", f"[{bl}, 2]")
    monkeypatch.setattr(fused, "PROGRAMS", 2)
    assert fused.config(S, d, backward=True) == (bl, 2)
    *sources, w, weight = tensors = _inputs(S, d, lead, "random")
    out = torch.ops.attncc.attnres_fused(sources, w, weight, EPS)[0]
    want = attnres(sources, w, weight, EPS)
    _check(out, want, "o")
    grad = torch.randn_like(want)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(out, tensors, grad), torch.autograd.grad(want, tensors, grad))):
        _check(a, b, f"grad {i}")


def test_rows_wider_than_the_kernel_are_refused():
    sources = [torch.zeros(2, fused.MAX_D + 1)] * 2
    why = ops.supports(sources, torch.zeros(fused.MAX_D + 1), torch.zeros(fused.MAX_D + 1))
    assert why and "wider" in why


# --- the rewritten stream ----------------------------------------------------------------------------

def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.attncc_attnres.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise if name.endswith("query") else 1 + 0.5 * noise)


@pytest.mark.parametrize("block_size", [1, 2])
def test_llama_stream_on_the_kernel_matches_the_reference(block_size):
    torch.manual_seed(0)
    policy = {"attention": "keep", "residual": {"variant": "attnres", "block_size": block_size}}
    model, args, kwargs, _ = zoo.llama("sdpa", layers=2)
    attncc.prepare(model, policy, args, kwargs)
    _randomize(model)
    twin = copy.deepcopy(model)
    outs, backends = [], []
    for m, kernels in ((model, "triton"), (twin, "reference")):
        be = attncc.backend(policy, inner="aot_eager", kernels=kernels)
        out = torch.compile(m, backend=be)(*args, **kwargs)[0]
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        outs.append(out)
        backends.append(be)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    grads = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        _check(p.grad, grads[name].grad, name, tol=1e-5)
    sites = [[s for s in be.report.sites if s.kind == "residual"] for be in backends]
    assert len(sites[0]) == 4 and all(s.status == "rewritten" for s in sites[0])
    # sublayer 0 reads only the embedding (no aggregation); the others name their kernel
    n_sources = [1 + l if block_size == 1 else 1 + l // 2 + (l % 2) for l in range(4)]
    assert [s.kernel for s in sites[0]] == ["none (one source)"] + [f"attnres_fused_S{n}_d32_fp32"
                                                                   for n in n_sources[1:]]
    assert [s.kernel for s in sites[1]] == ["none (one source)"] + ["reference"] * 3


@pytest.mark.gpu
def test_kernel_bf16_on_gpu():
    S, d, T = 9, 2048, 8192
    *sources, w, weight = tensors = _inputs(S, d, (1, T), "random", torch.bfloat16, "cuda")
    out = aggregate(sources, w, weight, EPS, kernels="auto")
    f32 = [t.detach().float().requires_grad_() for t in tensors]
    want = attnres(f32[:S], f32[S], f32[S + 1], EPS)
    err = ((out.float() - want).abs().max() / want.abs().max()).item()
    assert err < 2e-2, err
    grad = torch.randn_like(want)
    got = torch.autograd.grad(out, tensors, grad.to(out.dtype))
    expected = torch.autograd.grad(want, f32, grad)
    for i, (a, b) in enumerate(zip(got, expected)):
        err = ((a.float() - b).abs().max() / b.abs().max()).item()
        assert err < 3e-2, (i, err)
