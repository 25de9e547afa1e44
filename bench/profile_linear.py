"""GPU profile: where the time of one linear-attention call goes, kernel by kernel, against fla's.

B=1, H=16, D=128, bf16, causal, N = --n. For each kind of bench_linear.py (elu1_norm, identity_raw, lightning,
mala) and its fla anchor, a forward + backward under torch.profiler; prints the CUDA kernels by total time
(the table is written to $OUT/profile_linear.md when OUT is set).

    python bench/profile_linear.py [--n 32768] [--kinds elu1_norm identity_raw]
"""

from __future__ import annotations

import argparse
import os
import pathlib

import torch
from torch.profiler import ProfilerActivity, profile

from bench_linear import LAYER, LAYERS, H, fla_anchor, inputs, lightning_decay_rates, ours


def kernel_table(fn, q, k, v, steps: int = 5) -> list[tuple[str, float, int]]:
    o = fn(q, k, v)
    do = torch.randn_like(o)
    for _ in range(3):
        torch.autograd.grad(fn(q, k, v), (q, k, v), do)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            torch.autograd.grad(fn(q, k, v), (q, k, v), do)
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 1e3 / steps, e.count // steps) for e in prof.key_averages()
            if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--kinds", nargs="+", default=["elu1_norm", "identity_raw", "lightning", "mala"])
    args = parser.parse_args()
    rates = lightning_decay_rates(H, LAYER, LAYERS).cuda()
    lines = [f"Linear attention fwd+bwd by kernel, N={args.n}, B=1, H=16, D=128, bf16, causal (ms per call)", ""]
    for kind in args.kinds:
        q, k, v = inputs(args.n)
        for who, fn in (("attncc", ours(kind, rates)), ("fla", fla_anchor(kind))):
            if fn is None:
                continue
            rows = kernel_table(fn, q, k, v)
            lines += [f"### {kind}: {who}, total {sum(r[1] for r in rows):.3f} ms", "", "| kernel | ms | calls |",
                      "|---|---|---|"]
            lines += [f"| {name[:90]} | {ms:.3f} | {calls} |" for name, ms, calls in rows[:12]] + [""]
    print("\n".join(lines))
    out = os.environ.get("OUT")
    if out:
        pathlib.Path(out, "profile_linear.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
