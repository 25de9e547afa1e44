"""GPU benchmark: a whole Llama-style model (transformers' code), prefill, eager vs torch.compile vs attncc.

The anchor of ../shared/ANCHORS.md: 16 layers, d=2048, 16 heads, 4 kv heads (853M parameters),
random init, bf16, attn_implementation="sdpa", use_cache=False, batch 1. attncc runs the `softmax`
variant (the same math): its matcher turns the dense causal mask that transformers builds in the graph
into causal=True, and the site runs attncc's flash kernel. Inner compiler Inductor for both compiled
columns. The output of each compiled model is checked against eager first.

    python bench/bench_model.py [--sizes 8192 32768] [--layers 16]
    python bench/bench_model.py --train --sizes 8192          # a training step (forward + backward)
    python bench/bench_model.py --residual 8 --sizes 32768    # + a column with Block AttnRes (blocks of 8)

Prints a markdown table last; writes it to $OUT/bench_model.md when OUT is set.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time
import warnings

import torch
import triton

import attncc


def build(layers: int, causal_lm: bool = False):
    """The 853M Llama (16 layers) of the benchmarks, bf16 on the GPU: LlamaModel, or with causal_lm
    LlamaForCausalLM (its LM head, for generate)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=131072,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return (LlamaForCausalLM if causal_lm else LlamaModel)(cfg).to("cuda", torch.bfloat16).eval()


def timed_first_call(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def floor(model, ids, kwargs) -> float:
    """The same model with every attention returning its values (repeated to the query heads), compiled:
    the time of everything but attention."""
    from transformers import AttentionInterface

    def values(module, query, key, value, attention_mask, **_):
        heads = query.shape[1]
        out = value.repeat_interleave(heads // value.shape[1], dim=1) if value.shape[1] != heads else value
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("attncc_floor", values)
    saved = model.config._attn_implementation
    model.config._attn_implementation = "attncc_floor"
    try:
        torch._dynamo.reset()
        compiled = torch.compile(model)
        compiled(ids, **kwargs)
        return triton.testing.do_bench(lambda: compiled(ids, **kwargs)[0], warmup=2, rep=20)
    finally:
        model.config._attn_implementation = saved


def step(ids, kwargs, train: bool):
    """`run(fn, owner)`: one call of `fn` (the eager model or a compiled one); with `train` also the backward
    of the mean square of the output, after which the gradients of `owner`'s parameters are dropped."""
    def run(fn, owner):
        out = fn(ids, **kwargs)[0]
        if train:
            out.float().square().mean().backward()
            owner.zero_grad(set_to_none=True)
        return out.detach()

    return run


def with_attnres(model, run, policy: str, block_size: int) -> float:
    """attncc with `policy` plus Block AttnRes, on a copy of the model (its new parameters go on the copy)."""
    import copy

    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = attncc.compile(twin, {"attention": policy, "residual": {"variant": "attnres", "block_size": block_size}})
    run(compiled, twin)
    t = triton.testing.do_bench(lambda: run(compiled, twin), warmup=2, rep=20)
    return t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--policy", default="softmax",
                        help="the attention variant attncc applies (softmax, linear, ...); for any other than "
                             "softmax a last column times the no-attention floor: the same model with each "
                             "attention returning its values, compiled")
    parser.add_argument("--train", action="store_true",
                        help="time a training step: forward, then backward of the mean square of the output")
    parser.add_argument("--residual", type=int, default=0, metavar="BLOCK",
                        help="also time attncc with the policy plus Block AttnRes (residual: attnres, block_size "
                             "BLOCK) on a copy of the model; its ratio to the attncc column is AttnRes's cost")
    parser.add_argument("--mask", action="store_true",
                        help="pass an all-ones attention_mask, as pipelines and generate do: the mask reads an "
                             "input, so attncc checks its structure and reads its key padding on every call")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    model = build(args.layers)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    rows = []
    for n in args.sizes:
        ids = torch.randint(0, 32000, (1, n), device="cuda")
        kwargs = {"use_cache": False}
        if args.mask:
            kwargs["attention_mask"] = torch.ones(1, n, dtype=torch.long, device="cuda")
        with torch.set_grad_enabled(args.train):
            run = step(ids, kwargs, args.train)
            ref = run(model, model)
            t_eager = triton.testing.do_bench(lambda: run(model, model), warmup=2, rep=20)

            torch._dynamo.reset()
            plain = torch.compile(model)
            out_plain, first_plain = timed_first_call(lambda: run(plain, model))
            t_plain = triton.testing.do_bench(lambda: run(plain, model), warmup=2, rep=20)

            torch._dynamo.reset()
            be = attncc.backend({"attention": args.policy})
            ours = attncc.compile(model, be)
            out_ours, first_ours = timed_first_call(lambda: run(ours, model))
            t_ours = triton.testing.do_bench(lambda: run(ours, model), warmup=2, rep=20)
            t_floor = float("nan")
            if args.policy != "softmax" and not args.train:
                t_floor = floor(model, ids, kwargs)
            t_res = float("nan")
            if args.residual:
                t_res = with_attnres(model, run, args.policy, args.residual)
        sites = be.report.attention()
        err_plain = ((out_plain.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        err_ours = ((out_ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        if args.policy != "softmax":  # another variant computes other numbers: compare with its own eager reference
            err_ours = float("nan")
        print(f"N={n}: sites {len(sites)}, masks {sorted({s.mask for s in sites})}, kernel {sites[0].kernel}; "
              f"rel err vs eager: compile {err_plain:.3g}, attncc {err_ours:.3g}", flush=True)
        rows.append((n, t_eager, t_plain, first_plain, t_ours, first_ours, t_floor, t_res))
        del ref, out_plain, out_ours, plain, ours
        torch.cuda.empty_cache()

    lines = [
        f"Llama-style model, {params:.0f}M parameters, bf16, batch 1, "
        + ("training step (forward + backward of mean(out^2))" if args.train else "prefill")
        + " (ms, medians of do_bench); "
        f"attncc = torch.compile with attncc's {args.policy} variant (Inductor inner)"
        + ("; every call passes an all-ones attention_mask (checked at run time)" if args.mask else ""),
        "",
        "| N | eager | torch.compile | attncc | attncc vs compile | attncc vs eager | first call compile / attncc (s) "
        f"| no-attention floor | attncc / floor | attncc + Block AttnRes({args.residual}) | AttnRes cost |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, te, tp, fp, to, fo, tf, tr in rows:
        lines.append(f"| {n} | {te:.1f} | {tp:.1f} | {to:.1f} | {tp / to:.2f}x | {te / to:.2f}x | {fp:.0f} / {fo:.0f} "
                     f"| {tf:.1f} | {to / tf:.2f}x | {tr:.1f} | {tr / to - 1:+.1%} |")
    table = "\n".join(lines)
    print(table)
    out = os.environ.get("OUT")
    if out:
        name = "bench_model" + (f"_{args.policy}" if args.policy != "softmax" else "") + ("_mask" if args.mask else "") \
            + ("_train" if args.train else "") + (f"_attnres{args.residual}" if args.residual else "")
        pathlib.Path(out, name + ".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
