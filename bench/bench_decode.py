"""GPU benchmark: generation after a long prompt. Time to first token and decode tokens/s of the 853M
Llama of bench_model.py (as LlamaForCausalLM, bf16, random init), greedy, against transformers' eager
generate (SDPA, DynamicCache) and its compiled static-cache generate.

    python bench/bench_decode.py [--prompt 32768] [--batches 1 16] [--new 64] [--no-static] [--no-window] [--no-linear]

Columns: eager generate; static cache, whose decode steps transformers' generate compiles itself
(its recipe for compiled generation); attncc `linear` (generate carries a StateCache: each layer keeps its recurrent
state, O(d²) per head); attncc `sparse` sliding window(1024) + 4 sinks (a StateCache too: each layer
keeps a window cache of the 4 sinks and the last 1024 keys and values, a ring). Decode tokens/s = batch · (new - 1) / (t(new tokens) - t(1 token)),
each a whole generate call after a warm-up call that compiles every graph. Prints a markdown table
last; writes it to $OUT/bench_decode.md when OUT is set.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time
import warnings

import torch

import attncc
import bench_model  # noqa: E402 (this folder is on the path when the script runs)


def build(layers: int):
    return bench_model.build(layers, causal_lm=True)


def timed(generate, ids, mask, new: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(generate, ids, mask, new: int) -> tuple[float, float]:
    """(time to first token in ms, decode tokens/s), after a warm-up that compiles every graph."""
    generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    first = min(timed(generate, ids, mask, 1) for _ in range(2))
    whole = min(timed(generate, ids, mask, new) for _ in range(2))
    return first * 1e3, ids.shape[0] * (new - 1) / (whole - first)


def static_generate(model):
    """transformers' compiled generation: a static cache, whose decode steps generate compiles itself
    (torch.compile with CUDA graphs, its default compile_config)."""

    def generate(ids, **kwargs):
        return model.generate(ids, cache_implementation="static", **kwargs)

    return generate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", type=int, default=32768)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--no-static", action="store_true", help="skip the static-cache compiled anchor")
    parser.add_argument("--no-window", action="store_true", help="skip the sliding-window column")
    parser.add_argument("--no-linear", action="store_true", help="skip the linear column")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build(args.layers)
    columns = {"eager": lambda: model.generate}
    if not args.no_static:
        columns["static+compile"] = lambda: static_generate(model)
    if not args.no_linear:
        columns["attncc linear"] = lambda: attncc.compile(model, {"attention": "linear"}).generate
    if not args.no_window:
        columns["attncc window(1024)+4"] = lambda: attncc.compile(
            model, {"attention": {"variant": "sparse", "pattern": "sliding_window", "window": 1024, "sinks": 4}}).generate
    rows = []
    for batch in args.batches:
        ids = torch.randint(3, 32000, (batch, args.prompt), device="cuda", generator=None)
        mask = torch.ones_like(ids)
        results = {}
        for name, make in columns.items():
            torch._dynamo.reset()
            try:
                results[name] = measure(make(), ids, mask, args.new)
            except Exception as error:  # an anchor that cannot run this shape is reported, not fatal
                results[name] = (float("nan"), float("nan"))
                print(f"{name} B={batch}: {type(error).__name__}: {str(error)[:300]}", flush=True)
            print(f"B={batch} {name}: TTFT {results[name][0]:.1f} ms, decode {results[name][1]:.1f} tok/s", flush=True)
            torch.cuda.empty_cache()
        eager_tps = results["eager"][1]
        for name, (ttft, tps) in results.items():
            rows.append(f"| {batch} | {name} | {ttft:.1f} | {tps:.1f} | {tps / eager_tps:.2f}x |")
    table = "\n".join([f"prompt {args.prompt} tokens, {args.new} new tokens, greedy, bf16, {torch.cuda.get_device_name()}",
                       "", "| batch | generate | time to first token (ms) | decode tokens/s | vs eager |",
                       "|---|---|---|---|---|", *rows])
    print(table)
    if os.environ.get("OUT"):
        pathlib.Path(os.environ["OUT"], "bench_decode.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
