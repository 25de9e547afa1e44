"""One spelling per operation, so that patterns need one form per meaning (STYLE.md point 3).

Dynamo graphs hold torch-level calls in every spelling a model author used: `q @ k.mT`,
`torch.einsum("bhqd,bhkd->bhqk", q, k)`, `q.matmul(k.permute(0, 1, 3, 2))`, `x.softmax(-1)`,
`x / 8`, `x.float()`, ... Each rule below maps one family of spellings onto a canonical call:

    matmul      torch.matmul(a, b)
    transpose   torch.transpose(x, -2, -1)        (negative dims, smaller first)
    permute     torch.permute(x, dims)            (a pure swap of the last two dims is a transpose)
    softmax     F.softmax(x, dim=-1, dtype=None)  (negative dim)
    scale       operator.mul(x, c)                (x / c with a Python number c becomes x * (1/c))
    add         operator.add(x, y)
    cast        Tensor.to(x, dtype)               (.float(), .half(), .type_as(y), .to(...))
    dropout     F.dropout(x, p, training)
    masked_fill torch.masked_fill(x, mask, value)
    in place    x *= c, x += y, x /= c become out-of-place when nothing else reads x
    baddbmm     beta * input + alpha * (b1 @ b2) becomes add(mul, mul(matmul))
    identity    same-dtype casts are removed (contiguous() stays: a later .view() may need it)

A rule is a function `(node) -> Canonical | None`; the rules live in one table, RULES.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from attncc.fx import ancestors, dtype_of, meta_value, ndim_of, propagate_meta, remove_dead


@dataclass(frozen=True)
class Canonical:
    target: Callable
    args: tuple
    kwargs: dict
    op: str = "call_function"


def _call(target, *args, **kwargs) -> Canonical:
    return Canonical(target, args, kwargs)


def _neg_dim(dim: int, ndim: int | None) -> int:
    if dim < 0 or ndim is None:
        return dim
    return dim - ndim


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def matmul(node: fx.Node) -> Canonical | None:
    if len(node.args) != 2 or node.kwargs:
        return None
    return _call(torch.matmul, *node.args)


def transpose(node: fx.Node) -> Canonical | None:
    if len(node.args) != 3:
        return None
    x, d0, d1 = node.args
    if not (isinstance(d0, int) and isinstance(d1, int)):
        return None
    nd = ndim_of(x)
    d0, d1 = sorted((_neg_dim(d0, nd), _neg_dim(d1, nd)))
    return _call(torch.transpose, x, d0, d1)


def matrix_transpose(node: fx.Node) -> Canonical | None:
    """`x.mT` (getattr), `x.t()` on a matrix, `x.swapaxes(-1, -2)`."""
    x = node.args[0]
    return _call(torch.transpose, x, -2, -1)


def getattr_mT(node: fx.Node) -> Canonical | None:
    if len(node.args) == 2 and node.args[1] == "mT":
        return matrix_transpose(node)
    return None


def permute(node: fx.Node) -> Canonical | None:
    x, *dims = node.args
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = list(dims[0])
    if "dims" in node.kwargs:
        dims = list(node.kwargs["dims"])
    if not dims or not all(isinstance(d, int) for d in dims):
        return None
    nd = len(dims)
    dims = [d % nd for d in dims]
    swap_last_two = list(range(nd - 2)) + [nd - 1, nd - 2]
    if nd >= 2 and dims == swap_last_two:
        return _call(torch.transpose, x, -2, -1)
    return _call(torch.permute, x, tuple(dims))


def softmax(node: fx.Node) -> Canonical | None:
    args = list(node.args)
    kwargs = dict(node.kwargs)
    x = args.pop(0) if args else kwargs.pop("input", None)
    dim = args.pop(0) if args else kwargs.pop("dim", None)
    if args:  # F.softmax(x, dim, _stacklevel, dtype) is never spelled positionally in practice
        return None
    dtype = kwargs.pop("dtype", None)
    kwargs.pop("_stacklevel", None)
    if kwargs or not isinstance(dim, int):
        return None
    return _call(F.softmax, x, dim=_neg_dim(dim, ndim_of(x)), dtype=dtype)


def _scalar_first(a, b):
    """Put the tensor operand first for commutative ops: only a number moves (`2 * x`), never a tuple
    or string, whose `+` and `*` do not commute (`(1,) + x.shape` is not `x.shape + (1,)`)."""
    if _is_number(a) and isinstance(b, fx.Node):
        return b, a
    return a, b


def mul(node: fx.Node) -> Canonical | None:
    if len(node.args) != 2 or node.kwargs:
        return None
    return _call(operator.mul, *_scalar_first(*node.args))


def add(node: fx.Node) -> Canonical | None:
    if len(node.args) != 2 or node.kwargs:
        return None
    return _call(operator.add, *_scalar_first(*node.args))


def _in_place(rule: Callable[[fx.Node], Canonical | None]) -> Callable[[fx.Node], Canonical | None]:
    """`x *= c` as `x * c` when the mutation cannot be observed and the out-of-place op gives x's dtype
    and shape (`x += y` keeps x's dtype where `x + y` would promote it)."""

    def in_place(node: fx.Node) -> Canonical | None:
        if len(node.args) != 2 or node.kwargs:
            return None
        x, other = node.args
        if not isinstance(x, fx.Node) or len(x.users) != 1 or x.op in ("placeholder", "get_attr"):
            return None
        value = meta_value(x)
        if isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(value, bool):
            return rule(node)
        if not isinstance(value, torch.Tensor) or not _same_result(value, meta_value(other)):
            return None
        if not _mutation_unobservable(node, x):
            return None
        return rule(node)

    in_place.__name__ = f"in_place_{rule.__name__}"
    return in_place


def _same_result(x: torch.Tensor, other: Any) -> bool:
    """`x op other` out of place has x's dtype and shape."""
    if not isinstance(other, (torch.Tensor, int, float, bool)):
        return False
    try:
        if torch.result_type(x, other) != x.dtype:
            return False
        if not isinstance(other, torch.Tensor):
            return True
        return tuple(torch.broadcast_shapes(x.shape, other.shape)) == tuple(x.shape)
    except Exception:
        return False


def _mutation_unobservable(node: fx.Node, x: fx.Node) -> bool:
    """No node other than `node`'s own result and what derives from it reads the memory that `node` mutates.

    Aliases are found through dynamo's fake tensors, which share storage exactly as the real ones would
    (a view, an in-place op's result). An alias that is a graph input or attribute, or that something
    other than another alias reads, makes the mutation visible.
    """
    from torch.multiprocessing.reductions import StorageWeakRef

    def storage(value):
        try:
            return StorageWeakRef(value.untyped_storage())
        except Exception:
            return None

    mutated = storage(meta_value(x))
    if mutated is None:
        return False
    downstream = _descendants(node)
    aliases = set()
    for other in node.graph.nodes:
        value = meta_value(other)
        if other in downstream or not isinstance(value, torch.Tensor):
            continue
        ref = storage(value)
        if ref is None or ref == mutated:
            aliases.add(other)
    return all(a.op not in ("placeholder", "get_attr") and set(a.users) <= aliases | {node} for a in aliases)


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.users)
    return seen


