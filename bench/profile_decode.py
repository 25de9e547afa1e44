"""Where a decode step's time goes: attncc generate against eager generate on the 853M Llama of
bench_decode.py. For each column: ms per decode step, of which inside the model's forward (timed by
forward hooks with a device sync), dynamo's counters (graphs, recompiles, graph breaks), and the
profiler's top CUDA kernels and CPU ops over a few decode steps.

    python bench/profile_decode.py [--prompt 4096] [--batch 1] [--new 17]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time
import warnings

import torch

import attncc
from bench_decode import build


def step_times(model, generate, ids, mask, new: int) -> tuple[float, float]:
    """(ms per decode step, ms per decode step inside forward)."""
    inside = []

    def pre(module, args, kwargs):
        torch.cuda.synchronize()
        inside.append(-time.perf_counter())

    def post(module, args, kwargs, out):
        torch.cuda.synchronize()
        inside[-1] += time.perf_counter()

    handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
               model.register_forward_hook(post, with_kwargs=True)]
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        torch.cuda.synchronize()
        whole = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    prefill = inside[0]
    steps = inside[1:]
    return (whole - prefill) / len(steps) * 1e3, sum(steps) / len(steps) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new", type=int, default=17)
    parser.add_argument("--columns", nargs="+", default=["eager", "linear"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    model = build(16)
    ids = torch.randint(3, 32000, (args.batch, args.prompt), device="cuda")
    mask = torch.ones_like(ids)
    compiled = {}

    def linear():
        compiled["linear"] = attncc.compile(model, {"attention": "linear"})
        return compiled["linear"].generate

    makers = {"eager": lambda: model.generate, "linear": linear}
    lines = []
    for name in args.columns:
        torch._dynamo.reset()
        from torch._dynamo.utils import counters
        counters.clear()
        generate = makers[name]()
        generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        step, fwd = min(step_times(model, generate, ids, mask, args.new) for _ in range(2))
        stats = {k: dict(v) for k, v in counters.items() if k in ("stats", "graph_break", "recompiles")}
        stats["cudagraphs"] = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
        if name in compiled:
            print(compiled[name].state_decode)
            print(compiled[name]._attncc_backend.report.table(), flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        cuda = prof.key_averages().table(sort_by="self_device_time_total", row_limit=15)
        print(f"=== {name}: {step:.2f} ms/step, {fwd:.2f} in forward\n{stats}\n{table}\n{cuda}", flush=True)
        lines.append(f"| {name} | {args.batch} | {step:.2f} | {fwd:.2f} | {stats.get('stats', {}).get('unique_graphs')} |")
    out = "\n".join(["| column | batch | ms/step | in forward | graphs |", "|---|---|---|---|---|", *lines])
    print(out)
    if os.environ.get("OUT"):
        pathlib.Path(os.environ["OUT"], "profile_decode.md").write_text(out + "\n")


if __name__ == "__main__":
    main()
