"""Attention patterns, matched on the canonical graph (see attncc.passes.canonicalize).

Two patterns, one per meaning:

    def sdpa_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    def softmax_attention(q, k, v, mask_ops, scale, p):
        scores = torch.matmul(q * c_q, torch.transpose(k * c_k, -2, -1))
        logits = mask_ops(scores * c)              # any chain of: scalar mul, add(mask), masked_fill,
                                                   # where(cond, ., fill), casts
        probs = F.dropout(F.softmax(logits, dim=-1).to(q.dtype), p, training)
        return torch.matmul(probs, v)

Either way k and v may arrive repeated for GQA/MQA (repeat_kv's unsqueeze/expand/reshape, or
repeat_interleave); the match records the un-repeated tensors and the group size.

A match either succeeds, or fails with a reason that explain() reports for the node that looked
like attention (a softmax over the last dim, or an SDPA call).
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from attncc.fx import is_parameter_placeholder, meta_value, ndim_of, shape_of, static_int

SDPA_TARGETS = {torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention}


class NoMatch(Exception):
    """A node looked like attention but is not one we can rewrite; the message says why."""


@dataclass
class AttentionMatch:
    pattern: str
    anchor: fx.Node
    output: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    kv_repeat: int
    scale: float | fx.Node | None
    is_causal: bool
    dropout_p: float | fx.Node  # a node: a probability only known at run time (a float attribute under dynamic=True)
    attn_mask: fx.Node | None = None
    scores: fx.Node | None = None
    logits: fx.Node | None = None
    has_mask_ops: bool = False
    score_ops: list[fx.Node] = field(default_factory=list)  # softmax input back to the scores
    view_lead: tuple[int, ...] | None = None  # leading dims of the scores' view, when q/k/v have others
    interior: list[fx.Node] = field(default_factory=list)

    def shapes(self) -> tuple[tuple | None, tuple | None, tuple | None]:
        """Shapes of q, k, v as the site's op receives them: k un-transposed, in the scores' view."""
        q, v = shape_of(self.q), shape_of(self.v)
        k = shape_of(self.k.node) if isinstance(self.k, TransposeOf) else shape_of(self.k)
        if isinstance(self.k, TransposeOf) and k is not None:
            k = (*k[:-2], k[-1], k[-2])
        if self.view_lead is not None:
            q, k, v = ((*self.view_lead, *x[-2:]) if x is not None else None for x in (q, k, v))
        return q, k, v

    def _dim(self, tensor: int, dim: int) -> int | None:
        shape = self.shapes()[tensor]
        return static_int(shape[dim]) if shape is not None and len(shape) >= -dim else None

    @property
    def heads(self) -> int | None:
        return self._dim(0, -3)

    @property
    def kv_heads(self) -> int | None:
        return self._dim(1, -3)

    @property
    def head_dim(self) -> int | None:
        return self._dim(0, -1)

    @property
    def value_dim(self) -> int | None:
        return self._dim(2, -1)

    @property
    def q_len(self) -> int | None:
        return self._dim(0, -2)

    @property
    def kv_len(self) -> int | None:
        return self._dim(1, -2)


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def is_softmax_last_dim(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.softmax and node.kwargs.get("dim") == -1


def _is_call(node: Any, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _is_cast(node: Any) -> bool:
    """A dtype cast (canonical `to`) or a `contiguous()`: value-preserving steps the walks pass through."""
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("to", "contiguous")


def _is_scalar(x: Any) -> bool:
    """A Python number, or a 0-d tensor node (a float attribute that dynamo lifted to an input)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return True
    if isinstance(meta_value(x), (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(meta_value(x), bool):
        return True
    shape = shape_of(x)
    return shape is not None and len(shape) == 0


def is_activation_matmul(node: Any) -> bool:
    """matmul of two activations: neither operand is a parameter (that would be a projection)."""
    if not _is_call(node, torch.matmul):
        return False
    a, b = node.args
    nd_a, nd_b = ndim_of(a), ndim_of(b)
    if nd_a is None or nd_b is None or nd_a < 3 or nd_b < 3:
        return False
    return not any(is_parameter_placeholder(x) or _derives_from_parameter_only(x) for x in (a, b))


def _derives_from_parameter_only(node: fx.Node, depth: int = 4) -> bool:
    """A parameter seen through a few views/transposes (e.g. `x @ self.w.t()`)."""
    for _ in range(depth):
        if is_parameter_placeholder(node):
            return True
        inputs = node.all_input_nodes
        if len(inputs) != 1:
            return False
        node = inputs[0]
    return is_parameter_placeholder(node)


# --- SDPA -------------------------------------------------------------------------------------

_SDPA_SIGNATURE = inspect.Signature(
    [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
        for name, default in [
            ("query", inspect.Parameter.empty),
            ("key", inspect.Parameter.empty),
            ("value", inspect.Parameter.empty),
            ("attn_mask", None),
            ("dropout_p", 0.0),
            ("is_causal", False),
        ]
    ]
    + [
        inspect.Parameter("scale", inspect.Parameter.KEYWORD_ONLY, default=None),
        inspect.Parameter("enable_gqa", inspect.Parameter.KEYWORD_ONLY, default=False),
    ]
)


def match_sdpa(node: fx.Node) -> AttentionMatch:
    bound = _SDPA_SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    a = bound.arguments
    q, k, v = a["query"], a["key"], a["value"]
    dropout_p = _dropout_probability(a["dropout_p"])
    if not isinstance(a["is_causal"], bool):
        raise NoMatch("is_causal is not a constant")
    scale = a["scale"]
    if scale is not None and not _is_scalar(scale):
        raise NoMatch("scale is not a scalar")
    k, v, group = _unrepeat_kv(q, k, v)
    return AttentionMatch(
        pattern="sdpa_attention",
        anchor=node,
        output=node,
        q=q,
        k=k,
        v=v,
        kv_repeat=group,
        scale=scale,
        is_causal=a["is_causal"],
        dropout_p=dropout_p,
        attn_mask=a["attn_mask"],
        interior=[node],
    )


# --- softmax(q kᵀ) v chains ---------------------------------------------------------------------


def match_softmax_chain(softmax: fx.Node) -> AttentionMatch:
    logits = softmax.args[0]
    scores, scale_terms, has_mask_ops, before = _walk_to_scores(logits)
    probs_out, dropout_p, after = _walk_to_value_product(softmax)
    if len(scores.users) != 1:
        raise NoMatch(f"the scores {scores.name} are used elsewhere too")
    a, b = scores.args
    q, q_scale = _peel_scalars(a)
    if _is_call(b, torch.transpose) and b.args[1:] == (-2, -1):
        k, k_scale = _peel_scalars(b.args[0])
        k_direct = k
    else:
        k, k_scale, k_direct = None, [], b
    scale_terms = scale_terms + q_scale + k_scale
    v = probs_out.args[1]
    if not is_activation_matmul(probs_out):
        raise NoMatch("the probabilities are not multiplied with a value tensor")
    if k is None:
        k = TransposeOf(k_direct)
    q_shape, v_shape, s_shape, l_shape = shape_of(q), shape_of(v), shape_of(scores), shape_of(logits)
    if s_shape[-1] != v_shape[-2]:
        raise NoMatch("the value length differs from the key length")
    view_lead = None
    if q_shape[:-2] == l_shape[:-2] and _broadcast_heads(v_shape, q_shape):
        pass  # multi-query by broadcasting: one kv head for all query heads (Falcon)
    elif q_shape[:-2] != l_shape[:-2] or v_shape[:-2] != l_shape[:-2]:
        view_lead = tuple(static_int(d) for d in l_shape[:-2])
        if None in view_lead or any(static_int(d) is None for d in (*q_shape, *v_shape)):
            raise NoMatch("the scores are viewed to other leading dims, with symbolic sizes")
        if not (math.prod(view_lead) == math.prod(q_shape[:-2]) == math.prod(v_shape[:-2])):
            raise NoMatch("batch dims of q, scores and v differ")
    group = 1
    if not isinstance(k, TransposeOf) and view_lead is None:
        k, v, group = _unrepeat_kv(q, k, v)
    return AttentionMatch(
        pattern="softmax_attention",
        anchor=softmax,
        output=probs_out,
        q=q,
        k=k,  # type: ignore[arg-type]
        v=v,
        kv_repeat=group,
        scale=_combine_scale(scale_terms),
        is_causal=False,
        dropout_p=dropout_p,
        scores=scores,
        logits=logits,
        has_mask_ops=has_mask_ops,
        score_ops=before,
        view_lead=view_lead,
        interior=before + [softmax] + after,
    )


class TransposeOf:
    """k is only available as kᵀ (e.g. k.permute(0, 2, 3, 1)); the rewrite inserts a transpose."""

    def __init__(self, node: fx.Node):
        self.node = node


def _walk_to_scores(logits: fx.Node):
    """From the softmax input back to the q·kᵀ matmul, through scales, masks and casts."""
    node = logits
    scale_terms: list = []
    chain: list[fx.Node] = []
    has_mask_ops = False
    for _ in range(32):
        if is_activation_matmul(node):
            return node, scale_terms, has_mask_ops, chain
        if not isinstance(node, fx.Node):
            raise NoMatch("the softmax input is not computed from a q·kᵀ product")
        chain.append(node)
        if _is_cast(node) or _is_lead_view(node):
            node = node.args[0]
        elif _is_call(node, operator.mul) and _is_scalar(node.args[1]):
            scale_terms.append(node.args[1])
            node = node.args[0]
        elif _is_call(node, operator.truediv) and _is_scalar(node.args[1]):
            scale_terms.append(("inverse", node.args[1]))
            node = node.args[0]
        elif _is_call(node, operator.add):
            has_mask_ops = True
            node = _scores_side(node.args[0], node.args[1])
        elif _is_call(node, torch.masked_fill):
            has_mask_ops = True
            node = node.args[0]
        elif _is_call(node, torch.where) and len(node.args) == 3:
            has_mask_ops = True
            node = _scores_side(node.args[1], node.args[2])
        else:
            raise NoMatch(f"unrecognized op {_describe(node)} between the q·kᵀ product and the softmax")
        if len(chain[-1].users) != 1 and chain[-1] is not logits:
            raise NoMatch(f"intermediate scores {chain[-1].name} are used elsewhere")
    raise NoMatch("the chain from q·kᵀ to the softmax is too long")


def _broadcast_heads(kv_shape: tuple, q_shape: tuple) -> bool:
    """kv [B, 1, T, D] against q [B, H, T, D]: matmul broadcasts the single kv head."""
    return (len(kv_shape) == len(q_shape) >= 3 and kv_shape[-3] == 1 and q_shape[-3] != 1
            and tuple(kv_shape[:-3]) == tuple(q_shape[:-3]))


def _is_lead_view(node: Any) -> bool:
    """A view/reshape that only regroups leading dims: [B·H, T, T'] <-> [B, H, T, T']."""
    if not (isinstance(node, fx.Node) and (node.op == "call_method" and node.target in ("view", "reshape")
                                           or _is_call(node, torch.reshape))):
        return False
    out, inp = shape_of(node), shape_of(node.args[0])
    return out is not None and inp is not None and len(out) >= 3 and len(inp) >= 3 and out[-2:] == inp[-2:]


def _scores_side(a: Any, b: Any) -> fx.Node:
    """Of two operands, the one that carries the scores (reaches a q·kᵀ matmul through the chain)."""
    hits = [x for x in (a, b) if _reaches_scores(x)]
    if not hits:
        raise NoMatch("the scores reach the softmax through an op that is neither a scale nor a mask "
                      "(e.g. tanh soft-capping): not standard softmax attention")
    if len(hits) != 1:
        raise NoMatch("both operands of an add/where carry scores: cannot tell the scores from the mask")
    return hits[0]


def _reaches_scores(node: Any, depth: int = 16) -> bool:
    for _ in range(depth):
        if not isinstance(node, fx.Node):
            return False
        if is_activation_matmul(node):
            return True
        if _is_cast(node) or _is_lead_view(node) or _is_call(node, torch.masked_fill):
            node = node.args[0]
        elif (_is_call(node, operator.mul) or _is_call(node, operator.truediv)) and _is_scalar(node.args[1]):
            node = node.args[0]
        elif _is_call(node, operator.add):
            return _reaches_scores(node.args[0], depth - 1) or _reaches_scores(node.args[1], depth - 1)
        elif _is_call(node, torch.where) and len(node.args) == 3:
            return _reaches_scores(node.args[1], depth - 1) or _reaches_scores(node.args[2], depth - 1)
        else:
            return False
    return False


def _walk_to_value_product(softmax: fx.Node):
    """From the softmax forward to the product with v, through casts and dropout."""
    node = softmax
    dropout_p = 0.0
    chain: list[fx.Node] = []
    for _ in range(8):
        users = list(node.users)
        if len(users) != 1:
            others = ", ".join(u.name for u in users) or "nothing"
            raise NoMatch(f"the attention probabilities ({node.name}) are used by {others}, not only by the product with v")
        (user,) = users
        if _is_cast(user) or _is_lead_view(user):
            node = user
        elif _is_call(user, F.dropout):
            p, training = user.args[1], user.args[2]
            if not isinstance(training, bool):
                raise NoMatch("the dropout's training flag is not a constant")
            dropout_p = _dropout_probability(p) if training else 0.0  # training=False: the identity, whatever p is
            node = user
        elif _is_call(user, torch.matmul) and user.args[0] is node:
            return user, dropout_p, chain
        else:
            raise NoMatch(f"the softmax output goes to {_describe(user)}, not to a product with v")
        chain.append(node)
    raise NoMatch("no product with v after the softmax")


def _dropout_probability(p: Any) -> float | fx.Node:
    """A dropout probability as a float, or as the node of a Python scalar known only at run time.

    Under dynamic=True dynamo lifts a float attribute (`self.dropout`) to a 0-d tensor input and reads
    it with `.item()`: the site then passes that node on to its op, which applies the dropout as given."""
    if isinstance(p, (int, float)) and not isinstance(p, bool):
        return float(p)
    if isinstance(p, fx.Node) and isinstance(meta_value(p), (float, torch.SymFloat, int, torch.SymInt)):
        return p
    raise NoMatch(f"dropout probability {_describe(p)} is neither a number nor a Python scalar of the graph")


def _peel_scalars(node: fx.Node) -> tuple[fx.Node, list]:
    """x * c (or x / c) -> (x, [c]); a scale applied to q or k before the product."""
    terms = []
    while True:
        if _is_call(node, operator.mul) and _is_scalar(node.args[1]) and len(node.users) == 1:
            terms.append(node.args[1])
            node = node.args[0]
        elif _is_call(node, operator.truediv) and _is_scalar(node.args[1]) and len(node.users) == 1:
            terms.append(("inverse", node.args[1]))
            node = node.args[0]
        else:
            return node, terms


def _combine_scale(terms: list) -> float | fx.Node | list:
    """Fold numeric terms into one float; tensor-valued terms stay as nodes (a list)."""
    value = 1.0
    nodes = []
    for term in terms:
        if isinstance(term, tuple):
            inner = term[1]
            if isinstance(inner, (int, float)):
                value /= inner
            else:
                nodes.append(term)
        elif isinstance(term, (int, float)):
            value *= term
        else:
            nodes.append(term)
    if not nodes:
        return value
    return [value, *nodes]


# --- GQA / MQA ----------------------------------------------------------------------------------


def _unrepeat_kv(q: fx.Node, k: Any, v: Any) -> tuple[Any, Any, int]:
    """Look through repeat_kv on k and v; returns (k, v, group) with group = H / Hkv."""
    k0, gk = _unrepeat(k)
    v0, gv = _unrepeat(v)
    if gk == gv and gk > 1:
        return k0, v0, gk
    return k, v, 1


def _unrepeat(node: Any) -> tuple[Any, int]:
    if not isinstance(node, fx.Node):
        return node, 1
    out_shape = shape_of(node)
    if out_shape is None or len(out_shape) != 4:
        return node, 1
    # x.repeat_interleave(G, dim=1)
    if (node.op == "call_method" and node.target == "repeat_interleave") or _is_call(node, torch.repeat_interleave):
        x = node.args[0]
        reps = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if isinstance(reps, int) and dim in (1, -3) and shape_of(x) is not None:
            return x, reps
        return node, 1
    # x[:, :, None].expand(B, Hkv, G, T, D).reshape(B, Hkv * G, T, D)
    if node.op == "call_method" and node.target in ("reshape", "view") or _is_call(node, torch.reshape):
        expanded = node.args[0]
        if not (isinstance(expanded, fx.Node) and expanded.op == "call_method" and expanded.target == "expand"):
            return node, 1
        e_shape = shape_of(expanded)
        inner = expanded.args[0]
        i_shape = shape_of(inner)
        if e_shape is None or i_shape is None or len(e_shape) != 5 or len(i_shape) != 5 or i_shape[2] != 1:
            return node, 1
        if not isinstance(inner, fx.Node):
            return node, 1
        base = inner.args[0] if inner.args else None
        b_shape = shape_of(base)
        if b_shape is None or len(b_shape) != 4 or tuple(b_shape) != tuple(i_shape[:2]) + tuple(i_shape[3:]):
            return node, 1
        group = static_int(e_shape[2])
        if group is None:
            return node, 1
        return base, group
    return node, 1


def _describe(node: Any) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({target})"


__all__ = [
    "AttentionMatch",
    "NoMatch",
    "is_sdpa",
    "is_softmax_last_dim",
    "match_sdpa",
    "match_softmax_chain",
]
