"""Validated configuration records: the base of every variant's config and of the policy's own records.

A config is a frozen dataclass whose fields are type-checked against their annotations on
construction (a small type language: bool, int, float, str, None, Literal, unions), so a bad policy
fails before any compile work, with a PolicyError naming the field. Variants declare their config
next to their op (codegen/variants/<name>/); the policy file format (attncc/policy.py) builds them.
"""

from __future__ import annotations

import difflib
import math
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from functools import cache
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

from attncc.errors import PolicyError

INT_MAX = 2**31 - 1  # integer parameters reach kernels as int32


@contextmanager
def at(prefix: str) -> Iterator[None]:
    """Prefix the field path of any PolicyError raised inside."""
    try:
        yield
    except PolicyError as error:
        raise error.within(prefix) from None


def unknown(noun: str, name: object, valid: list[str], owner: str = "") -> str:
    """The message: unknown <noun> 'x'<owner>; did you mean 'y'? Valid: a, b."""
    message = f"unknown {noun} {name!r}{owner}"
    close = difflib.get_close_matches(name, valid, n=3) if isinstance(name, str) else []
    if close:
        best = next((c for c in close if c.startswith(name) or name.startswith(c)), close[0])
        message += f"; did you mean {best!r}?"
    return message + (" " if close else "; ") + f"Valid: {', '.join(valid) or '(none)'}"


def show(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def is_a(value: object, option: Any) -> bool:
    """isinstance for the small type language of config fields (bools are not numbers)."""
    if get_origin(option) is Literal:
        return any(type(value) is type(choice) and value == choice for choice in get_args(option))
    if option is type(None):
        return value is None
    if option is bool:
        return isinstance(value, bool)
    if option is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if option is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, option)


_TYPE_NAMES = {
    type(None): "null", bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
}


def _describe(option: Any) -> str:
    if get_origin(option) is Literal:
        return "one of " + ", ".join(repr(choice) for choice in get_args(option))
    return _TYPE_NAMES.get(option, option.__name__)


def _check_value(value: object, hint: Any) -> object:
    """Return value if it has the declared type (ints widen to float), else raise PolicyError."""
    options = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    for option in options:
        if is_a(value, option):
            return float(value) if option is float else value
    choices = [choice for option in options if get_origin(option) is Literal for choice in get_args(option)]
    if isinstance(value, str) and choices:
        valid = choices + (["a number"] if float in options else [])
        raise PolicyError(unknown("value", value, valid))
    raise PolicyError(f"expected {' or '.join(map(_describe, options))}, got {show(value)}")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


class Checked:
    """Mixin for frozen dataclasses: type-check every field against its annotation, then `_check`."""

    minimum: ClassVar[dict[str, float]] = {}

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            with at(f.name):
                value = _check_value(getattr(self, f.name), hints[f.name])
                object.__setattr__(self, f.name, value)
                low = self.minimum.get(f.name)
                if low is not None and value is not None and value < low:
                    raise PolicyError(f"must be >= {low}, got {value!r}")
                if is_a(value, int) and value > INT_MAX:
                    raise PolicyError(f"must be <= {INT_MAX} (2**31-1), got {value!r}")
        self._check()

    def _check(self) -> None:
        """Cross-field and range checks beyond `minimum`."""


class VariantConfig(Checked):
    """A variant's parameters as a policy gives them; `variant` is the name a policy file uses."""

    variant: ClassVar[str]

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
