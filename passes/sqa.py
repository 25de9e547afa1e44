"""SQA: fewer query heads, by weight surgery on the query and output projections (VARIANTS.md §7).

For a site with H query heads and Hkv kv heads, SQA keeps Hq = query_heads query heads. The query
projection W_Q [H·D, C] becomes W_Q' [Hq·D, C], each new head the mean (init "mean") or the first
(init "select") of its group of H/Hq old heads; the output projection W_O [C, H·D] becomes
W_O' [C, Hq·D], each new head's columns the sum (mean) or the selected head's columns (select) of its
group. Both new weights are computed in the graph from the original parameters, so gradients reach
the original parameters and the projection FLOPs shrink with Hq/H.

Everything between the query projection and the attention (views, transposes, rotary embedding) and
between the attention and the output projection is copied with the new projection as its input;
those ops must act per head (head count given as -1 or as H, which becomes Hq). kv_heads pools (mean)
or repeats the kv heads at the attention's input.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx

from attncc.codegen.variants import SiteCall
from attncc.codegen.variants.sqa import head_counts
from attncc.fx import ancestors, is_parameter_placeholder, propagate_meta, shape_of

from .context import Context, SiteState
from .site import mask_node, scale_node

_LINEAR = torch._C._nn.linear
_HEADWISE_METHODS = {"view", "reshape", "transpose", "contiguous", "to", "float", "type_as", "unsqueeze", "flatten"}
_HEADWISE_FUNCTIONS = {torch.transpose, torch.permute, operator.mul, operator.add, operator.sub, operator.neg,
                       torch.neg, torch.cat, operator.getitem, torch.reshape, torch.flatten}


class Refused(Exception):
    pass


def rewrite_sqa(ctx: Context, state: SiteState, call: SiteCall) -> str | None:
    """Rebuild the site's query and output projections with fewer heads, the site as `call` (softmax)
    on them. The variant's check has passed: static head counts the policy can map."""
    match, variant = state.match, state.variant
    heads, kv_heads, head_dim = match.heads, match.kv_heads, match.head_dim
    if match.view_lead is not None:
        return "sqa needs q/k/v with their own head dim (these are flattened into the batch)"
    hq, hkv = head_counts(heads, kv_heads, variant)
    try:
        projection, q_nodes = _producer_chain(match.q)
        o_nodes, o_proj = _consumer_chain(match.output)
        o_input = o_proj.args[1] if o_proj.target is torch.addmm else o_proj.args[0]
        q_heads = _follow_heads(projection.start, _FEATURES, q_nodes, match.q, _PER_HEAD, heads, head_dim)
        o_heads = _follow_heads(match.output, _PER_HEAD, o_nodes, o_input, _FEATURES, heads, head_dim)
    except Refused as why:
        return str(why)
    graph = ctx.gm.graph
    try:  # new nodes only: until the last line nothing of the original graph changes
        group = heads // hq
        with graph.inserting_before(match.output):
            new_q = _copy_chain(graph, projection.start, q_nodes, match.q,
                                _grouped_projection(graph, projection, heads, hq, head_dim, variant.init), q_heads, hq,
                                head_dim)
            k, v = _regroup_kv(graph, match.k, kv_heads, hkv), _regroup_kv(graph, match.v, kv_heads, hkv)
            scale = scale_node(graph, match)
            mask = None
            if state.mask.needs_tensor:
                mask = mask_node(graph, match)
                mask_shape = shape_of(mask)
                if mask_shape is not None and len(mask_shape) == 4 and mask_shape[1] != 1:
                    return f"sqa cannot regroup a per-head mask ({mask_shape})"
            attn = graph.call_function(call, (new_q, k, v, mask, scale, match.dropout_p))
            propagate_meta(attn)
        with graph.inserting_before(o_proj):
            new_out = _copy_chain(graph, match.output, o_nodes, o_input, attn, o_heads, hq, head_dim)
            new_proj = _grouped_out(graph, o_proj, new_out, heads, hq, group, variant.init)
    except (RuntimeError, TypeError, ValueError) as error:  # the new nodes are dead; the pass's cleanup drops them
        return f"sqa could not rebuild this site with {hq} query heads: {type(error).__name__}: {error}"[:300]
    o_proj.replace_all_uses_with(new_proj)
    state.site.params = {**state.site.params, "query_heads": hq, "kv_heads": hkv}
    state.site.reason = f"{heads} -> {hq} query heads, {kv_heads} -> {hkv} kv heads ({variant.init} init)"
    return None


