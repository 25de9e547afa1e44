"""Residual-stream patterns, matched on the canonical graph (see attncc.passes.canonicalize).

Two patterns, one per meaning. `sublayer` is any computation that holds an attention site or a
linear layer (an MLP), and `norm` is a LayerNorm or an RMSNorm:

    def prenorm_residual(h, sublayer, norm):     # GPT-2, Llama, Mistral, Qwen2, ViT
        return h + sublayer(norm(h))

    def postnorm_residual(h, sublayer, norm):    # BERT
        return norm(h + sublayer(h))

Because the sublayer is arbitrary, a residual add is matched by meaning rather than by tracing
these functions: an `operator.add` of two same-shaped tensors where one operand (the stream h)
is an ancestor of the other (the branch), the nodes between them hold attention or a linear
layer, and either every node of the branch that reads h is a norm (pre-norm) or the add's only
reader is a norm (post-norm). An add of that shape with no norm on either side is a near-miss:
`match_residual` raises NoMatch with the reason, so explain() can say why it was not taken.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from attncc.fx import is_parameter_placeholder, meta_value, module_stack, owning_module, static_int


def prenorm_residual(h, sublayer, norm):
    """The sublayer reads the stream only through a norm; the stream itself is never normalized."""
    return h + sublayer(norm(h))


def postnorm_residual(h, sublayer, norm):
    """The norm follows the add, so the stream is the norm's output."""
    return norm(h + sublayer(h))


class NoMatch(Exception):
    """An add looked like a residual add but is not one that attncc can use; the message says why."""


@dataclass
class ResidualMatch:
    pattern: str  # prenorm_residual | postnorm_residual
    add: fx.Node
    stream: fx.Node  # h: the stream value the sublayer reads
    stream_index: int  # which operand of the add is h; the other one is the branch f(...)
    output: fx.Node  # the stream after this sublayer: the add (pre-norm) or its norm (post-norm)
    sublayer: str  # attention | mlp
    norm: str  # rmsnorm | layernorm
    norm_eps: float | None
    module: str  # the sublayer's module path, e.g. "layers.3.self_attn"
    params: list[fx.Node] = field(default_factory=list)  # parameter placeholders the branch reads

    @property
    def branch(self) -> fx.Node:
        """The add's other operand, read afresh (an attention rewrite may have replaced it)."""
        return self.add.args[1 - self.stream_index]


_NORM_FUNCTIONS: dict[Callable, str] = {F.layer_norm: "layernorm", torch.layer_norm: "layernorm"}
for _fn in (getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None)):
    if _fn is not None:
        _NORM_FUNCTIONS[_fn] = "rmsnorm"

_LINEARS = {
    torch._C._nn.linear, F.linear, torch.addmm, torch.matmul, torch.mm, torch.bmm, torch.baddbmm,
    operator.matmul, torch.einsum,
}


def norm_kind(node: fx.Node) -> str | None:
    """"rmsnorm" or "layernorm" for a node that is a norm call or lies inside a norm module, else None."""
    if node.op == "call_function" and node.target in _NORM_FUNCTIONS:
        return _NORM_FUNCTIONS[node.target]
    path = _norm_module(node)
    if path is None:
        return None
    name = module_stack(node)[-1][1].__name__.lower()
    return "rmsnorm" if "rms" in name else "layernorm"


def _norm_module(node: fx.Node) -> str | None:
    """The path of the innermost module around a node when that module is a norm."""
    stack = module_stack(node) if node.op in ("call_function", "call_method") else []
    if not stack:
        return None
    path, cls = stack[-1]
    name = cls.__name__.lower()
    return path if "layernorm" in name or "rmsnorm" in name else None


def norm_region(entry: fx.Node) -> set[fx.Node]:
    """The nodes of the norm a node belongs to, from that node on (an RMSNorm arrives as pow/mean/rsqrt/mul)."""
    path = _norm_module(entry)
    region, todo = {entry}, [entry]
    while todo and path is not None:
        for user in todo.pop().users:
            if user not in region and _norm_module(user) == path:
                region.add(user)
                todo.append(user)
    return region


def norm_output(entry: fx.Node, order: dict[fx.Node, int]) -> fx.Node:
    """The node a norm returns, given a node inside it."""
    region = norm_region(entry)
    exits = [n for n in region if not n.users or any(u not in region for u in n.users)]
    return max(exits, key=lambda n: order.get(n, -1))


