"""Train a small Llama language model on the Python standard library, then convert its attention.

    python examples/convert_lm.py --report examples/reports/lm.md   # on the GPU: 3 minutes of training, 5 variants
    python examples/convert_lm.py --variants linear sparse --steps 100 --finetune-steps 100
    python examples/convert_lm.py --kv-heads 4                         # grouped-query attention (4 kv heads)
    python examples/convert_lm.py --size tiny --train-steps 30 --steps 5 --finetune-steps 3   # a CPU smoke run

The text is real and offline: the `.py` files of this Python's standard library (sorted; without the
test suites, idlelib, lib2to3, the encodings tables and site-packages), as UTF-8 bytes, one token per byte
(vocabulary 256, no tokenizer to download). Every 20th file is validation text, the others training
text, so the two are disjoint. The model is transformers' `LlamaForCausalLM` from a config (`--size base`:
hidden 512, 8 layers, 8 heads, about 25M parameters; `--size small`: hidden 128, 4 layers, 4 heads,
about 0.9M, for a CPU run of minutes; `--size tiny`: hidden 64, 2 layers, 4 heads, for the test),
pretrained from scratch (AdamW, warmup and cosine, bf16 autocast and Inductor on CUDA) for
`--train-seconds` or `--train-steps`, whichever ends first.

Then, for each variant (POLICIES below), on a copy of the trained model:

1. `attncc.convert` with `finetune_steps=0` and a checkpoint directory: the attention transfer; then the
   validation perplexity "after transfer".
2. `attncc.convert` again with the same arguments plus `finetune_steps`, on a fresh copy of the trained
   model: convert resumes from the checkpoint of the finished transfer (no transfer step runs again, the
   weights are the checkpoint's) and continues into its LoRA fine-tune on the model's own loss (the
   batches carry labels); then the validation perplexity "after fine-tune".
3. Prefill tokens/s: forward passes (no cache) over `--prefill-batch` sequences of `--prefill-len` tokens,
   median of 5 after warmup, against the original model measured in the same run.

Perplexity is exp(mean next-token cross-entropy) over `--eval-sequences` validation sequences of `--seq`
bytes, the same sequences for every column, each model compiled (the original with torch.compile, the
converted ones with attncc.compile; Inductor and bf16 autocast on CUDA, aot_eager in fp32 on the CPU).
With --report, writes the Markdown table there, the rows as JSON beside it (same name, `.json`) and
each variant's pictures into the folder of the same name (`<report>/<variant>/`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import statistics
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import torch

import attncc
from attncc.pictures import attention_maps, attnres_depth_weights, report_pictures

POLICIES = {
    "linear": {"attention": {"default": {"variant": "linear", "feature_map": "elu1"}}},
    "sparse": {"attention": {"default": {"variant": "sparse", "pattern": "sliding_window", "window": 64, "sinks": 4}}},
    "softplus": {"attention": {"default": {"variant": "softplus", "reweight_p": 0}}},  # LSSA
    "sqa": {"attention": {"default": {"variant": "sqa"}}},  # query_heads: half the heads (the default)
    "attnres": {"residual": {"variant": "attnres", "block_size": 2, "exact_start": True}},  # attention kept
}
SIZES = {
    "base": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1408),
    "small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=352),  # a CPU run
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=176),
}
SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "encodings", "ensurepip",
        "turtledemo", "__phello__"}
VALIDATION_EVERY = 20
INNER = ("inductor", "aot_eager", "eager")
PICTURE_TOKENS = 128  # the attention pictures: the first this many bytes of the first validation sequence


# --- data -----------------------------------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted, without the folders in SKIP."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not SKIP.intersection(p.relative_to(root).parts[:-1])
             and not p.relative_to(root).parts[0].startswith("config-")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_bytes() -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(training bytes, validation bytes, facts): every VALIDATION_EVERY-th file is validation text; the
    files of each split are joined with a blank line. uint8 tensors: one token per byte."""
    files = stdlib_files()
    splits: tuple[list[bytes], list[bytes]] = ([], [])
    for i, path in enumerate(files):
        splits[i % VALIDATION_EVERY == VALIDATION_EVERY - 1].append(path.read_bytes())
    train, validation = (torch.frombuffer(bytearray(b"\n\n".join(parts)), dtype=torch.uint8) for parts in splits)
    facts = dict(files=len(files), train_files=len(splits[0]), validation_files=len(splits[1]),
                 train_bytes=train.numel(), validation_bytes=validation.numel(),
                 python=".".join(map(str, sys.version_info[:3])))
    return train, validation, facts