@dataclass
class _Projection:
    """Where q's features come from: a linear (weight [out, in]) or an addmm (Conv1D, weight [in, out]),
    possibly fused with k and v, in which case q is the column range [lo, hi) of its output."""

    node: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: Any
    transposed: bool
    start: fx.Node  # the node whose value is exactly q's features [.., H·D]
    lo: int | None = None
    hi: int | None = None


def _producer_chain(q: fx.Node) -> tuple[_Projection, list[fx.Node]]:
    """The projection of q, and the head-wise nodes between q's features and q (graph order)."""
    order = {n: i for i, n in enumerate(q.graph.nodes)}
    found = [p for n in ancestors([q]) if (p := _as_projection(n)) is not None]
    if not found:
        raise Refused("sqa found no query projection (a linear or addmm with a weight parameter)")
    projection = max(found, key=lambda p: order[p.node])
    _select_features(projection, q)
    between = sorted((ancestors([q]) & _descendants(projection.start)) - {projection.start}, key=order.__getitem__)
    for node in between:
        if not _headwise(node):
            raise Refused(f"sqa cannot carry {node.name} ({node.target}) between the query projection and attention")
    return projection, between


def _as_projection(node: fx.Node) -> _Projection | None:
    if node.op != "call_function":
        return None
    if node.target is _LINEAR and len(node.args) > 1 and _is_param(node.args[1]):
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return _Projection(node, node.args[0], node.args[1], bias, False, node)
    if node.target is torch.addmm and len(node.args) == 3 and _is_param(node.args[2]) and not node.kwargs:
        bias, x2d, weight = node.args
        x = x2d.args[0] if isinstance(x2d, fx.Node) and x2d.op == "call_method" and x2d.target in ("view", "reshape") else x2d
        return _Projection(node, x, weight, bias, True, node)
    return None


def _select_features(projection: _Projection, q: fx.Node) -> None:
    """For a fused qkv projection, find the split/getitem that picks q's columns; record them."""
    for node in sorted(ancestors([q]) & _descendants(projection.node), key=lambda n: -len(ancestors([n]))):
        if not (node.op == "call_function" and node.target is operator.getitem):
            continue
        src, index = node.args
        is_split = isinstance(src, fx.Node) and (src.op == "call_method" and src.target == "split"
                                                 or src.op == "call_function" and src.target is torch.split)
        if not is_split or not isinstance(index, int):
            continue
        size = src.args[1] if len(src.args) > 1 else src.kwargs.get("split_size")
        dim = src.args[2] if len(src.args) > 2 else src.kwargs.get("dim", 0)
        ndim = len(shape_of(src.args[0]) or ())
        if not isinstance(size, int) or dim not in (-1, ndim - 1):
            raise Refused("sqa cannot follow a split of the fused projection that is not along the features")
        projection.start, projection.lo, projection.hi = node, index * size, (index + 1) * size
        _check_fused_path(projection)
        return


def _check_fused_path(projection: _Projection) -> None:
    """Between the fused projection and the split only views that keep the features last may stand."""
    for node in _descendants(projection.node) & ancestors([projection.start]):
        if node in (projection.node, projection.start) or node.target in ("split",) or node.target is torch.split:
            continue
        if not (node.op == "call_method" and node.target in ("view", "reshape")):
            raise Refused(f"sqa cannot follow {node.name} between the fused projection and the split")
        src, dst = _symbolic_shape(node.args[0]), _symbolic_shape(node)
        groups = _groups(src, dst) if src and dst else None
        if groups is None or _group_of(groups, src, dst, len(src) - 1) != ([len(src) - 1], [len(dst) - 1]):
            raise Refused(f"sqa cannot follow {node.name}: it does not keep the fused features as the last axis")


def _consumer_chain(out: fx.Node) -> tuple[list[fx.Node], fx.Node]:
    """The head-wise nodes after the attention output, up to the output projection."""
    nodes = []
    node = out
    for _ in range(8):
        users = list(node.users)
        if len(users) != 1:
            raise Refused("the attention output is used by more than the output projection")
        (user,) = users
        if user.op == "call_function" and user.target is _LINEAR and user.args[0] is node and _is_param(user.args[1]):
            return nodes, user
        if (user.op == "call_function" and user.target is torch.addmm and len(user.args) == 3
                and user.args[1] is node and _is_param(user.args[2])):
            return nodes, user
        if not _headwise(user):
            raise Refused(f"sqa cannot carry {user.name} between attention and the output projection")
        nodes.append(user)
        node = user
    raise Refused("no output projection after the attention")


