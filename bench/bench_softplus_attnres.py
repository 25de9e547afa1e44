"""GPU benchmark: attncc's softplus (LSSA, LSSAR) and AttnRes kernels against the anchors of ../shared/ANCHORS.md.

softplus, B=1, H=16, D=128, bf16, causal, N in --sizes. attncc's LSSA / LSSAR (the functions a rewritten
site calls: l2 normalization of q and k included) against
- FlexAttention emulating LSSA: score_mod log(softplus(c_i · s)) over the normalized q, k with scale 1,
  c_i = log(D) · log(i + 1) (torch.compile'd; the normalization is included too). softmax of
  log(softplus(x)) is softplus(x) / Σ softplus(x): the same weights as LSSA, so its error column checks
  LSSA's output and gradients. LSSAR is timed against the same emulation (what a user would write) and
  checked against attncc's reference at N = 2048;
- dense causal softmax through SDPA (cuDNN if it runs here, else flash).

AttnRes, T = 32768 tokens, d = 4096, bf16, S sources in {4, 9}: attncc's attncc::attnres_fused against
flash-linear-attention's ``fused_attnres`` (when fla is importable). Bandwidth of the forward counts
(S + 1)·T·d·2 bytes, against the 4.27 TB/s copy bandwidth of ANCHORS.md.

"fwd" is the training forward (inputs require grad), "fwd+bwd" adds the backward of a fixed dO. Medians
of triton.testing.do_bench. The markdown table is printed last and written to
``$OUT/bench_softplus_attnres.md`` if OUT is set, else ``bench/results_softplus_attnres.md``.

    python bench/bench_softplus_attnres.py [--sizes 8192 32768] [--sources 4 9] [--skip softplus|attnres]
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import sdpa_kernel

import anchors
from anchors import bench, block_mask, sdpa_backend

try:
    import attncc.codegen.variants.attnres.ops  # noqa: F401  (registers attncc::attnres_fused)
    from attncc.codegen.variants.softplus import ops as softplus_ops
    from attncc.codegen.variants.softplus.reference import softplus_attention
except ImportError:  # the package is not installed
    sys.exit("bench_softplus_attnres.py needs attncc installed (bench/run_gpu.sh installs it)")

B, H, D = 1, 16, 128
DTYPE = torch.bfloat16
LOG_D = math.log(D)
COPY_BANDWIDTH = 4.27e12  # bytes/s, ANCHORS.md

def log_softplus(score, b, h, q_idx, kv_idx):
    c = LOG_D * torch.log((q_idx + 1).to(torch.float32))
    return torch.log(F.softplus(c * score))


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def flex_lssa(n):
    mask = block_mask(causal, n)

    def run(q, k, v):
        qn, kn = (F.normalize(x.float(), dim=-1).to(x.dtype) for x in (q, k))
        return anchors.flex(qn, kn, v, score_mod=log_softplus, block_mask=mask, scale=1.0)

    return run


def fwd_bwd(f, inputs, do):
    def fwd():
        return f(*inputs)

    def both():
        f(*inputs).backward(do)

    return fwd, both


def max_errors(f, g, inputs, do):
    """The largest relative error (max |f - g| / max |g|) of the output and of every input's gradient."""
    out = []
    for fn in (f, g):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        o = fn(*leaves)
        o.backward(do)
        out.append([o] + [x.grad for x in leaves])
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(*out))


def softplus_rows(n, backend, backend_name):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=DTYPE, generator=g).requires_grad_() for _ in range(3))
    do = torch.randn(B, H, n, D, device="cuda", dtype=DTYPE, generator=g)
    flex = flex_lssa(n)

    def dense(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    cases = [
        ("LSSA", lambda q, k, v: softplus_ops.lssa(q, k, v, None, True), 0.0),
        ("LSSAR p=15", lambda q, k, v: softplus_ops.lssar(q, k, v, None, True, 15.0), 15.0),
    ]
    anchors = [("Flex log-softplus", flex), (f"SDPA {backend_name} causal softmax", dense)]
    timed = {name: [bench(f, [q, k, v]) for f in fwd_bwd(fn, (q, k, v), do)] for name, fn in anchors}
    rows = []
    for name, fn, p in cases:
        ours = [bench(f, [q, k, v]) for f in fwd_bwd(fn, (q, k, v), do)]
        if p == 0:
            err, against = max_errors(fn, flex, (q, k, v), do), "Flex"
        else:
            err, against = reference_error(fn, p), "reference, N=2048, fp32"
        for anchor, (a_fwd, a_both) in timed.items():
            rows.append((f"softplus {name}", n, anchor, ours[0], a_fwd, ours[1], a_both,
                         f"{err:.3g} vs {against}"))
        print(f"{name} N={n}: ms {ours[0]:.3f} / {ours[1]:.3f}; " + "; ".join(
            f"{a} {t[0]:.3f} / {t[1]:.3f}" for a, t in timed.items()) + f"; max rel err {err:.3g} vs {against}",
            flush=True)
    return rows


def reference_error(fn, p, n=2048):
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=DTYPE, generator=g) for _ in range(3))
    do = torch.randn(B, H, n, D, device="cuda", dtype=DTYPE, generator=g)

    def reference(q, k, v):
        return softplus_attention(q.float(), k.float(), v.float(), causal=True, reweight_p=p)

    return max_errors(fn, reference, (q, k, v), do)


