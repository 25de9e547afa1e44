"""Whole-model facts: the model a graph belongs to, and what only the model knows (its layer count).

A graph is a piece of a model (a graph break cuts it), so facts about the whole model come from the
model itself: from the module dynamo is compiling (walked from the frame's root along a parameter's
dynamo source), or from a model registered with `attncc.prepare`.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn

from attncc.errors import AttnccError
from attncc.fx import ancestors

from .context import Context

log = logging.getLogger("attncc")

_PREPARED: Any = torch.utils.weak.WeakIdKeyDictionary()  # parameter -> weakref to its model


def remember(model: nn.Module) -> None:
    """Register `model` so that graphs of its parameters find it without dynamo's frame (attncc.prepare)."""
    for p in model.parameters():
        _PREPARED[p] = weakref.ref(model)


def find_model(ctx: Context, params: list[fx.Node]) -> tuple[nn.Module, Any, torch.Tensor]:
    """(the model owning the stream's parameters, the dynamo source it was reached by, one parameter)."""
    found = owner(ctx, params)
    if found is None:
        raise AttnccError(
            "attncc could not find the model that owns this graph's parameters, so it has nowhere to register "
            "the AttnRes parameters. Call attncc.prepare(model) before compiling (with example inputs, "
            "attncc.prepare(model, policy, example_args) also creates the parameters up front)."
        )
    return found


def owner(ctx: Context, nodes: Iterable[fx.Node]) -> tuple[nn.Module, Any, torch.Tensor] | None:
    """(model, dynamo source or None, parameter) for the first parameter placeholder among `nodes` whose
    model is found: from dynamo's frame, else from the models `attncc.prepare` registered."""
    values = ctx.input_values()
    real = []
    for node in nodes:
        if node.op != "placeholder":
            continue
        param = values.get(node)
        if not isinstance(param, nn.Parameter):
            param = getattr(node.meta.get("grapharg"), "example", None)
        if isinstance(param, nn.Parameter):
            real.append((node, param))
    for node, param in real:
        found = model_from_dynamo(node, param)
        if found is not None:
            return found[0], found[1], param
    for node, param in real:
        ref = _PREPARED.get(param)
        model = ref() if ref is not None else None
        if model is not None:
            return model, None, param
    return None


def model_from_dynamo(node: fx.Node, param: nn.Parameter) -> tuple[nn.Module, Any] | None:
    """Walk the placeholder's dynamo source from its root local/global to the first module owning `param`."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:
        return None
    if source is None or tx is None:
        return None
    tx = getattr(getattr(tx, "output", None), "root_tx", None) or tx
    chain = []
    while source is not None:
        chain.append(source)
        source = getattr(source, "base", None)
    chain.reverse()
    try:
        value = _root_value(chain[0], tx)
        for src in chain:
            if src is not chain[0]:
                value = _step(src, value)
            if isinstance(value, nn.Module):
                owns = any(p is param for p in value.parameters())
                return (value, src) if owns else None
    except Exception as error:
        log.debug("attncc: could not evaluate the source of %s: %s", node.name, error)
    return None


def _root_value(source: Any, tx: Any) -> Any:
    if hasattr(source, "local_name"):
        return tx.f_locals[source.local_name]
    if hasattr(source, "global_name"):
        return tx.f_globals[source.global_name]
    raise LookupError(f"unknown root source {type(source).__name__}")


def _step(source: Any, value: Any) -> Any:
    if hasattr(source, "member"):
        return getattr(value, source.member)
    if hasattr(source, "index"):
        if not isinstance(source.index, (int, str)):
            raise LookupError(f"index {source.index!r}")
        return value[source.index]
    if "NNModule" in type(source).__name__:
        return value
    raise LookupError(f"unknown source {type(source).__name__}")


def layer_count(ctx: Context, module: str, near: fx.Node) -> int | None:
    """The number of layers of the whole model (not of this graph, which a graph break may cut short):
    the length of the module list that holds the layer of `module` (a path such as layers.3.self_attn),
    read from the model that owns the parameters upstream of `near`. None when unknown."""
    parts = (module or "").split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    if index is None:
        return None
    found = owner(ctx, ancestors([near]))
    if found is None:
        return None
    try:
        layers = found[0].get_submodule(".".join(parts[:index]))
    except AttributeError:
        return None
    return len(layers) if isinstance(layers, (nn.ModuleList, nn.Sequential)) else None