def baddbmm(node: fx.Node) -> Canonical | None:
    """beta * input + alpha * (batch1 @ batch2) (BLOOM's ALiBi scores), expanded by the pass.

    With beta == 0 torch ignores `input` (its NaN and inf do not propagate; GPT-2's
    reorder_and_upcast_attn passes `torch.empty` there): the expansion then does not read it."""
    names = ("input", "batch1", "batch2")
    args = dict(zip(names, node.args))
    args.update({k: v for k, v in node.kwargs.items() if k in names})
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    if set(args) != set(names) or set(node.kwargs) - set(names) - {"beta", "alpha"} or len(node.args) > 3:
        return None
    if not (_is_number(beta) and _is_number(alpha)):
        return None
    return Canonical("baddbmm", (args["input"], args["batch1"], args["batch2"], beta, alpha), {})


def div(node: fx.Node) -> Canonical | None:
    if len(node.args) != 2 or node.kwargs:
        return None
    x, c = node.args
    if isinstance(x, fx.Node) and _exact_reciprocal(c):
        return _call(operator.mul, x, 1.0 / c)
    if isinstance(x, fx.Node):
        return _call(operator.truediv, x, c)
    return None


_FLOAT32 = torch.finfo(torch.float32)


def _exact_reciprocal(c: Any) -> bool:
    """x / c equals x * (1/c) up to rounding: c and 1/c are normal float32 numbers (so neither the
    reciprocal nor c itself rounds to 0 or inf in the tensor's compute type: 0 / 1e-320 is 0, 0 * inf NaN)."""
    if not _is_number(c) or c == 0:
        return False
    try:
        return all(_FLOAT32.tiny <= abs(v) <= _FLOAT32.max for v in (float(c), 1.0 / c))
    except OverflowError:  # an int too large for a float
        return False


def _plain_cast_options(node: fx.Node) -> bool:
    """No copy=True, no memory format other than the default, no positional flags."""
    rest, kwargs = node.args[1:], node.kwargs
    if set(kwargs) - {"dtype", "device", "non_blocking", "copy", "memory_format"} or kwargs.get("copy"):
        return False
    if kwargs.get("memory_format", torch.preserve_format) is not torch.preserve_format:
        return False
    return not any(isinstance(a, (bool, torch.memory_format)) for a in rest)


