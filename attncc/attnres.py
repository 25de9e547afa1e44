"""AttnRes parameters in the user's model: created in one public place, before or at the first compile.

    attncc.prepare(model, policy, example_args)   # create them now (an optimizer built next sees them)
    attncc.parameters(model)                      # the ones attncc registered
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attncc.compiler import Backend
from attncc.errors import AttnccError
from attncc.passes.model import remember
from attncc.passes.residual import ATTRIBUTE


def parameters(model: nn.Module) -> list[nn.Parameter]:
    """The AttnRes parameters attncc registered on `model` (empty before the first AttnRes compile)."""
    model = getattr(model, "_orig_mod", model)
    container = model._modules.get(ATTRIBUTE)
    return list(container.parameters()) if container is not None else []


def prepare(model: nn.Module, policy: Any = None, example_args: Any = None,
            example_kwargs: dict | None = None) -> nn.Module:
    """Make `model` known to attncc's backend and, given example inputs, create its AttnRes parameters now.

    Without example inputs the parameters appear on the first compiled call; with them, one eager
    trace of the model (a forward pass) creates them here, so that an optimizer built afterwards and
    `model.load_state_dict` see them. Returns `model`.
    """
    model = getattr(model, "_orig_mod", model)
    remember(model)
    if example_args is None:
        return model
    be = Backend(policy, inner="eager")
    if be.policy.residual.variant == "keep":
        return model
    if not isinstance(example_args, (tuple, list)):
        example_args = (example_args,)
    torch.compile(model, backend=be)(*example_args, **(example_kwargs or {}))
    if not parameters(model):
        name = type(model).__name__
        raise AttnccError(f"attncc.prepare found no residual stream to rewrite in {name}:\n{be.report}")
    return model