def _copy_chain(graph: fx.Graph, start: fx.Node, nodes: list[fx.Node], end: fx.Node, replacement: fx.Node,
                layout: dict[fx.Node, _Heads], hq: int, head_dim: int) -> fx.Node:
    env: dict[fx.Node, Any] = {start: replacement}
    for node in nodes:
        new = graph.node_copy(node, lambda n: env.get(n, n))
        if _is_view(node):
            new.args = _fix_shape_args(node, new.args, layout[node], hq, head_dim)
        propagate_meta(new)
        env[node] = new
    return env.get(end, replacement)


@dataclass(frozen=True)
class _Heads:
    """Where a tensor keeps its heads, as negative axes: the heads at `heads` and the head dim at `dim`, or
    both merged (heads outer) in the one axis `heads` when `dim` is None. Found from the graph's structure
    (which op moved which axis), so a sequence length equal to the head count or to H·D changes nothing."""

    heads: int
    dim: int | None


_FEATURES = _Heads(-1, None)  # [.., H·D]: a projection's output
_PER_HEAD = _Heads(-3, -1)  # [B, H, T, D]: attention's q and output


def _follow_heads(start: fx.Node, layout: _Heads, nodes: list[fx.Node], end: fx.Node, want: _Heads,
                  heads: int, head_dim: int) -> dict[fx.Node, _Heads]:
    """The heads' axes of every node from `start` (laid out as `layout`) through `nodes` to `end`."""
    layouts = {start: layout}
    for node in nodes:
        layouts[node] = _step_heads(node, layouts, heads, head_dim)
    if layouts.get(end) != want:
        raise Refused(f"sqa cannot follow the heads from {start.name} to {end.name}: they end up in "
                      f"{layouts.get(end)} instead of {want}")
    return layouts


def _step_heads(node: fx.Node, layouts: dict[fx.Node, _Heads], heads: int, head_dim: int) -> _Heads:
    chain = [n for n in node.all_input_nodes if n in layouts]
    if not chain or any(layouts[n] != layouts[chain[0]] for n in chain):
        raise Refused(f"sqa cannot follow the heads through {node.name}: its inputs lay them out differently")
    src, layout = chain[0], layouts[chain[0]]
    in_shape, out_shape = _symbolic_shape(src), _symbolic_shape(node)
    if in_shape is None or out_shape is None:
        raise Refused(f"sqa cannot follow the heads through {node.name}: no example value")
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name in ("contiguous", "to", "float", "type_as", "neg"):
        return layout
    if node.target in (operator.mul, operator.add, operator.sub):
        for other in node.args:
            shape = shape_of(other) if isinstance(other, fx.Node) and other not in layouts else None
            if shape is not None and len(shape) >= -layout.heads and shape[layout.heads] != 1:
                raise Refused(f"sqa cannot carry {node.name}: its operand {other.name} {tuple(shape)} differs per head")
        return layout
    if name in ("transpose", "swapaxes", "permute"):
        return _moved(node, layout, len(in_shape))
    if name in ("view", "reshape", "flatten", "unsqueeze"):
        return _regrouped(node, layout, in_shape, out_shape, heads, head_dim)
    if node.target is operator.getitem:
        return _indexed(node, layout, len(in_shape), len(out_shape))
    if node.target is torch.cat:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        tensors = node.args[0]
        if not isinstance(dim, int) or any(t not in layouts for t in tensors):
            raise Refused(f"sqa cannot carry {node.name}: it concatenates tensors from outside the heads' chain")
        if dim % len(out_shape) - len(out_shape) == layout.heads:
            raise Refused(f"sqa cannot carry {node.name}: it concatenates along the heads")
        return layout
    raise Refused(f"sqa cannot carry {node.name} ({node.target}) between a projection and attention")


def _moved(node: fx.Node, layout: _Heads, ndim: int) -> _Heads:
    """The heads through transpose/permute: axes move by the op's own dims."""
    if node.target == "permute" or node.target is torch.permute:
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        dims = node.kwargs.get("dims", dims)
        order = [d % ndim for d in dims]
    else:
        d0, d1 = node.args[1:3] if len(node.args) == 3 else (node.kwargs.get("dim0"), node.kwargs.get("dim1"))
        order = list(range(ndim))
        order[d0 % ndim], order[d1 % ndim] = order[d1 % ndim], order[d0 % ndim]
    if sorted(order) != list(range(ndim)):
        raise Refused(f"sqa cannot read the axes of {node.name}")

    def moved(axis: int | None) -> int | None:
        return None if axis is None else order.index(axis % ndim) - ndim

    return _Heads(moved(layout.heads), moved(layout.dim))


