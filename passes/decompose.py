"""Open up the opaque attention ops of torch.nn, so that their attention matches like any other.

`nn.MultiheadAttention` reaches the dynamo graph as one `F.multi_head_attention_forward` call, and
`nn.TransformerEncoderLayer` in eval mode under no_grad as one `torch._transformer_encoder_layer_fwd`
(its fast path). Each rule below is a plain-PyTorch function with the op's exact semantics; the pass
traces it with torch.fx and inlines the traced nodes in place of the opaque call. A call the rules
cannot express exactly (bias_k/bias_v, add_zero_attn, static k/v) is left alone and reported.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from attncc.fx import meta_value, orphaned, propagate_meta, read_nodes, remove_dead


def mha_forward(query, key, value, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                key_padding_mask, attn_mask, q_proj_weight, k_proj_weight, v_proj_weight, *,
                embed_dim: int, num_heads: int, dropout_p: float, training: bool, need_weights: bool,
                average_attn_weights: bool, is_causal: bool, separate: bool,
                mask_ndim: int = 2, mask_is_bool: bool = True, padding_is_bool: bool = True):
    """F.multi_head_attention_forward on [L, N, E] inputs (torch.nn's layout), unbatched not included."""
    head_dim = embed_dim // num_heads
    if separate:
        w_q, w_k, w_v = q_proj_weight, k_proj_weight, v_proj_weight
    else:
        w_q, w_k, w_v = in_proj_weight.chunk(3)
    if in_proj_bias is None:
        b_q = b_k = b_v = None
    else:
        b_q, b_k, b_v = in_proj_bias.chunk(3)
    # [L, N, E] -> [N, H, L, hd]
    q = F.linear(query, w_q, b_q).unflatten(-1, (num_heads, head_dim)).permute(1, 2, 0, 3)
    k = F.linear(key, w_k, b_k).unflatten(-1, (num_heads, head_dim)).permute(1, 2, 0, 3)
    v = F.linear(value, w_v, b_v).unflatten(-1, (num_heads, head_dim)).permute(1, 2, 0, 3)
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))
    if attn_mask is not None:
        if mask_ndim == 3:  # [N * H, L, S] -> [N, H, L, S]
            attn_mask = attn_mask.unflatten(0, (-1, num_heads))
        if mask_is_bool:
            scores = scores.masked_fill(attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    if key_padding_mask is not None:
        padding = key_padding_mask[:, None, None, :]
        if padding_is_bool:
            scores = scores.masked_fill(padding, float("-inf"))
        else:
            scores = scores + padding
    probs = F.softmax(scores, dim=-1)
    probs = F.dropout(probs, dropout_p, training)
    out = torch.matmul(probs, v)
    out = out.permute(2, 0, 1, 3).flatten(-2)
    out = F.linear(out, out_proj_weight, out_proj_bias)
    if not need_weights:
        return out, None
    weights = probs.mean(dim=1) if average_attn_weights else probs
    return out, weights


def _bind_mha(node: fx.Node) -> dict[str, Any] | None:
    sig = inspect.signature(F.multi_head_attention_forward)
    bound = sig.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"]:
        return None
    if a["static_k"] is not None or a["static_v"] is not None:
        return None
    if meta_value(a["query"]) is None or meta_value(a["query"]).dim() != 3:
        return None
    if not all(isinstance(a[n], (bool, int, float)) for n in ("dropout_p", "training", "need_weights", "is_causal")):
        return None
    return a


def _mask_facts(attn_mask, key_padding_mask) -> dict[str, Any]:
    """What the decomposition branches on, read from the example values (fx cannot trace it)."""
    mask, padding = meta_value(attn_mask), meta_value(key_padding_mask)
    return dict(
        mask_ndim=mask.dim() if isinstance(mask, torch.Tensor) else 2,
        mask_is_bool=mask.dtype == torch.bool if isinstance(mask, torch.Tensor) else True,
        padding_is_bool=padding.dtype == torch.bool if isinstance(padding, torch.Tensor) else True,
    )


def decompose_mha(node: fx.Node) -> tuple[Callable, list, dict] | None:
    a = _bind_mha(node)
    if a is None:
        return None
    tensors = [a["query"], a["key"], a["value"], a["in_proj_weight"], a["in_proj_bias"], a["out_proj_weight"],
               a["out_proj_bias"], a["key_padding_mask"], a["attn_mask"], a["q_proj_weight"], a["k_proj_weight"],
               a["v_proj_weight"]]
    consts = dict(embed_dim=a["embed_dim_to_check"], num_heads=a["num_heads"], dropout_p=float(a["dropout_p"]), training=bool(a["training"]),
                  need_weights=bool(a["need_weights"]), average_attn_weights=bool(a["average_attn_weights"]),
                  is_causal=bool(a["is_causal"]), separate=bool(a["use_separate_proj_weight"]),
                  **_mask_facts(a["attn_mask"], a["key_padding_mask"]))
    return mha_forward, tensors, consts


def encoder_layer_forward(src, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, norm1_w, norm1_b,
                          norm2_w, norm2_b, linear1_w, linear1_b, linear2_w, linear2_b, mask, *,
                          embed_dim: int, num_heads: int, use_gelu: bool, norm_first: bool, eps: float,
                          mask_type: int | None, mask_ndim: int = 2, mask_is_bool: bool = True):
    """torch._transformer_encoder_layer_fwd: the batch_first fast path of nn.TransformerEncoderLayer."""
    key_padding_mask = attn_mask = None
    if mask is not None and mask_type == 1:
        key_padding_mask = mask
    elif mask is not None:
        attn_mask = mask.flatten(0, 1) if mask_ndim == 4 else mask
    facts = dict(mask_ndim=3 if mask_ndim == 4 else mask_ndim, mask_is_bool=mask_is_bool, padding_is_bool=mask_is_bool)

    def self_attention(x):
        x = x.transpose(0, 1)
        out, _ = mha_forward(x, x, x, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                             key_padding_mask, attn_mask, None, None, None, embed_dim=embed_dim,
                             num_heads=num_heads, dropout_p=0.0,
                             training=False, need_weights=False, average_attn_weights=True, is_causal=False,
                             separate=False, **facts)
        return out.transpose(0, 1)

    def feed_forward(x):
        hidden = F.linear(x, linear1_w, linear1_b)
        hidden = F.gelu(hidden) if use_gelu else F.relu(hidden)
        return F.linear(hidden, linear2_w, linear2_b)

    x = src
    if norm_first:
        x = x + self_attention(F.layer_norm(x, (embed_dim,), norm1_w, norm1_b, eps))
        x = x + feed_forward(F.layer_norm(x, (embed_dim,), norm2_w, norm2_b, eps))
    else:
        x = F.layer_norm(x + self_attention(x), (embed_dim,), norm1_w, norm1_b, eps)
        x = F.layer_norm(x + feed_forward(x), (embed_dim,), norm2_w, norm2_b, eps)
    return x


def decompose_encoder_layer(node: fx.Node) -> tuple[Callable, list, dict] | None:
    (src, embed_dim, num_heads, in_w, in_b, out_w, out_b, use_gelu, norm_first, eps,
     n1w, n1b, n2w, n2b, l1w, l1b, l2w, l2b, *rest) = node.args
    mask = rest[0] if rest else node.kwargs.get("mask")
    mask_type = rest[1] if len(rest) > 1 else node.kwargs.get("mask_type")
    if meta_value(src) is None or meta_value(src).dim() != 3:
        return None
    tensors = [src, in_w, in_b, out_w, out_b, n1w, n1b, n2w, n2b, l1w, l1b, l2w, l2b, mask]
    consts = dict(embed_dim=embed_dim, num_heads=num_heads, use_gelu=bool(use_gelu), norm_first=bool(norm_first),
                  eps=float(eps), mask_type=mask_type)
    value = meta_value(mask)
    if isinstance(value, torch.Tensor):
        consts.update(mask_ndim=value.dim(), mask_is_bool=value.dtype == torch.bool)
    return encoder_layer_forward, tensors, consts


RULES: dict[Any, Callable[[fx.Node], tuple[Callable, list, dict] | None]] = {
    F.multi_head_attention_forward: decompose_mha,
    torch._transformer_encoder_layer_fwd: decompose_encoder_layer,
}


def decompose(gm: fx.GraphModule) -> tuple[dict[str, int], list[tuple[fx.Node, str]]]:
    """Inline every opaque attention op a rule can express. Returns (hits, [(node, why) left alone])."""
    hits: dict[str, int] = {}
    refused: list[tuple[fx.Node, str]] = []
    graph = gm.graph
    before = read_nodes(graph)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        try:
            rule = RULES.get(node.target)
        except TypeError:
            continue
        if rule is None:
            continue
        plan = rule(node)
        if plan is None:
            refused.append((node, f"{getattr(node.target, '__name__', node.target)} with bias_k/bias_v, "
                                  "add_zero_attn or static k/v cannot be decomposed exactly"))
            continue
        fn, tensors, consts = plan
        _inline(graph, node, fn, tensors, consts)
        hits[rule.__name__] = hits.get(rule.__name__, 0) + 1
    remove_dead(graph, orphaned(graph, before))  # eliminate_dead_code would drop dynamo's effect nodes
    graph.lint()
    return hits, refused


def _inline(graph: fx.Graph, node: fx.Node, fn: Callable, tensors: list, consts: dict) -> None:
    present = [t for t in tensors if t is not None]

    def wrapper(*args):
        it = iter(args)
        full = [next(it) if t is not None else None for t in tensors]
        return fn(*full, **consts)

    names = [f"t{i}" for i in range(len(present))]
    traced = fx.symbolic_trace(_with_signature(wrapper, names))
    env: dict[fx.Node, Any] = {}
    placeholders = iter(present)
    stack = _module_stack_for(node)
    result = None
    with graph.inserting_before(node):
        for sub in traced.graph.nodes:
            if sub.op == "placeholder":
                env[sub] = next(placeholders)
            elif sub.op == "output":
                result = fx.node.map_arg(sub.args[0], lambda n: env[n])
            else:
                new = graph.node_copy(sub, lambda n: env[n])
                new.meta["nn_module_stack"] = stack
                new.meta["stack_trace"] = node.meta.get("stack_trace")
                propagate_meta(new)
                env[sub] = new
    _replace_uses(node, result)


def _with_signature(fn: Callable, names: list[str]) -> Callable:
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_ONLY) for n in names]
    fn.__signature__ = inspect.Signature(params)
    code = f"def decomposed({', '.join(names)}):\n    return _fn({', '.join(names)})\n"
    scope: dict[str, Any] = {"_fn": fn}
    exec(code, scope)
    return scope["decomposed"]


def _replace_uses(node: fx.Node, result: Any) -> None:
    if isinstance(result, (tuple, list)):
        for user in list(node.users):
            index = user.args[1] if user.op == "call_function" and len(user.args) == 2 else None
            if isinstance(index, int) and result[index] is not None:
                user.replace_all_uses_with(result[index])
            elif isinstance(index, int):
                raise RuntimeError("the decomposition dropped an output that is used")
    else:
        node.replace_all_uses_with(result)


def _module_stack_for(node: fx.Node) -> dict:
    stack = dict(node.meta.get("nn_module_stack") or {})
    if node.target is torch._transformer_encoder_layer_fwd and stack:
        path, _ = list(stack.values())[-1]
        stack["attncc_self_attn"] = (f"{path}.self_attn", torch.nn.MultiheadAttention)
    return stack