def norm_eps(entry: fx.Node) -> float | None:
    """The eps of the norm a node belongs to: the call's eps, or the constant added to the variance."""
    if entry.op == "call_function" and entry.target in _NORM_FUNCTIONS:
        index = 4 if _NORM_FUNCTIONS[entry.target] == "layernorm" else 3
        eps = entry.kwargs.get("eps", entry.args[index] if len(entry.args) > index else None)
        if eps is None and _NORM_FUNCTIONS[entry.target] == "layernorm":
            eps = 1e-5
        return float(eps) if isinstance(eps, (int, float)) else None
    for node in norm_region(entry):
        if node.op == "call_function" and node.target is operator.add:
            constants = [a for a in node.args if isinstance(a, float)]
            if constants:
                return constants[0]
    return None


def is_linear(node: fx.Node) -> bool:
    """A matmul-like call that reads a parameter (directly or through a view of it)."""
    if node.op != "call_function" or node.target not in _LINEARS:
        return False
    return any(_reads_parameter(arg) for arg in node.all_input_nodes)


def _reads_parameter(node: fx.Node, hops: int = 2) -> bool:
    if is_parameter_placeholder(node):
        return True
    inputs = node.all_input_nodes
    if hops == 0 or node.op not in ("call_function", "call_method") or len(inputs) != 1:
        return False
    return _reads_parameter(inputs[0], hops - 1)


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = meta_value(a), meta_value(b)
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
        return False
    if not (va.is_floating_point() and vb.is_floating_point()) or va.dim() != vb.dim() or va.dim() < 2:
        return False
    dims = [(static_int(x), static_int(y)) for x, y in zip(va.shape, vb.shape)]
    return all(x is not None and x == y for x, y in dims)


def between(h: fx.Node, y: fx.Node, order: dict[fx.Node, int]) -> set[fx.Node] | None:
    """The nodes on paths from h to y (y included, h not), or None when y does not depend on h."""
    low = order[h]
    seen: set[fx.Node] = set()
    todo = [y]
    while todo:
        node = todo.pop()
        if node in seen or order.get(node, -1) <= low:
            continue
        seen.add(node)
        todo.extend(node.all_input_nodes)
    inside: set[fx.Node] = set()
    for node in sorted(seen, key=order.__getitem__):
        if any(arg is h or arg in inside for arg in node.all_input_nodes):
            inside.add(node)
    return inside if y in inside else None


def is_plain_add(node: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target is operator.add
        and len(node.args) == 2
        and not node.kwargs
        and all(isinstance(a, fx.Node) for a in node.args)
    )


def match_residual(
    add: fx.Node, order: dict[fx.Node, int], is_attention: Callable[[fx.Node], bool]
) -> ResidualMatch | None:
    """The residual add `add`, or None when it is no add of a stream and its branch.

    Raises NoMatch for an add of h and f(h) with attention or a linear layer in f that is neither
    pre-norm nor post-norm (e.g. `x + layer(x)` with no norm).
    """
    if not is_plain_add(add) or not _same_shape(*add.args) or not _same_shape(add, add.args[0]):
        return None
    for stream_index in (0, 1):
        h, y = add.args[stream_index], add.args[1 - stream_index]
        inside = between(h, y, order)
        if inside is not None:
            break
    else:
        return None
    attention = [n for n in inside if is_attention(n)]
    linears = [n for n in inside if is_linear(n)]
    if not attention and not linears:
        return None
    sublayer = "attention" if attention else "mlp"

    readers = [u for u in h.users if u in inside]  # the branch's first nodes
    after = list(add.users)
    if readers and all(norm_kind(u) for u in readers):
        pattern, entry, output = "prenorm_residual", readers[0], add
    elif after and all(norm_kind(u) for u in after) and len({norm_output(u, order) for u in after}) == 1:
        pattern, entry = "postnorm_residual", after[0]
        output = norm_output(entry, order)
    else:
        raise NoMatch(f"{sublayer} sublayer reads the stream without a norm and no norm follows the add")

    params = [p for n in inside for p in n.all_input_nodes if is_parameter_placeholder(p)]
    return ResidualMatch(
        pattern=pattern,
        add=add,
        stream=h,
        stream_index=stream_index,
        output=output,
        sublayer=sublayer,
        norm=norm_kind(entry),
        norm_eps=norm_eps(entry),
        module=_sublayer_module(attention + linears, add),
        params=sorted(set(params), key=order.__getitem__),
    )


def _sublayer_module(nodes: list[fx.Node], add: fx.Node) -> str:
    """The deepest module holding all of a sublayer's attention and linear nodes."""
    paths = [owning_module(n)[0].split(".") for n in nodes]
    common: list[str] = []
    for parts in zip(*paths):
        if any(p != parts[0] for p in parts):
            break
        common.append(parts[0])
    return ".".join(common) or owning_module(add)[0]