def _groups(src: tuple, dst: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Axes of `src` and of `dst` (a view of it) that hold the same elements, as pairs of runs.

    A run ends where the running products of the sizes agree: that is where a row-major view puts the same
    flat offset, whatever the sizes themselves are. Sizes are sympy expressions, so a symbolic length
    is matched as a symbol, never by its example value."""

    def running(shape):
        out, total = [], sympy.Integer(1)
        for size in shape:
            total = total * size
            out.append(total)
        return out

    a, b = running(src), running(dst)
    if not src or not dst or a[-1] != b[-1]:
        return None
    groups: list[tuple[list[int], list[int]]] = []
    i0 = j0 = 0
    for i in range(len(src)):
        j = next((j for j in range(j0, len(dst)) if b[j] == a[i]), None)
        if j is not None:
            groups.append((list(range(i0, i + 1)), list(range(j0, j + 1))))
            i0, j0 = i + 1, j + 1
    last_in, last_out = groups[-1]
    groups[-1] = (last_in + list(range(i0, len(src))), last_out + list(range(j0, len(dst))))  # trailing 1s
    return groups


def _group_of(groups: list, src: tuple, dst: tuple, axis: int) -> tuple[list[int], list[int]]:
    """The run holding input `axis`, without its size-1 axes."""
    (ins, outs), = [(i, o) for i, o in groups if axis in i]
    return [a for a in ins if a == axis or src[a] != 1], [a for a in outs if dst[a] != 1]


def _regrouped(node: fx.Node, layout: _Heads, src: tuple, dst: tuple, heads: int, head_dim: int) -> _Heads:
    """The heads through view/reshape/flatten/unsqueeze: which output axes hold the heads' elements."""
    groups = _groups(src, dst)
    if groups is None:
        raise Refused(f"sqa cannot match the axes of {node.name}")
    n, m = len(src), len(dst)
    h = layout.heads % n
    ins, outs = _group_of(groups, src, dst, h)
    if layout.dim is None:  # heads merged with the head dim: [.., H·D]
        if ins == [h] and len(outs) == 1:
            return _Heads(outs[0] - m, None)
        if ins == [h] and len(outs) == 2 and (dst[outs[0]], dst[outs[1]]) == (heads, head_dim):
            return _Heads(outs[0] - m, outs[1] - m)  # [H·D] -> [H, D]
    else:
        d = layout.dim % n
        if ins == [h] and len(outs) == 1:
            d_ins, d_outs = _group_of(groups, src, dst, d)
            if d_ins == [d] and len(d_outs) == 1:
                return _Heads(outs[0] - m, d_outs[0] - m)
        if ins == [h, d] and len(outs) == 1:  # [H, D] -> [H·D]
            return _Heads(outs[0] - m, None)
    raise Refused(f"sqa cannot follow the heads through {node.name}: it mixes them with other axes")


def _indexed(node: fx.Node, layout: _Heads, in_ndim: int, out_ndim: int) -> _Heads:
    """The heads through x[...]: only other axes may be indexed (rotary's x[..., :D/2] slices the head dim)."""
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if not all(e is None or e is Ellipsis or isinstance(e, (int, slice)) for e in index):
        raise Refused(f"sqa cannot follow the heads through the indexing {node.name}")
    consumed = sum(1 for e in index if e is not None and e is not Ellipsis)
    expanded: list = []
    for e in index:
        expanded.extend([slice(None)] * (in_ndim - consumed) if e is Ellipsis else [e])
    if Ellipsis not in index:
        expanded.extend([slice(None)] * (in_ndim - consumed))
    where: dict[int, tuple[int | None, Any]] = {}
    axis = out = 0
    for e in expanded:
        if e is None:
            out += 1
        elif isinstance(e, int):
            where[axis], axis = (None, e), axis + 1
        else:
            where[axis], axis, out = (out, e), axis + 1, out + 1
    h = layout.heads % in_ndim
    if axis != in_ndim:
        raise Refused(f"sqa cannot follow the heads through the indexing {node.name}")
    new_h, sliced = where[h]
    if new_h is None or sliced != slice(None):
        raise Refused(f"sqa cannot carry {node.name}: it indexes the heads")
    new_d = None
    if layout.dim is not None:
        new_d, _ = where[layout.dim % in_ndim]
        if new_d is None:
            raise Refused(f"sqa cannot carry {node.name}: it drops the head dim")
    return _Heads(new_h - out_ndim, None if new_d is None else new_d - out_ndim)


def _symbolic_shape(node: Any) -> tuple | None:
    """Sizes as sympy expressions (a symbolic length stays a symbol), or None."""
    shape = shape_of(node)
    if shape is None:
        return None
    out = []
    for size in shape:
        if isinstance(size, int):
            out.append(sympy.Integer(size))
        elif isinstance(size, torch.SymInt):
            out.append(size.node.expr)
        else:
            return None
    return tuple(out)


def _is_view(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target in ("view", "reshape") or node.target is torch.reshape


def _fix_shape_args(node: fx.Node, args: tuple, layout: _Heads, hq: int, head_dim: int) -> tuple:
    """A view/reshape spells the heads' axis (H, or H·D when merged) as Hq (or Hq·D); -1 stays -1."""
    x, *sizes = args
    packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list))
    if packed:
        sizes = list(sizes[0])
    position = layout.heads % len(sizes)
    size = sizes[position]
    if size != -1:
        if not isinstance(size, int):
            raise ValueError(f"{node.name} computes the head count in the graph")
        sizes[position] = hq if layout.dim is not None else hq * head_dim
    return (x, tuple(sizes)) if packed else (x, *sizes)


