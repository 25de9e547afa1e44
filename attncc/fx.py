"""Small helpers over dynamo FX graphs: example values, module paths, sub-graph evaluation."""

from __future__ import annotations

import operator
import re
from typing import Any, Iterable

import torch
import torch.fx as fx


def meta_value(node: Any) -> Any:
    """The example value dynamo recorded for a node (a FakeTensor, SymInt, ...), or the constant."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def shape_of(node: Any) -> tuple | None:
    value = meta_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def ndim_of(node: Any) -> int | None:
    value = meta_value(node)
    return value.dim() if isinstance(value, torch.Tensor) else None


def dtype_of(node: Any) -> torch.dtype | None:
    value = meta_value(node)
    return value.dtype if isinstance(value, torch.Tensor) else None


def static_int(x: Any) -> int | None:
    """An int for a concrete or hinted symbolic size, else None."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        try:
            return int(x.node.hint) if x.node.hint is not None else None
        except Exception:
            return None
    return None


_PATH_CLEAN = re.compile(r"^[LG]\['[^']+'\](?:\[\d+\])*\.?")  # the traced root: L['self'], L['args'][0], G['model']


def module_stack(node: fx.Node) -> list[tuple[str, type]]:
    """(path, class) of the modules a node was traced inside, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, cls in stack.values():
        path = _PATH_CLEAN.sub("", path)
        path = re.sub(r"\[(\d+)\]", r".\1", path)
        path = re.sub(r"\['([^']+)'\]", r".\1", path).strip(".")
        out.append((path, cls))
    return out


_LEAF_MODULES = ("Dropout", "Softmax", "Linear", "Identity", "Conv1D")


def owning_module(node: fx.Node) -> tuple[str, type | None]:
    """The innermost module around a node that is not a leaf op module (Dropout, Softmax, ...)."""
    for path, cls in reversed(module_stack(node)):
        if not cls.__name__.endswith(_LEAF_MODULES):
            return path, cls
    return "", None


_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_of(path: str) -> int | None:
    """The first integer component of a module path: "model.layers.3.self_attn" -> 3."""
    match = _LAYER.search(path)
    return int(match.group(1)) if match else None


def is_parameter_placeholder(node: Any) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "placeholder"
        and ("_parameters_" in node.name or "_buffers_" in node.name)
    )


def ancestors(nodes: Iterable[fx.Node], stop: set[fx.Node] = frozenset()) -> set[fx.Node]:
    """Every node the given nodes depend on (inclusive), not walking past `stop`."""
    seen: set[fx.Node] = set()
    todo = [n for n in nodes if isinstance(n, fx.Node)]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in stop:
            continue
        todo.extend(node.all_input_nodes)
    return seen


def evaluate(
    outputs: list[fx.Node],
    placeholders: dict[fx.Node, Any],
    seed: dict[fx.Node, Any] | None = None,
) -> list[Any]:
    """Run the nodes needed for `outputs` on concrete values.

    `placeholders` gives real values for graph inputs; `seed` fixes chosen nodes to given values
    (the walk stops there). Raises LookupError when a needed placeholder has no value.
    """
    env: dict[fx.Node, Any] = dict(seed or {})
    needed = ancestors(outputs, stop=set(env))
    graph = outputs[0].graph
    for node in graph.nodes:
        if node not in needed or node in env:
            continue
        if node.op == "placeholder":
            if node not in placeholders:
                raise LookupError(node.name)
            env[node] = placeholders[node]
            continue
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        elif node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        elif node.op == "get_attr":
            target = graph.owning_module
            for part in node.target.split("."):
                target = getattr(target, part)
            env[node] = target
        else:
            raise LookupError(f"cannot evaluate {node.op} {node.target}")
    return [env[n] for n in outputs]


def propagate_meta(node: fx.Node) -> None:
    """Fill a new node's example_value by running it on its inputs' fake values (dynamo's fake mode)."""
    leaves = torch.utils._pytree.tree_leaves([meta_value(n) for n in node.all_input_nodes])
    fake_mode = next((v.fake_mode for v in leaves if getattr(v, "fake_mode", None) is not None), None)
    if fake_mode is None:
        return
    args = fx.node.map_arg(node.args, meta_value)
    kwargs = fx.node.map_arg(node.kwargs, meta_value)
    with fake_mode:
        if node.op == "call_function":
            value = node.target(*args, **kwargs)
        elif node.op == "call_method":
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            return
    node.meta["example_value"] = value


_IN_PLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
                     "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"}
_IN_PLACE_OPERATORS = {getattr(operator, f"__{name[2:-2]}__") for name in _IN_PLACE_DUNDERS}


def has_effect(node: fx.Node) -> bool:
    """Whether removing the node could change what the program does, even when nothing reads its value.

    fx's own `is_impure` misses in-place methods (`x.masked_fill_(...)`), `inplace=True`/`out=` calls and
    dynamo's functorch bookkeeping (`_vmap_increment_nesting`); all of those count here.
    """
    try:
        if node.is_impure():
            return True
    except Exception:  # a purity check that cannot run: assume the worst
        return True
    if node.op == "call_method":
        name = str(node.target)
        return name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.startswith("__"))
    if node.op != "call_function":
        return False
    target = node.target
    if target in _IN_PLACE_OPERATORS or node.kwargs.get("inplace") is True or "out" in node.kwargs:
        return True
    name = getattr(target, "__name__", "")
    module = getattr(target, "__module__", None) or ""
    return (name.endswith("_") and not name.startswith("__")) or module.startswith(("torch._functorch",
                                                                                   "torch._C._functorch"))


def remove_dead(graph: fx.Graph, candidates: Iterable[fx.Node]) -> int:
    """Erase the candidates that nothing reads and that have no effect; returns how many were erased.

    Unlike `graph.eliminate_dead_code()`, nodes outside `candidates` are never touched: a pass passes
    the nodes it created or stopped using (with their inputs, e.g. via `ancestors`, when those may go
    too), so dynamo's side-effecting nodes elsewhere in the graph survive.
    """
    pending = {n for n in candidates if isinstance(n, fx.Node) and n.graph is graph}
    todo = list(pending)
    erased = 0
    while todo:
        node = todo.pop()
        if node not in pending or node.users or has_effect(node):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        pending.discard(node)
        erased += 1
        todo.extend(n for n in inputs if n in pending)
    return erased


def read_nodes(graph: fx.Graph) -> dict[fx.Node, bool]:
    """Whether each node is read by another; give it to `orphaned` after a rewrite."""
    return {node: bool(node.users) for node in graph.nodes}


def orphaned(graph: fx.Graph, before: dict[fx.Node, bool]) -> set[fx.Node]:
    """Candidates for `remove_dead` after a rewrite: the nodes nothing reads that the rewrite created or
    stopped reading, with their inputs. Nodes that nothing read before (dynamo's side-effecting
    `_vmap_increment_nesting`, an unused `x.add_(1)`) are not among them."""
    return ancestors(node for node in graph.nodes if not node.users and before.get(node, True))
