"""sqa: sparse query attention, fewer query heads by weight surgery on the projections. VARIANTS.md §7.

The surgery on the query and output projections is a graph rewrite (passes/sqa.py); the site itself
then runs softmax attention with the new head counts (variants/softmax).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from attncc.config import VariantConfig
from attncc.facts import SiteFacts

from ..base import SiteCall, Variant
from ..softmax import DenseKernel, attention


@dataclass(frozen=True)
class SQA(VariantConfig):
    """Sparse query attention: fewer query heads (None = half the site's heads). VARIANTS.md §7."""

    variant: ClassVar[str] = "sqa"
    minimum: ClassVar[dict[str, float]] = {"query_heads": 1, "kv_heads": 1}
    query_heads: int | None = None
    kv_heads: int | None = None
    init: Literal["mean", "select"] = "mean"
    kernel: DenseKernel = "auto"  # as softmax's: what a dense site runs on CUDA (softmax/route.py)


def head_counts(heads: int, kv_heads: int, config: SQA) -> tuple[int, int] | str:
    """(query heads, kv heads) the policy asks of a site with `heads`/`kv_heads`, or why it cannot apply."""
    hq = config.query_heads or max(1, heads // 2)
    hkv = config.kv_heads or min(kv_heads, hq)  # default: keep the kv heads, pooled down to hq if needed
    if heads % hq or hq % hkv or (hkv % kv_heads and kv_heads % hkv) or hq > heads:
        return (f"sqa cannot map {heads} query / {kv_heads} kv heads to query_heads={hq}, kv_heads={hkv}: "
                "query_heads must divide the heads and be a multiple of kv_heads")
    if kv_heads % hkv == 0 and (heads // hq) > (heads // kv_heads) * (kv_heads // hkv):
        return f"sqa query groups of {heads // hq} heads would mix kv groups of {heads // kv_heads} heads"
    return hq, hkv


class SQAVariant(Variant):
    config = SQA
    title = "sqa"
    structures = ("none", "causal", "sliding_window", "other")
    takes_dropout = True
    rewrites_projections = True  # passes/sqa.py rebuilds the projections around the site
    warns_on_refusal = True  # head counts that do not fit the policy are a mistake to see at compile time

    def check(self, site: SiteFacts, config: SQA) -> str | None:
        if None in (site.heads, site.kv_heads, site.head_dim) or len(site.q_shape) != 4:
            return "sqa needs 4-D [B, H, T, D] q/k/v with static head counts"
        counts = head_counts(site.heads, site.kv_heads, config)
        if isinstance(counts, str):
            return counts
        if counts == (site.heads, site.kv_heads) and config.query_heads is None:
            return "sqa with these heads is the identity"
        return None

    def constants(self, site: SiteFacts, config: SQA) -> dict:
        return {"kernel": config.kernel}

    def run(self, call: SiteCall, q, k, v, mask, scale, dropout_p) -> torch.Tensor:
        return attention(call, q, k, v, mask, scale, dropout_p)


VARIANT = SQAVariant()
