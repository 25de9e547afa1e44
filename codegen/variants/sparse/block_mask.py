"""A block mask named in a policy ('module:function'): allowed, imported, signature-checked, registered.

A policy is data; naming a function in it must not be a way to run code. attncc imports a mask only
from the modules the user allows (`attncc.backend(policy, mask_modules=["my_pkg.masks"])`, or a
parent package), when the backend is built; the site's op then finds the function in `LOADED` by name.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any, Callable, Iterable

from attncc.config import show
from attncc.errors import PolicyError

MASK_REF = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


LOADED: dict[str, Callable[..., Any]] = {}  # 'module:function' -> the mask_mod, once allowed and loaded


def load_mask(name: str, allowed: Iterable[str]) -> Callable[..., Any]:
    """Import, check and register the mask_mod(b, h, q_idx, kv_idx) named by `name` ('module:function'),
    if its module is one of `allowed` (or inside one of them)."""
    module_name, _, attribute = name.partition(":")
    allowed = list(allowed)
    if not any(module_name == m or module_name.startswith(m + ".") for m in allowed):
        raise PolicyError(
            f"mask {name!r} would import module {module_name!r}, which is not allowed: a policy is data, so attncc "
            f"imports mask code only from modules you name. Allow it with attncc.backend(policy, "
            f"mask_modules=[{module_name!r}]) (attncc.explain(..., mask_modules=...), attncc.compile(model, that "
            f"backend), or `attncc explain --mask-module`). Allowed now: {', '.join(allowed) or '(none)'}", "mask")
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except Exception as error:
        problem = f"cannot load mask {name!r}: {type(error).__name__}: {error}"
        raise PolicyError(problem, "mask") from error
    if not callable(found):
        raise PolicyError(f"mask {name!r} is not callable, got {show(found)}", "mask")
    _check_signature(name, found)
    LOADED[name] = found
    return found


def loaded(name: str) -> Callable[..., Any]:
    """The mask_mod registered under `name` by `load_mask` (when the backend was built)."""
    try:
        return LOADED[name]
    except KeyError:
        raise PolicyError(f"mask {name!r} was not loaded in this process: build the backend with "
                          f"attncc.backend(policy, mask_modules=[...]) allowing its module", "mask") from None


def _check_signature(name: str, mask_mod: Callable[..., Any]) -> None:
    """A mask is called as mask_mod(b, h, q_idx, kv_idx) with index tensors (codegen/masks.py)."""
    try:
        signature = inspect.signature(mask_mod)
    except (TypeError, ValueError):  # a builtin without a signature: it may still be right
        return
    try:
        signature.bind(0, 0, 0, 0)
    except TypeError:
        problem = (f"mask {name!r} must have the signature mask_mod(b, h, q_idx, kv_idx) -> bool tensor "
                   f"(four positional index tensors), but it is {getattr(mask_mod, '__name__', name)}{signature}")
        raise PolicyError(problem, "mask") from None