def _call(graph: fx.Graph, target, *args) -> fx.Node:
    node = graph.call_function(target, args)
    propagate_meta(node)
    return node


def _grouped_projection(graph: fx.Graph, p: _Projection, heads: int, hq: int, head_dim: int,
                        init: str) -> fx.Node:
    """linear(x, W_Q', b_Q'): q's features only, each group of heads merged (VARIANTS.md §7.4)."""
    group = heads // hq
    weight, bias = p.weight, p.bias
    if p.transposed:  # Conv1D keeps [in, out]
        weight = _call(graph, torch.transpose, weight, 0, 1)
    if p.lo is not None:
        weight = _call(graph, operator.getitem, weight, slice(p.lo, p.hi))
        bias = _call(graph, operator.getitem, bias, slice(p.lo, p.hi)) if bias is not None else None
    new_w = _call(graph, _merge_rows, weight, hq, group, head_dim, init)
    new_b = _call(graph, _merge_rows, bias, hq, group, head_dim, init) if bias is not None else None
    return _call(graph, _LINEAR, p.x, new_w, new_b)


def _merge_rows(w: torch.Tensor, hq: int, group: int, head_dim: int, init: str) -> torch.Tensor:
    """[H·D, ...] -> [Hq·D, ...]: the mean of each group of heads, or its first head."""
    grouped = w.reshape(hq, group, head_dim, *w.shape[1:])
    merged = grouped.mean(dim=1) if init == "mean" else grouped[:, 0]
    return merged.reshape(hq * head_dim, *w.shape[1:])


def _merge_out_columns(w: torch.Tensor, hq: int, group: int, init: str) -> torch.Tensor:
    """W_O [C, H·D] -> [C, Hq·D]: the sum of each group's columns, or the first head's columns."""
    c, hd = w.shape
    grouped = w.reshape(c, hq, group, hd // (hq * group))
    merged = grouped.sum(dim=2) if init == "mean" else grouped[:, :, 0]
    return merged.reshape(c, -1)


def _grouped_out(graph: fx.Graph, out_proj: fx.Node, new_input: fx.Node, heads: int, hq: int, group: int,
                 init: str) -> fx.Node:
    """The output projection on Hq heads: each group's W_O columns summed (mean) or the first head's."""
    if out_proj.target is torch.addmm:  # Conv1D: addmm(bias, x, W [in, out])
        bias, _, weight = out_proj.args
        w_t = _call(graph, torch.transpose, weight, 0, 1)
        merged = _call(graph, _merge_out_columns, w_t, hq, group, init)
        return _call(graph, torch.addmm, bias, new_input, _call(graph, torch.transpose, merged, 0, 1))
    weight = out_proj.args[1]
    bias = out_proj.args[2] if len(out_proj.args) > 2 else out_proj.kwargs.get("bias")
    return _call(graph, _LINEAR, new_input, _call(graph, _merge_out_columns, weight, hq, group, init), bias)


def _regroup_kv(graph: fx.Graph, x: Any, kv_heads: int, hkv: int) -> Any:
    if hkv == kv_heads:
        return x
    if kv_heads % hkv == 0:
        new = graph.call_function(_pool_heads, (x, hkv))
    else:
        new = graph.call_function(torch.repeat_interleave, (x, hkv // kv_heads), {"dim": 1})
    propagate_meta(new)
    return new


def _pool_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, h, t, d = x.shape
    return x.reshape(b, heads, h // heads, t, d).mean(dim=2)


def _headwise(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _HEADWISE_METHODS
    return node.op == "call_function" and node.target in _HEADWISE_FUNCTIONS


def _is_param(node: Any) -> bool:

    return is_parameter_placeholder(node)


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.users)
    return seen


