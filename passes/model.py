"""Whole-model facts: the model a graph belongs to, and what only the model knows (its layer count).

A graph is a piece of a model (a graph break cuts it), so facts about the whole model come from the
model itself. The backend receives only the GraphModule, so it learns the model from attncc's own
registry: `attncc.prepare(model)` and `attncc.compile(model, policy)` call `remember(model)`, which maps
each of the model's parameters to the model; a graph's model is the one owning a parameter it reads.
A model that was never registered has no whole-model facts (None).
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn

from attncc.fx import ancestors

from .context import Context

_REGISTERED: Any = torch.utils.weak.WeakIdKeyDictionary()  # parameter -> weakref to its model


def remember(model: nn.Module) -> None:
    """Register `model`: graphs that read its parameters find it (attncc.prepare, attncc.compile)."""
    for p in model.parameters():
        _REGISTERED[p] = weakref.ref(model)


def registered_model(ctx: Context, nodes: Iterable[fx.Node]) -> nn.Module | None:
    """The registered model owning a parameter among `nodes` (placeholders or get_attr), or None."""
    values = ctx.input_values()
    for node in nodes:
        if node.op == "placeholder":
            param = values.get(node)
        elif node.op == "get_attr":
            param = _attribute(ctx.gm, str(node.target))
        else:
            continue
        ref = _REGISTERED.get(param) if isinstance(param, nn.Parameter) else None
        model = ref() if ref is not None else None
        if model is not None:
            return model
    return None


def _attribute(root: Any, target: str) -> Any:
    for name in target.split("."):
        root = getattr(root, name, None)
    return root


def layer_count(ctx: Context, module: str, near: fx.Node) -> int | None:
    """The number of layers of the whole model (not of this graph, which a graph break may cut short):
    the length of the module list that holds the layer of `module` (a path such as layers.3.self_attn),
    read from the registered model that owns the parameters upstream of `near` (or from its submodule
    the path starts at, when a part of the registered model was compiled). None when unknown: no layer
    index in the path, or no registered model (registered_model(ctx, ancestors([near])) is None)."""
    parts = (module or "").split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    if index is None:
        return None
    model = registered_model(ctx, ancestors([near]))
    if model is None:
        return None
    path = ".".join(parts[:index])
    for root in model.modules():  # the model first, then the part that was compiled
        try:
            layers = root.get_submodule(path)
        except AttributeError:
            continue
        return len(layers) if isinstance(layers, (nn.ModuleList, nn.Sequential)) else None
    return None


def cache_window(model: nn.Module, layer: int | None) -> int | None:
    """The number of tokens the model's KV cache keeps for `layer` when it keeps only a window (a
    transformers config with `sliding_window`, per `layer_types` where the config lists them), else None.
    A decode step of such a layer sees only the cached window: its query ends those keys, and never
    attends further back."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None:
        if layer is None or not 0 <= layer < len(types):
            return window if all(t == "sliding_attention" for t in types) else None
        return window if types[layer] == "sliding_attention" else None
    return window