def batch(ids: torch.Tensor) -> dict:
    """A causal LM batch: the model's own loss (next-token cross-entropy; transformers shifts the labels)."""
    return {"input_ids": ids, "labels": ids}


def sequences(stream: torch.Tensor, seq: int, count: int) -> torch.Tensor:
    """`count` non-overlapping sequences of `seq` bytes, evenly spaced over the stream: LongTensor[count, seq]."""
    chunks = stream[:stream.numel() // seq * seq].view(-1, seq)
    if count > len(chunks):
        raise ValueError(f"the validation text has {len(chunks)} sequences of {seq} bytes; asked for {count}")
    index = torch.linspace(0, len(chunks) - 1, count).round().long()
    return chunks[index].long()


def random_sequences(stream: torch.Tensor, seq: int, count: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - seq, (count,), generator=generator)
    return torch.stack([stream[s:s + seq] for s in starts.tolist()]).long()


# --- the model and its pretraining ------------------------------------------------------------------------


def build_model(size: str = "base", kv_heads: int | None = None, max_positions: int = 4096, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SIZES[size]
    config = LlamaConfig(vocab_size=256, num_key_value_heads=kv_heads or shape["num_attention_heads"],
                         max_position_embeddings=max_positions, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None, attn_implementation="sdpa", use_cache=False, **shape)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pretrain(model, train: torch.Tensor, *, seq: int, batch_size: int, seconds: float, steps: int | None,
             lr: float = 1e-3, warmup: int = 100, seed: int = 0, progress: bool = True) -> dict:
    """AdamW (weight decay 0.1 on matrices), linear warmup then cosine to lr/10, for `seconds` (counted after
    the first step, which compiles) or `steps`, whichever ends first; the cosine follows whichever is further
    along. On CUDA: bf16 autocast and the model compiled with Inductor (the module itself is what trains).
    Returns the facts for the report."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95), **({"fused": True} if device.type == "cuda" else {}))
    step_fn = torch.compile(model) if device.type == "cuda" else model
    warmup = min(warmup, max(1, (steps or 10 ** 9) // 10))
    model.train()
    bar = tqdm(total=steps, desc="pretraining", disable=not progress)
    step, start, loss_value, tokens = 0, None, float("nan"), 0
    while steps is None or step < steps:
        elapsed = 0.0 if start is None else time.perf_counter() - start
        if start is not None and elapsed >= seconds:
            break
        done = max(step / steps if steps else 0.0, elapsed / seconds if seconds else 0.0)
        scale = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * min(done, 1.0)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        ids = random_sequences(train, seq, batch_size, generator).to(device)
        with autocast(device):
            loss = step_fn(**batch(ids)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if start is None:
            sync(device)
            start = time.perf_counter()  # after the first step: compiling
        else:
            tokens += ids.numel()
        if step % 10 == 0 or step == steps:
            loss_value = loss.item()
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.0f}")
        bar.update(1)
    bar.close()
    sync(device)
    loss_value = loss.item()
    seconds_run = time.perf_counter() - start
    model.eval()
    return dict(steps=step, tokens=step * batch_size * seq, seconds=seconds_run, final_loss=loss_value,
                tokens_per_second=tokens / max(seconds_run, 1e-9))


# --- measurements -----------------------------------------------------------------------------------------


def compiled(model, policy, inner: str):
    """(callable, backend): the original (policy None) with torch.compile and no backend object; a converted
    model with attncc.compile and its policy."""
    if policy is None:
        return torch.compile(model, backend=inner), None
    backend = attncc.backend(policy, inner=inner)
    return attncc.compile(model, backend), backend


def perplexity(model, policy, evaluation: torch.Tensor, *, inner: str, batch_size: int) -> tuple[float, str]:
    """exp(mean next-token cross-entropy) over the evaluation sequences (batches of equal size, so the mean of
    the batches' losses is the mean over tokens), and how many of the policy's sites the compiled graphs
    rewrote ("rewritten/sites" over every graph of the run; "" for the original)."""
    device = next(model.parameters()).device
    torch._dynamo.reset()
    fn, backend = compiled(model.eval(), policy, inner)
    losses = []
    with torch.no_grad(), autocast(device):
        for i in range(0, len(evaluation), batch_size):
            ids = evaluation[i:i + batch_size].to(device)
            losses.append(fn(**batch(ids)).loss.float().item())
    sites = ""
    if backend is not None:
        kind = "residual" if "residual" in policy else "attention"
        ours = [s for s in backend.report.sites if s.kind == kind]
        sites = f"{sum(s.status == 'rewritten' for s in ours)}/{len(ours)}"
    return math.exp(sum(losses) / len(losses)), sites


def prefill_rate(model, policy, ids: torch.Tensor, *, inner: str, repeats: int = 5, warmup: int = 2) -> float:
    """Tokens per second of a forward pass over `ids` (no cache): median of `repeats` after `warmup` calls."""
    device = next(model.parameters()).device
    torch._dynamo.reset()
    fn, _ = compiled(model.eval(), policy, inner)
    ids = ids.to(device)
    times = []
    with torch.no_grad(), autocast(device):
        for i in range(warmup + repeats):
            sync(device)
            start = time.perf_counter()
            fn(input_ids=ids, use_cache=False)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return ids.numel() / statistics.median(times)


@contextlib.contextmanager
def recorded(notes: list[str], stage: str):
    """attncc's warnings during a conversion (e.g. sites it left unchanged in one of the graphs), kept for the
    report and shown once each; the other warnings of the call (transformers' deprecations) are dropped."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if "attncc" in str(w.message):
            note = f"{stage}: {w.message}"
            if note not in notes:
                notes.append(note)
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)


# --- one variant ----------------------------------------------------------------------------------------------


def run(variant: str, trained, train_batches: list[dict], evaluation: torch.Tensor, prefill: torch.Tensor, *,
        steps: int, finetune_steps: int = 0, lr: float = 1e-3, finetune_lr: float = 1e-3, eval_batch: int = 16,
        inner: str = "aot_eager", convert_inner: str = "aot_eager", seed: int = 0, progress: bool = True,
        pictures: str | Path | None = None) -> dict:
    """Convert copies of the trained model with POLICIES[variant]: the transfer (checkpointed), then the same
    conversion resumed from that checkpoint into the LoRA fine-tune; perplexities after each, prefill rate,
    pictures (`pictures`: a folder)."""
    policy = POLICIES[variant]
    device = next(trained.parameters()).device
    held_out = batch(evaluation[:train_batches[0]["input_ids"].shape[0]].to(device))
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix=f"convert_lm_{variant}_") as checkpoint:
        kwargs = dict(held_out=held_out, steps=steps, lr=lr, seed=seed, inner=convert_inner, progress=progress,
                      finetune_lr=finetune_lr, checkpoint=checkpoint, checkpoint_every=max(steps, finetune_steps))
        model = copy.deepcopy(trained)
        torch._dynamo.reset()
        start = time.perf_counter()
        with recorded(notes, "transfer"):
            transfer = attncc.convert(model, policy, train_batches, finetune_steps=0, **kwargs)
        seconds = time.perf_counter() - start
        ppl_transfer, sites = perplexity(model, policy, evaluation, inner=inner, batch_size=eval_batch)
        result, ppl_finetune = transfer, None
        if finetune_steps > 0:
            model = copy.deepcopy(trained)  # as a new process would start: the checkpoint has the transfer
            torch._dynamo.reset()
            start = time.perf_counter()
            with recorded(notes, "fine-tune"):
                result = attncc.convert(model, policy, train_batches, finetune_steps=finetune_steps, **kwargs)
            seconds += time.perf_counter() - start
            ppl_finetune, sites = perplexity(model, policy, evaluation, inner=inner, batch_size=eval_batch)
    rate = prefill_rate(model, policy, prefill, inner=inner)
    drawn = []
    if pictures is not None:
        folder = Path(pictures)
        example = {"input_ids": evaluation[:1, :PICTURE_TOKENS].to(device)}
        torch._dynamo.reset()
        if policy.get("attention"):
            drawn.append(attention_maps(trained, model, policy, example, path=folder / "attention.png"))
        if policy.get("residual"):
            drawn.append(attnres_depth_weights(model, policy, example, path=folder / "depth_weights.png"))
    torch._dynamo.reset()
    return dict(variant=variant, sites=sites, steps=steps, finetune_steps=finetune_steps, ppl_transfer=ppl_transfer,
                ppl_finetune=ppl_finetune, prefill=rate, seconds=seconds, layer_before=transfer.before,
                layer_transferred=transfer.after, layer_after=result.after, transfer=transfer, result=result,
                model=model, pictures=drawn, notes=notes)


def table(rows: list[dict]) -> str:
    """The report's table: the original's row first (its perplexity and prefill rate), then one per variant."""
    original = rows[0]
    lines = ["| variant | transfer steps | LoRA steps | ppl original | ppl after transfer | ppl after fine-tune | "
             "prefill tok/s | vs original | convert (s) |", "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x, spec: "" if x is None else format(x, spec)  # noqa: E731
    for r in rows:
        mark = " (note)" if r.get("notes") else ""
        lines.append(f"| {r['variant']}{mark} | {fmt(r.get('steps'), 'd')} | {fmt(r.get('finetune_steps'), 'd')} | "
                     f"{original['ppl_original']:.3f} | {fmt(r.get('ppl_transfer'), '.3f')} | "
                     f"{fmt(r.get('ppl_finetune'), '.3f')} | {r['prefill']:,.0f} | "
                     f"{r['prefill'] / original['prefill']:.2f}x | {fmt(r.get('seconds'), '.0f')} |")
    return "\n".join(lines)


JSON_KEYS = ("variant", "sites", "notes", "steps", "finetune_steps", "ppl_original", "ppl_transfer", "ppl_finetune",
             "prefill", "seconds", "layer_before", "layer_transferred", "layer_after")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--size", choices=list(SIZES), default="base")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: as many as heads)")
    parser.add_argument("--seq", type=int, default=512, help="bytes per training and validation sequence")
    parser.add_argument("--batch", type=int, default=32, help="pretraining batch (sequences)")
    parser.add_argument("--train-seconds", type=float, default=180.0)
    parser.add_argument("--train-steps", type=int, default=None)
    parser.add_argument("--train-lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=200, help="attention transfer steps")
    parser.add_argument("--finetune-steps", type=int, default=200, help="LoRA fine-tune steps after the transfer")
    parser.add_argument("--lr", type=float, default=1e-3, help="attention transfer learning rate")
    parser.add_argument("--finetune-lr", type=float, default=1e-3, help="LoRA learning rate")
    parser.add_argument("--transfer-batch", type=int, default=8, help="sequences per conversion batch")
    parser.add_argument("--eval-sequences", type=int, default=256)
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--prefill-batch", type=int, default=None, help="default: 8 on CUDA, 1 on the CPU")
    parser.add_argument("--prefill-len", type=int, default=None, help="default: 4096 on CUDA, 256 on the CPU")
    parser.add_argument("--inner", default=None, choices=INNER,
                        help="the inner compiler of the perplexity and prefill runs (default: inductor on CUDA, "
                             "aot_eager on the CPU)")
    parser.add_argument("--convert-inner", default="aot_eager", choices=INNER,
                        help="the inner compiler of attncc.convert's training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--report", default=None, help="write the Markdown report here (and the rows as .json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    inner = args.inner or ("inductor" if cuda else "aot_eager")
    prefill_batch = args.prefill_batch or (8 if cuda else 1)
    prefill_len = args.prefill_len or (4096 if cuda else 256)
    progress = not args.no_progress
    if cuda:
        torch.set_float32_matmul_precision("high")

    train, validation, facts = stdlib_bytes()
    evaluation = sequences(validation, args.seq, args.eval_sequences)
    prefill = validation[:prefill_batch * prefill_len].long().view(prefill_batch, prefill_len)
    model = build_model(args.size, args.kv_heads, max(args.seq, prefill_len), args.seed).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    trained = pretrain(model, train, seq=args.seq, batch_size=args.batch, seconds=args.train_seconds,
                       steps=args.train_steps, lr=args.train_lr, seed=args.seed, progress=progress)
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(args.seed + 1)
    count = min(max(args.steps, args.finetune_steps), 256)  # distinct conversion batches, cycled past this
    train_batches = [batch(random_sequences(train, args.seq, args.transfer_batch, generator).to(device))
                     for _ in range(count)]
    original = dict(variant="original", ppl_original=perplexity(model, None, evaluation, inner=inner,
                                                                batch_size=args.eval_batch)[0],
                    prefill=prefill_rate(model, None, prefill, inner=inner))
    folder = Path(args.report).with_suffix("") if args.report else None

    def write(rows: list[dict]) -> str:
        """The report of the rows so far (written to --report after every variant, so a cut-short run keeps its finished rows)."""
        name = "cuda: " + torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
        heads = model.config.num_attention_heads
        text = (f"# A byte-level Llama on the Python standard library, converted by attncc\n\n"
                f"`LlamaForCausalLM` ({args.size}: hidden {model.config.hidden_size}, {model.config.num_hidden_layers} "
                f"layers, {heads} heads, {model.config.num_key_value_heads} kv heads; {parameters / 1e6:.1f}M "
                f"parameters), bytes as tokens (vocabulary 256), pretrained from scratch on {device} ({name}) for "
                f"{trained['steps']} steps of {args.batch} x {args.seq} bytes: {trained['tokens'] / 1e6:.1f}M tokens "
                f"({trained['tokens'] / facts['train_bytes']:.1f} passes over the training text), "
                f"{trained['seconds']:.0f} s after the first (compiling) step, "
                f"{trained['tokens_per_second']:,.0f} tokens/s; last training loss {trained['final_loss']:.3f}. "
                f"Data: the `.py` files of the Python {facts['python']} standard library (no tests, idlelib, lib2to3, "
                f"encodings, site-packages), {facts['train_files']} files ({facts['train_bytes'] / 1e6:.1f} MB) for "
                f"training, every {VALIDATION_EVERY}th file, {facts['validation_files']} files "
                f"({facts['validation_bytes'] / 1e6:.2f} MB), for validation; perplexity per byte over "
                f"{args.eval_sequences} validation sequences of {args.seq} bytes ({'bf16 autocast' if cuda else 'fp32'}, "
                f"compiled with {inner}). "
                f"Conversion: `attncc.convert` ({args.steps} transfer steps at lr {args.lr:g}, then, resumed from the "
                f"transfer's checkpoint, {args.finetune_steps} LoRA steps at lr {args.finetune_lr:g} on the model's "
                f"loss; batches of {args.transfer_batch} x {args.seq}; inner compiler {args.convert_inner}); convert (s) "
                "is both calls, compiling included. "
                f"Prefill: one forward pass of {prefill_batch} x {prefill_len} tokens, no cache, median of 5 after 2 "
                f"warmup calls, against the original (SDPA) compiled the same way in this run.\n\n"
                f"Policies: " + "; ".join(f"`{v}` {json.dumps(POLICIES[v])}" for v in args.variants) + ". "
                "`attnres` keeps the attention; with `exact_start` it computes the original model at init (layer error "
                "0), so its transfer can only move it away (AdamW's first steps are about the learning rate in size, "
                "whatever the gradient) and only the fine-tune, on the model's loss, can improve on the original.\n\n"
                + table(rows) + "\n")
        notes = [f"- {r['variant']}, {note}" for r in rows[1:] for note in r.get("notes", [])]
        if notes:
            text += "\nNotes (attncc's warnings during the conversions):\n\n" + "\n".join(notes) + "\n"
        if args.report:
            report = Path(args.report)
            report.parent.mkdir(parents=True, exist_ok=True)
            text += ("\nPictures per variant: the per-layer error against the original before, after the transfer and "
                     "after the fine-tune, and the training curves; `attention.png`: the attention of the middle layer on "
                     f"the first {PICTURE_TOKENS} bytes of the first validation sequence, averaged over heads, of the "
                     "original beside the converted layer's weights; `depth_weights.png` (AttnRes): the mean weight each "
                     "sublayer gives each earlier block output (0 = embedding).\n")
            for r in rows[1:]:
                text += report_pictures(r["result"], folder, r["variant"])
            report.write_text(text)
            record = dict(model=dict(size=args.size, parameters=parameters, config=model.config.to_diff_dict()),
                          pretraining=trained, data=facts, device=name, args=vars(args),
                          rows=[{k: r[k] for k in JSON_KEYS if k in r} for r in rows])
            report.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str) + "\n")
        return text

    rows = [original]
    for v in args.variants:
        row = run(v, model, train_batches, evaluation, prefill, steps=args.steps, finetune_steps=args.finetune_steps,
                  lr=args.lr, finetune_lr=args.finetune_lr, eval_batch=args.eval_batch, inner=inner,
                  convert_inner=args.convert_inner, seed=args.seed, progress=progress,
                  pictures=None if folder is None else folder / v)
        row["ppl_original"] = original["ppl_original"]
        rows.append(row)
        print(table([original, row]).splitlines()[-1], flush=True)  # each row as it is measured
        write(rows)

    print(write(rows))
    return rows


if __name__ == "__main__":
    main()
