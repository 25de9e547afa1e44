"""GPU tuning: the linear kernels' launch parameters (codegen/variants/linear/chunked.py, `Config`).

B=1, H=16, D=128, bf16, causal, N = --n, one kind of bench_linear.py (--kind: identity_raw, the lightest
kernels, or elu1_norm, whose fp32 feature tiles and normalizer need the most registers). Coordinate descent from the shipped config: the forward scan (_states) by
forward time, then _output by forward time, then the backward scan (_dstates) and _grads by forward +
backward time. A config whose output or gradients differ from the shipped config's by more than bf16
rounding, or between two identical calls, is rejected. The best config is printed last as the JSON that
ATTNCC_LINEAR_CONFIG takes, and written to $OUT/linear_config.json when OUT is set.

    python bench/tune_linear.py [--n 32768] [--kind identity_raw|elu1_norm|lightning]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import pathlib

import torch
import triton.testing

from bench_linear import LAYER, LAYERS, H, inputs, lightning_decay_rates, ours
from attncc.codegen.variants.linear import chunked

SCAN = [(bk, bv, w, s) for bk, bv in itertools.product((32, 64), (32, 64)) for w in (2, 4, 8) for s in (2, 3, 4)]
# _output with 32 value columns and 8 warps hit an illegal memory access on the H200 (triton 3.6), which ends
# the process's CUDA context: that pair is left out
OUTPUT = [(bv, w, s) for bv in (32, 64, 128) for w in (4, 8) for s in (2, 3) if (bv, w) != (32, 8)]
GRADS = [(w, s) for w in (4, 8) for s in (1, 2, 3)]


def run(cfg, fn, q, k, v, do):
    os.environ["ATTNCC_LINEAR_CONFIG"] = json.dumps(list(dataclasses.astuple(cfg)))
    o = fn(q, k, v)
    return [o] + list(torch.autograd.grad(o, (q, k, v), do))


def timed(cfg, fn, q, k, v, do, reference, backward: bool) -> float:
    try:
        first, second = run(cfg, fn, q, k, v, do), run(cfg, fn, q, k, v, do)
        torch.cuda.synchronize()  # a kernel's fault surfaces here, named with its config
    except Exception as e:  # a config that does not fit (shared memory, registers) is reported, not fatal
        print(f"{list(dataclasses.astuple(cfg))}: {type(e).__name__}: {str(e)[:120]}", flush=True)
        return float("inf")
    off = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(first, reference))
    if off > 2e-2 or not all(torch.equal(a, b) for a, b in zip(first, second)):
        print(f"{list(dataclasses.astuple(cfg))}: rejected (off by {off:.3g} from the shipped config, or "
              f"not deterministic)", flush=True)
        return float("inf")
    if backward:
        ms = triton.testing.do_bench(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do), warmup=5, rep=30)
    else:
        ms = triton.testing.do_bench(lambda: fn(q, k, v), warmup=5, rep=30)
    print(f"{list(dataclasses.astuple(cfg))}: {ms:.3f} ms ({'fwd+bwd' if backward else 'fwd'})", flush=True)
    return ms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--kind", default="identity_raw", choices=["identity_raw", "elu1_norm", "lightning"])
    args = parser.parse_args()
    fn = ours(args.kind, lightning_decay_rates(H, LAYER, LAYERS).cuda())
    q, k, v = inputs(args.n)
    do = torch.randn(q.shape[0], q.shape[2], args.n, q.shape[3], device="cuda", dtype=q.dtype)
    best = chunked._GPU_CONFIG
    reference = run(best, fn, q, k, v, do)
    lines = [f"linear tiles, N={args.n}, B=1, H=16, D=128, bf16, causal, {args.kind} (ms)", ""]
    steps = [("states", [dict(states_bk=a, states_bv=b, states_warps=w, states_stages=s) for a, b, w, s in SCAN], False),
             ("output", [dict(output_bv=b, output_warps=w, output_stages=s) for b, w, s in OUTPUT], False),
             ("dstates", [dict(dstates_bk=a, dstates_bv=b, dstates_warps=w, dstates_stages=s) for a, b, w, s in SCAN],
              True),
             ("grads", [dict(grads_warps=w, grads_stages=s) for w, s in GRADS], True)]
    for name, changes, backward in steps:
        times = {}
        for change in changes:
            cfg = dataclasses.replace(best, **change)
            times[cfg] = timed(cfg, fn, q, k, v, do, reference, backward)
        shipped = times.get(best, float("nan"))
        best = min(times, key=times.get)
        lines.append(f"- {name}: best {times[best]:.3f} ms (shipped {shipped:.3f}) with "
                     f"{ {key: getattr(best, key) for key in changes[0]} }")
    fwd = timed(best, fn, q, k, v, do, reference, False)
    both = timed(best, fn, q, k, v, do, reference, True)
    lines += ["", f"best: fwd {fwd:.3f} ms, fwd+bwd {both:.3f} ms: ATTNCC_LINEAR_CONFIG='{json.dumps(list(dataclasses.astuple(best)))}'"]
    print("\n".join(lines))
    out = os.environ.get("OUT")
    if out:
        pathlib.Path(out, f"linear_config_{args.kind}.json").write_text(json.dumps(list(dataclasses.astuple(best))))
        pathlib.Path(out, f"tune_linear_{args.kind}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