def cast(node: fx.Node) -> Canonical | None:
    """Casts that change only the dtype become `to(x, dtype)`; others are left alone.

    A cast that asks for a copy (`copy=True`) or a memory format is not only a dtype change: dropping it
    later (when it keeps the dtype) would alias or re-stride the result."""
    x = node.args[0]
    if not _plain_cast_options(node):
        return None
    out, src = dtype_of(node), dtype_of(x)
    if out is None or src is None:
        return None
    value, inp = meta_value(node), meta_value(x)
    if getattr(value, "device", None) != getattr(inp, "device", None):
        return None
    return Canonical("to", (x, out), {}, op="call_method")


def dropout(node: fx.Node) -> Canonical | None:
    args = list(node.args)
    kwargs = dict(node.kwargs)
    x = args.pop(0)
    p = args.pop(0) if args else kwargs.pop("p", 0.5)
    training = args.pop(0) if args else kwargs.pop("training", True)
    inplace = args.pop(0) if args else kwargs.pop("inplace", False)
    if args or kwargs or inplace:
        return None
    return _call(F.dropout, x, p, training)


def masked_fill(node: fx.Node) -> Canonical | None:
    if len(node.args) != 3 or node.kwargs:
        return None
    return _call(torch.masked_fill, *node.args)


def method_where(node: fx.Node) -> Canonical | None:
    """`x.where(cond, y)` is `torch.where(cond, x, y)`."""
    if len(node.args) != 3 or node.kwargs:
        return None
    x, cond, y = node.args
    return _call(torch.where, cond, x, y)


def einsum(node: fx.Node) -> Canonical | None:
    """Two-operand einsums that are a batched matmul, e.g. "bhqd,bhkd->bhqk" or "...id,...jd->...ij".

    Rewritten as matmul of (possibly transposed) operands; the transposes are inserted by the pass.
    """
    if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
        equation, operands = node.args[0], tuple(node.args[1])
    else:
        equation, operands = node.args[0], tuple(node.args[1:])
    if node.kwargs or len(operands) != 2 or not isinstance(equation, str):
        return None
    plan = einsum_as_matmul(equation)
    if plan is None:
        return None
    return Canonical("einsum_matmul", (plan, *operands), {})


def einsum_as_matmul(equation: str) -> tuple[bool, bool] | None:
    """(transpose_a, transpose_b) such that einsum == matmul(a', b'), or None."""
    equation = equation.replace(" ", "").replace("...", "*")
    if "->" not in equation:
        return None
    lhs, out = equation.split("->")
    parts = lhs.split(",")
    if len(parts) != 2:
        return None
    a, b = parts
    if len(a) < 2 or len(b) < 2 or len(out) < 2 or a[:-2] != b[:-2] or out[:-2] != a[:-2]:
        return None
    if len(set(a)) != len(a) or len(set(b)) != len(b):
        return None
    batch = set(a[:-2])
    a2, b2, (i, j) = a[-2:], b[-2:], out[-2:]
    shared = (set(a2) & set(b2)) - batch
    if len(shared) != 1:
        return None
    (c,) = shared
    if set(a2) != {i, c} or set(b2) != {j, c} or i == j:
        return None
    return (a2 != i + c, b2 != c + j)


_METHOD_RULES: dict[str, Callable[[fx.Node], Canonical | None]] = {
    "matmul": matmul,
    "bmm": matmul,
    "__matmul__": matmul,
    "transpose": transpose,
    "swapaxes": transpose,
    "swapdims": transpose,
    "permute": permute,
    "softmax": softmax,
    "mul": mul,
    "__mul__": mul,
    "add": add,
    "__add__": add,
    "div": div,
    "__truediv__": div,
    "float": cast,
    "half": cast,
    "bfloat16": cast,
    "double": cast,
    "type_as": cast,
    "to": cast,
    "type": cast,
    "dropout": dropout,
    "masked_fill": masked_fill,
    "where": method_where,
    "baddbmm": baddbmm,
    "__imul__": _in_place(mul),
    "__iadd__": _in_place(add),
    "__itruediv__": _in_place(div),
}

_FUNCTION_RULES: dict[Any, Callable[[fx.Node], Canonical | None]] = {
    operator.imul: _in_place(mul),
    operator.iadd: _in_place(add),
    operator.itruediv: _in_place(div),
    torch.baddbmm: baddbmm,
    operator.matmul: matmul,
    torch.bmm: matmul,
    torch.transpose: transpose,
    torch.swapaxes: transpose,
    torch.permute: permute,
    torch.softmax: softmax,
    torch.nn.functional.softmax: softmax,
    operator.mul: mul,
    torch.mul: mul,
    operator.add: add,
    torch.add: add,
    operator.truediv: div,
    torch.div: div,
    torch.true_divide: div,
    torch.dropout: dropout,
    F.dropout: dropout,
    torch.masked_fill: masked_fill,
    torch.einsum: einsum,
    getattr: getattr_mT,
}



