"""Attention Residuals reference (VARIANTS.md §9): softmax attention over depth with a static query.

One aggregation (§9.1), per token:

    h = Σ_i α_i v_i,   α = softmax_i(w · RMSNorm_g(v_i)),   RMSNorm_g(v) = v / sqrt(mean(v²) + eps) ⊙ g

Keys are the RMS-normalized sources (with their own weight g), values are the raw sources, the query
w is one learned vector per aggregation (no projections, no 1/√d). With w = 0 the weights are uniform
and h is the mean of the sources. One source is returned as it is.

The stream (§9.1 Full, §9.2 Block): sublayer l (0-based) reads the aggregation of its sources, and
its output is added to the running sum of its block; a block of `block_size` sublayers, once
complete, becomes one source (the embedding is source 0). Sublayer l of block n = l // block_size
sees [b_0, ..., b_n] plus, unless it is the block's first sublayer, the block's partial sum.
block_size = 1 is Full AttnRes (every sublayer output is a source). After the last sublayer one more
aggregation (its own w and g) over every block gives the stream's output, which the final norm reads.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def attnres(sources: Sequence[Tensor], query: Tensor, norm_weight: Tensor, eps: float = 1e-6) -> Tensor:
    """sources: [..., d] each -> [..., d] in the first source's dtype; computed in fp32 (or fp64)."""
    if len(sources) == 1:
        return sources[0]
    dtype = torch.promote_types(sources[0].dtype, torch.float32)
    values = torch.stack([s.to(dtype) for s in sources])  # [S, ..., d]
    keys = values * torch.rsqrt(values.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(dtype)
    logits = (keys * query.to(dtype)).sum(-1)  # [S, ...]
    weights = torch.softmax(logits, dim=0).unsqueeze(-1)  # [S, ..., 1]
    return (weights * values).sum(0).to(sources[0].dtype)


def attnres_stream(
    embedding: Tensor,
    sublayers: Sequence[Callable[[Tensor], Tensor]],
    queries: Sequence[Tensor | None],
    norm_weights: Sequence[Tensor | None],
    *,
    block_size: int = 1,
    eps: float = 1e-6,
) -> Tensor:
    """The AttnRes stream over pre-norm sublayers f_l (each includes its own norm: f_l(x) = F(Norm(x))).

    `queries` and `norm_weights` have len(sublayers) + 1 entries: one per sublayer (entry 0, whose only
    source is the embedding, is unused and may be None) and the output aggregation last.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if len(queries) != len(sublayers) + 1 or len(norm_weights) != len(sublayers) + 1:
        raise ValueError("queries and norm_weights need one entry per sublayer plus one for the output")
    blocks: list[Tensor] = [embedding]
    partial: Tensor | None = None
    for l, f in enumerate(sublayers):
        sources = blocks + ([partial] if partial is not None else [])
        out = f(attnres(sources, queries[l], norm_weights[l], eps))
        partial = out if partial is None else partial + out
        if (l + 1) % block_size == 0:
            blocks.append(partial)
            partial = None
    sources = blocks + ([partial] if partial is not None else [])
    return attnres(sources, queries[-1], norm_weights[-1], eps)
