"""Real text available offline, and how close two sets of sentence embeddings are (demo and recipes).

The text is the first paragraph of the docstrings of Python standard-library functions: English
sentences about code, the same on every machine with this Python, nothing downloaded.
"""

from __future__ import annotations

import inspect

import torch


def docstring_sentences() -> list[str]:
    """First docstring paragraphs of standard-library functions, deduplicated, in a fixed order."""
    import collections
    import functools
    import itertools
    import json
    import os.path
    import shutil
    import string
    import textwrap

    seen: dict[str, None] = {}
    for module in (json, textwrap, inspect, os.path, collections, functools, itertools, string, shutil):
        for name in sorted(vars(module)):
            obj = getattr(module, name)
            doc = inspect.getdoc(obj) if callable(obj) and not name.startswith("_") else None
            if doc:
                text = " ".join(doc.split("\n\n")[0].split())
                if len(text) >= 24:
                    seen.setdefault(text[:300])
    return list(seen)


def mean_pooled(model, batch: dict) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them: masked mean of the last hidden state, normalized."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two 1-D tensors (float similarities: no ties)."""
    ranks = lambda x: x.argsort().argsort().float()  # noqa: E731
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def embedding_quality(original: torch.Tensor, converted: torch.Tensor) -> tuple[float, float]:
    """(mean cosine of each converted embedding to its original, Spearman of all pairwise similarities)."""
    cosine = float((original * converted).sum(-1).mean())
    upper = torch.triu_indices(len(original), len(original), offset=1)
    sims = lambda e: (e @ e.T)[upper[0], upper[1]]  # noqa: E731
    return cosine, spearman(sims(original), sims(converted))