def _rule_for(node: fx.Node):
    if node.op == "call_method":
        if node.target == "t" and ndim_of(node.args[0]) == 2:
            return matrix_transpose
        return _METHOD_RULES.get(node.target)
    if node.op == "call_function":
        try:
            return _FUNCTION_RULES.get(node.target)
        except TypeError:  # unhashable target
            return None
    return None


def _is_identity(node: fx.Node) -> bool:
    """A canonical same-dtype cast (`to(x, dtype)` without options: a copy=True cast is not an identity)."""
    if node.op == "call_method" and node.target == "to" and len(node.args) == 2 and not node.kwargs:
        src, dst = meta_value(node.args[0]), meta_value(node)
        return (
            isinstance(src, torch.Tensor)
            and isinstance(dst, torch.Tensor)
            and src.dtype == dst.dtype
            and src.device == dst.device
        )
    return False


def canonicalize(gm: fx.GraphModule) -> dict[str, int]:
    """Rewrite every node into its canonical spelling in place. Returns hit counts per rule."""
    hits: dict[str, int] = {}
    graph = gm.graph
    # values the model computed and never read (`kt = k.mT` beside an einsum) would count as extra readers
    # of the tensors patterns follow; only nodes without an effect go (dynamo's vmap bookkeeping stays)
    if removed := remove_dead(graph, list(graph.nodes)):
        hits["unread"] = removed
    unread: list[fx.Node] = []  # inputs a rewrite no longer reads (baddbmm's input at beta == 0)
    for node in list(graph.nodes):
        rule = _rule_for(node)
        if rule is None:
            continue
        canon = rule(node)
        if canon is None:
            continue
        if canon.target == "einsum_matmul":
            _replace_einsum(graph, node, *canon.args)
        elif canon.target == "baddbmm":
            unread.extend(_replace_baddbmm(graph, node, *canon.args))
        else:
            node.op, node.target = canon.op, canon.target
            node.args, node.kwargs = canon.args, canon.kwargs
        hits[rule.__name__] = hits.get(rule.__name__, 0) + 1
    for node in list(graph.nodes):
        if _is_identity(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            hits["identity"] = hits.get("identity", 0) + 1
    remove_dead(graph, ancestors(unread))
    graph.lint()
    return hits


def _replace_einsum(graph: fx.Graph, node: fx.Node, plan, a, b) -> None:
    transpose_a, transpose_b = plan
    with graph.inserting_before(node):
        if transpose_a:
            a = _transposed(graph, a)
        if transpose_b:
            b = _transposed(graph, b)
    node.target, node.args, node.kwargs = torch.matmul, (a, b), {}


def _replace_baddbmm(graph: fx.Graph, node: fx.Node, bias, a, b, beta, alpha) -> list[fx.Node]:
    """Expand in place; returns the inputs the expansion no longer reads."""
    if beta == 0:
        node.op, node.kwargs = "call_function", {}
        if alpha == 1:
            node.target, node.args = torch.matmul, (a, b)
        else:
            with graph.inserting_before(node):
                product = _derived(graph, torch.matmul, (a, b), like=node)
            node.target, node.args = operator.mul, (product, float(alpha))
        return [bias] if isinstance(bias, fx.Node) else []
    with graph.inserting_before(node):
        product = _derived(graph, torch.matmul, (a, b), like=node)
        if alpha != 1:
            product = _derived(graph, operator.mul, (product, float(alpha)), like=node)
        if beta != 1:
            bias = _derived(graph, operator.mul, (bias, float(beta)), like=node)
    node.op, node.target, node.args, node.kwargs = "call_function", operator.add, (product, bias), {}
    return []


def _derived(graph: fx.Graph, target, args, like: fx.Node) -> fx.Node:
    new = graph.call_function(target, args)
    new.meta["nn_module_stack"] = like.meta.get("nn_module_stack", {})
    propagate_meta(new)
    return new


def _transposed(graph: fx.Graph, x: fx.Node) -> fx.Node:
    t = graph.call_function(torch.transpose, (x, -2, -1))
    value = meta_value(x)
    if isinstance(value, torch.Tensor):
        t.meta["example_value"] = value.transpose(-2, -1)
    t.meta["nn_module_stack"] = x.meta.get("nn_module_stack", {})
    return t