def attnres_rows(sources, tokens=32768, d=4096):
    try:
        from fla.ops.attnres import fused_attnres
    except ImportError as e:
        print(f"attnres: fla is not importable ({e}); attncc timed alone", flush=True)
        fused_attnres = None
    g = torch.Generator(device="cuda").manual_seed(0)
    values = [torch.randn(tokens, d, device="cuda", dtype=DTYPE, generator=g).requires_grad_() for _ in range(sources)]
    query = (torch.randn(d, device="cuda", dtype=DTYPE, generator=g) * 0.02).requires_grad_()
    weight = (1 + 0.1 * torch.randn(d, device="cuda", dtype=DTYPE, generator=g)).requires_grad_()
    do = torch.randn(tokens, d, device="cuda", dtype=DTYPE, generator=g)
    inputs = (*values, query, weight)

    def ours(*xs):
        return torch.ops.attncc.attnres_fused(list(xs[:-2]), xs[-2], xs[-1], 1e-6)[0]

    def fla(*xs):
        return fused_attnres(xs[-2], list(xs[:-2]), xs[-1], rms_eps=1e-6)

    t_ours = [bench(f, list(inputs)) for f in fwd_bwd(ours, inputs, do)]
    t_fla, err = [float("nan")] * 2, float("nan")
    if fused_attnres is not None:
        t_fla = [bench(f, list(inputs)) for f in fwd_bwd(fla, inputs, do)]
        err = max_errors(ours, fla, inputs, do)
    bandwidth = (sources + 1) * tokens * d * 2 / (t_ours[0] * 1e-3) / COPY_BANDWIDTH
    print(f"attnres S={sources}: ms {t_ours[0]:.3f} / {t_ours[1]:.3f}; fla {t_fla[0]:.3f} / {t_fla[1]:.3f}; "
          f"fwd at {bandwidth:.0%} of copy bandwidth; max rel err {err:.3g}", flush=True)
    return [(f"attnres S={sources}, d={d}", tokens, "fla fused_attnres", t_ours[0], t_fla[0], t_ours[1], t_fla[1],
             f"{err:.3g} vs fla; fwd {bandwidth:.0%} of copy BW")]


def table(rows):
    lines = [
        f"# attncc softplus and AttnRes kernels vs anchors ({torch.cuda.get_device_name()}, torch "
        f"{torch.__version__}, triton {triton.__version__})",
        "",
        f"softplus: B={B}, H={H}, D={D}, bf16, causal. AttnRes: bf16. Medians of triton.testing.do_bench (ms).",
        "",
        "| kernel | N | anchor | attncc fwd | anchor fwd | fwd ratio | attncc fwd+bwd | anchor fwd+bwd | "
        "fwd+bwd ratio | check (max relative error of the output and gradients) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, n, anchor, of, af, ob, ab, check in rows:
        lines.append(f"| {name} | {n} | {anchor} | {of:.3f} | {af:.3f} | {af / of:.2f}x | {ob:.3f} | {ab:.3f} | "
                     f"{ab / ob:.2f}x | {check} |")
    lines += ["", "ratio = anchor ms / attncc ms (> 1: attncc is faster)."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--sources", type=int, nargs="+", default=[4, 9])
    parser.add_argument("--skip", choices=["softplus", "attnres"], action="append", default=[])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_softplus_attnres.py needs a CUDA GPU")
    rows = []
    if "attnres" not in args.skip:
        for s in args.sources:
            rows += attnres_rows(s)
            torch.cuda.empty_cache()
    if "softplus" not in args.skip:
        backend, backend_name = sdpa_backend(D, DTYPE)
        for n in args.sizes:
            try:
                rows += softplus_rows(n, backend, backend_name)
            except Exception as e:  # keep the other rows; the failure is printed
                print(f"softplus N={n}: failed {type(e).__name__}: {str(e)[:500]}", flush=True)
            torch.cuda.empty_cache()
    text = table(rows)
    out_dir = os.environ.get("OUT")
    path = (pathlib.Path(out_dir) / "bench_softplus_attnres.md" if out_dir
            else pathlib.Path(__file__).with_name("results_softplus_attnres.md"))
    path.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
