"""GPU benchmark: attncc's chunked linear-attention kernels (and MALA on them) against flash-linear-attention.

B=1, H=16, D=128, bf16, causal, N in {2048, 8192, 32768}, the anchors of issue 11 (fla-core 0.6.0):

- linear elu1, normalized      vs fla chunk_linear_attn(normalize=True)
- linear identity, unnormalized vs fla chunk_linear_attn(normalize=False)
- linear with Lightning decay   vs fla chunk_lightning_attn (g_gamma decay)
- MALA causal                   vs attncc's own normalized linear (target: at most 1.3x its time);
  "mala" runs MALA's per-row correction as eager PyTorch ops, "mala_compiled" through torch.compile, as a
  MALA site does inside a model compiled with attncc (Inductor fuses the correction)

Both read the same [B, T, H, D] memory (attncc takes the transposed view, no copy). "fwd" is the
forward with inputs requiring grad, "fwd+bwd" the forward plus the backward with a fixed dO. Medians
of triton.testing.do_bench. Every attncc row is first checked against attncc's reference in float32
(relative max error of o and of dq, dk, dv). fla's gated backward may be refused on Hopper with this
Triton (fla issue #640); such a row times its forward only and says so.

    python bench/bench_linear.py [--sizes 2048 8192 32768]

Prints a markdown table last and writes it to $OUT/bench_linear.md when OUT is set.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import warnings

import torch
import triton.testing

import attncc.codegen.variants  # noqa: F401  (registers the ops)
from attncc.codegen.variants.linear import ops as linear_ops
from attncc.codegen.variants.linear.reference import lightning_decay_rates
from attncc.codegen.variants.mala import ops as mala_ops

B, H, D = 1, 16, 128
DTYPE = torch.bfloat16
LAYER, LAYERS = 1, 16  # the Lightning decay of one layer of a 16-layer model


def inputs(n: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, n, H, D, device="cuda", dtype=DTYPE, generator=g) * 0.5 for _ in range(3))
    return [x.requires_grad_() for x in (q, k, v)]


def bhtd(x):
    return x.transpose(1, 2)


_mala_compiled = torch.compile(mala_ops.from_linear_sums)


def ours(kind: str, rates):
    def run(q, k, v):
        if kind == "mala":
            return mala_ops.from_linear_sums(bhtd(q), bhtd(k), bhtd(v), None, True, None)
        if kind == "mala_compiled":
            return _mala_compiled(bhtd(q), bhtd(k), bhtd(v), None, True, None)
        fmap, norm = {"elu1_norm": ("elu1", True), "identity_raw": ("identity", False),
                      "lightning": ("identity", False)}[kind]
        decay = rates if kind == "lightning" else None
        o, *_ = linear_ops.linear_chunked(bhtd(q), bhtd(k), bhtd(v), None, decay, True, fmap, norm, 1e-6, False,
                                          norm)
        return o
    return run


def reference(kind: str, rates):
    def run(q, k, v):
        q, k, v = (bhtd(x).float() for x in (q, k, v))
        if kind.startswith("mala"):
            return mala_ops.reference(q, k, v, None, True, None)
        fmap, norm = {"elu1_norm": ("elu1", True), "identity_raw": ("identity", False),
                      "lightning": ("identity", False)}[kind]
        return linear_ops.reference(q, k, v, None, rates if kind == "lightning" else None, True, fmap, norm, 1e-6)
    return run


def fla_anchor(kind: str):
    if kind.startswith("mala"):
        return None
    try:
        from fla.ops.lightning_attn import chunk_lightning_attn
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError as error:
        warnings.warn(f"fla not importable ({error}); anchors skipped")
        return None
    if kind == "lightning":
        return lambda q, k, v: bhtd(chunk_lightning_attn(q, k, v, layer_idx=LAYER, num_layers=LAYERS, scale=1.0)[0])
    normalize = kind == "elu1_norm"
    return lambda q, k, v: bhtd(chunk_linear_attn(q, k, v, scale=1.0, normalize=normalize)[0])


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


def check(fn, ref, q, k, v):
    o = fn(q, k, v)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
    o_ref = ref(qs, ks, vs)
    ref_grads = torch.autograd.grad(o_ref, (qs, ks, vs), do.float())
    return max([rel(o, o_ref)] + [rel(a, b) for a, b in zip(grads, ref_grads)])


def timings(fn, q, k, v):
    o = fn(q, k, v)
    do = torch.randn_like(o)
    fwd = triton.testing.do_bench(lambda: fn(q, k, v), warmup=5, rep=50)

    def step():
        torch.autograd.grad(fn(q, k, v), (q, k, v), do)

    try:
        both = triton.testing.do_bench(step, warmup=5, rep=50)
    except Exception as error:  # fla's refused gated backward
        warnings.warn(f"backward failed: {type(error).__name__}: {str(error)[:200]}")
        both = float("nan")
    return fwd, both


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--kinds", nargs="+", default=["elu1_norm", "identity_raw", "lightning", "mala", "mala_compiled"])
    args = parser.parse_args()
    rates = (lightning_decay_rates(H, LAYER, LAYERS)).cuda()
    rows, normalized = [], {}
    for n in args.sizes:
        q, k, v = inputs(n)
        for kind in args.kinds:
            err = check(ours(kind, rates), reference(kind, rates), q, k, v) if n <= 8192 else float("nan")
            t_ours = timings(ours(kind, rates), q, k, v)
            anchor = fla_anchor(kind)
            t_anchor = timings(anchor, q, k, v) if anchor else None
            if kind == "elu1_norm":
                normalized[n] = t_ours
            if kind.startswith("mala"):
                t_anchor = normalized.get(n)
            rows.append((n, kind, t_ours, t_anchor, err))
            print(n, kind, t_ours, t_anchor, f"err {err:.3g}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    lines = [
        f"Chunked linear attention, B={B}, H={H}, D={D}, bf16, causal (ms, medians of do_bench); ratio = anchor / "
        "attncc (> 1: attncc faster). Anchor: fla-core 0.6.0 (chunk_linear_attn, chunk_lightning_attn); for MALA, "
        "attncc's own normalized elu1 linear (target: ratio >= 1/1.3 = 0.77). err: max relative error of o, dq, dk, "
        "dv against attncc's float32 reference (checked up to N = 8192).",
        "",
        "| N | kernel | attncc fwd | attncc fwd+bwd | anchor fwd | anchor fwd+bwd | ratio fwd | ratio fwd+bwd | err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, kind, (of, ob), anchor, err in rows:
        af, ab = anchor if anchor else (float("nan"), float("nan"))
        lines.append(f"| {n} | {kind} | {of:.3f} | {ob:.3f} | {af:.3f} | {ab:.3f} | {af / of:.2f}x | {ab / ob:.2f}x "
                     f"| {err:.2g} |")
    table = "\n".join(lines)
    print(table)
    out = os.environ.get("OUT")
    if out:
        pathlib.Path(out, "bench_linear.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
