"""Building a rewritten site's call: its q, k, v as the op receives them, its scale and its mask.
Shared by every attention rewrite (attention.py, sqa.py)."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx

from attncc.fx import meta_value, ndim_of, propagate_meta
from attncc.patterns.attention import AttentionMatch, TransposeOf


def site_values(match: AttentionMatch) -> tuple:
    """Example values of q, k, v as the site's op receives them (k un-transposed, in the scores' view)."""
    q, v = meta_value(match.q), meta_value(match.v)
    k = meta_value(match.k.node).transpose(-2, -1) if isinstance(match.k, TransposeOf) else meta_value(match.k)
    if match.view_lead is not None:
        q, k, v = (x.reshape(*match.view_lead, *x.shape[-2:]) for x in (q, k, v))
    return q, k, v


def scale_node(graph: fx.Graph, match: AttentionMatch):
    scale = match.scale
    if scale is None:
        return 1.0 / math.sqrt(match.head_dim) if match.head_dim else _dynamic_default_scale(graph, match)
    if isinstance(scale, (int, float)):
        return float(scale)
    if isinstance(scale, fx.Node):
        return scale
    value, *terms = scale
    out: Any = float(value)
    for term in terms:
        if isinstance(term, tuple):
            out = new_node(graph, operator.truediv, (out, term[1])) if isinstance(out, fx.Node) else new_node(graph, torch.div, (out, term[1]))
        else:
            out = new_node(graph, operator.mul, (term, out))
    return out


def _dynamic_default_scale(graph: fx.Graph, match: AttentionMatch) -> fx.Node:
    """SDPA's default 1/sqrt(D) for a symbolic head dim, computed in the graph."""
    head_dim = graph.call_method("size", (match.q, -1))
    return graph.call_function(operator.pow, (head_dim, -0.5))


def mask_node(graph: fx.Graph, match: AttentionMatch) -> fx.Node:
    """The site's mask as one tensor: SDPA's attn_mask, or the chain's mask ops applied to zeros."""
    if match.pattern == "sdpa_attention":
        return match.attn_mask
    like = match.scores
    if ndim_of(like) == 4:  # one head: a mask shared by the heads stays [B, 1, Tq, Tk]; per-head ops broadcast
        like = new_node(graph, operator.getitem, (like, (slice(None), slice(None, 1))), like=match.scores)
    zeros = new_node(graph, torch.zeros_like, (like,), like=match.scores)
    env = {match.scores: zeros}
    for new in (like, zeros):
        propagate_meta(new)
    for node in reversed(match.score_ops):
        env[node] = graph.node_copy(node, lambda n: env.get(n, n))
        propagate_meta(env[node])
    return env[match.logits]


def new_node(graph: fx.Graph, target, args, like: fx.Node | None = None) -> fx.Node:
    node = graph.call_function(target, args)
    if like is not None and isinstance(like, fx.Node):
        node.meta["nn_module_stack"] = like.meta.get("nn_module_stack", {})
    return node
