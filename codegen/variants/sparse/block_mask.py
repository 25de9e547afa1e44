"""A block mask named in a policy ('module:function'): checked, imported and signature-checked."""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any, Callable

from attncc.config import show
from attncc.errors import PolicyError

MASK_REF = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def load_mask(name: str) -> Callable[..., Any]:
    """Import and return the mask_mod(b, h, q_idx, kv_idx) named by `name` ('module:function')."""
    module_name, _, attribute = name.partition(":")
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
    return found


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
