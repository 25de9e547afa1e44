"""GPU tuning: the softplus kernels' tiles (codegen/variants/softplus/flash.py, `Config`), timed at one shape.

B=1, H=16, D=128, bf16, causal. For each forward config, LSSA and LSSAR (p = 15) forward; for each backward
config (with the fastest forward), forward + backward; a config whose gradients differ between two
identical calls is rejected. SDPA cuDNN causal softmax is timed beside them. The
best configs are printed last as the JSON that ATTNCC_SOFTPLUS_CONFIG takes, and written to
$OUT/softplus_config.json when OUT is set.

    python bench/tune_softplus.py [--n 32768]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from anchors import bench, sdpa_backend

try:
    from attncc.codegen.variants.softplus import ops
except ImportError:
    sys.exit("tune_softplus.py needs attncc installed (bench/run_gpu.sh installs it)")

FWD = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 4), (128, 128, 8, 2),
       (128, 64, 8, 2)]
# the shipped one first; then the ones ptxas says spill least on sm_90 (bench/ptxas_report.py --family softplus)
BWD = [(32, 64, 64, 32, 4, 3), (64, 32, 64, 32, 8, 3), (64, 32, 64, 32, 8, 2), (32, 32, 64, 32, 4, 3),
       (64, 64, 64, 64, 4, 2), (32, 64, 64, 32, 4, 2), (32, 128, 128, 32, 8, 2), (64, 64, 64, 64, 8, 2)]


def time_config(cfg, inputs, do, p, backward=True):
    """(fwd ms, fwd+bwd ms) of one config; fwd+bwd is inf without `backward`, and for a rejected config."""
    os.environ["ATTNCC_SOFTPLUS_CONFIG"] = json.dumps(list(cfg))
    q, k, v = inputs
    fn = (lambda: ops.lssar(q, k, v, None, True, p)) if p else (lambda: ops.lssa(q, k, v, None, True))
    try:
        fwd = bench(fn, [q, k, v])
        if not backward:
            print(f"{cfg} p={p}: {fwd:.3f} ms", flush=True)
            return fwd, float("inf")
        both = bench(lambda: fn().backward(do), [q, k, v])
        grads = [torch.autograd.grad(fn(), (q, k, v), do) for _ in range(2)]
    except Exception as e:  # a config that does not fit (shared memory) is reported, not fatal
        print(f"{cfg} p={p}: {type(e).__name__}: {str(e)[:120]}", flush=True)
        return float("inf"), float("inf")
    if not all(torch.equal(a, b) for a, b in zip(*grads)):  # no atomics: anything else is a miscompile
        print(f"{cfg} p={p}: the gradients differ between two identical calls; rejected", flush=True)
        return float("inf"), float("inf")
    print(f"{cfg} p={p}: {fwd:.3f} / {both:.3f} ms", flush=True)
    return fwd, both


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=32768)
    args = parser.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 16, args.n, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    do = torch.randn_like(q)
    backend, name = sdpa_backend(128, torch.bfloat16)

    def dense():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    anchor = bench(dense, [q, k, v]), bench(lambda: dense().backward(do), [q, k, v])
    lines = [f"softplus tiles, N={args.n}, B=1, H=16, D=128, bf16, causal (ms; SDPA {name}: "
             f"{anchor[0]:.3f} / {anchor[1]:.3f})", "", "| config | LSSA fwd | LSSA fwd+bwd | LSSAR fwd | LSSAR fwd+bwd |",
             "|---|---|---|---|---|"]
    fwd_times = {}
    for f in FWD:  # forward tiles alone (the backward ones do not change the forward)
        cfg = f + BWD[0]
        fwd_times[f] = [time_config(cfg, (q, k, v), do, p, backward=False)[0] for p in (0.0, 15.0)]
        lines.append(f"| {list(cfg)} | {fwd_times[f][0]:.3f} | | {fwd_times[f][1]:.3f} | |")
    best_fwd = min(FWD, key=lambda f: sum(fwd_times[f]))
    totals = {}
    for bw in BWD:
        cfg = best_fwd + bw
        (a, b), (c, d) = [time_config(cfg, (q, k, v), do, p) for p in (0.0, 15.0)]
        totals[bw] = b + d
        lines.append(f"| {list(cfg)} | {a:.3f} | {b:.3f} | {c:.3f} | {d:.3f} |")
    best = list(best_fwd + min(BWD, key=totals.get))
    lines += ["", f"best: ATTNCC_SOFTPLUS_CONFIG='{json.dumps(best)}'"]
    print("\n".join(lines))
    out = os.environ.get("OUT")
    if out:
        pathlib.Path(out, "softplus_config.json").write_text(json.dumps(best))
        pathlib.Path(out, "tune_softplus.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
