"""Rewrite policies: typed, versioned, frozen data saying which variant each attention site gets.

A policy is loaded from a YAML/YML/TOML/JSON file or a dict (see ``attncc/policies/`` for examples)
and validated on construction, so a bad policy fails before any compile work. Rules are tried in
order and the first match wins; sites no rule matches get ``attention.default``.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
import json
import math
import os
import re
import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from attncc.errors import PolicyError

SUPPORTED_VERSIONS = (1,)
INT_MAX = 2**31 - 1  # integer parameters reach kernels as int32


@contextmanager
def _at(prefix: str) -> Iterator[None]:
    """Prefix the field path of any PolicyError raised inside."""
    try:
        yield
    except PolicyError as error:
        raise error.within(prefix) from None


def _unknown(noun: str, name: object, valid: list[str], owner: str = "") -> str:
    """The message: unknown <noun> 'x'<owner>; did you mean 'y'? Valid: a, b."""
    message = f"unknown {noun} {name!r}{owner}"
    close = difflib.get_close_matches(name, valid, n=3) if isinstance(name, str) else []
    if close:
        best = next((c for c in close if c.startswith(name) or name.startswith(c)), close[0])
        message += f"; did you mean {best!r}?"
    return message + (" " if close else "; ") + f"Valid: {', '.join(valid) or '(none)'}"


def _show(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def _is(value: object, option: Any) -> bool:
    """isinstance for the small type language of policy fields (bools are not numbers)."""
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
        if _is(value, option):
            return float(value) if option is float else value
    choices = [choice for option in options if get_origin(option) is Literal for choice in get_args(option)]
    if isinstance(value, str) and choices:
        valid = choices + (["a number"] if float in options else [])
        raise PolicyError(_unknown("value", value, valid))
    raise PolicyError(f"expected {' or '.join(map(_describe, options))}, got {_show(value)}")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


class _Checked:
    """Mixin: type-check every field against its annotation, then the class's own `_check`."""

    minimum: ClassVar[dict[str, float]] = {}

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            with _at(f.name):
                value = _check_value(getattr(self, f.name), hints[f.name])
                object.__setattr__(self, f.name, value)
                low = self.minimum.get(f.name)
                if low is not None and value is not None and value < low:
                    raise PolicyError(f"must be >= {low}, got {value!r}")
                if _is(value, int) and value > INT_MAX:
                    raise PolicyError(f"must be <= {INT_MAX} (2**31-1), got {value!r}")
        self._check()

    def _check(self) -> None:
        """Cross-field and range checks beyond `minimum`."""


class _Variant(_Checked):
    variant: ClassVar[str]

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class Keep(_Variant):
    """Leave the site as the model wrote it."""

    variant: ClassVar[str] = "keep"


@dataclass(frozen=True)
class Softmax(_Variant):
    """attncc's own softmax attention op (same math as the original)."""

    variant: ClassVar[str] = "softmax"


@dataclass(frozen=True)
class Linear(_Variant):
    """Kernelized linear attention (Katharopoulos; Based's taylor2; Lightning decay). VARIANTS.md §2-4."""

    variant: ClassVar[str] = "linear"
    minimum: ClassVar[dict[str, float]] = {"eps": 0}
    feature_map: Literal["elu1", "relu", "identity", "taylor2"] = "elu1"
    normalize: bool = True
    decay: Literal["none", "lightning"] | float = "none"
    eps: float = 1e-6

    def _check(self) -> None:
        if isinstance(self.decay, float) and not 0 < self.decay <= 1:
            raise PolicyError(f"a fixed decay must be in (0, 1], got {self.decay!r}", "decay")


_MASK_REF = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclass(frozen=True)
class Sparse(_Variant):
    """Sparse softmax attention: sliding window + sinks, PowerAttention, or a block mask. VARIANTS.md §8."""

    variant: ClassVar[str] = "sparse"
    minimum: ClassVar[dict[str, float]] = {"window": 1, "sinks": 0, "block": 1, "window_blocks": 1}
    pattern: Literal["sliding_window", "power", "block"] = "sliding_window"
    window: int = 1024
    sinks: int = 0
    block: int = 128
    window_blocks: int = 5
    mask: str | None = None

    def _check(self) -> None:
        if self.pattern == "block" and self.mask is None:
            raise PolicyError("pattern 'block' requires a mask ('module:function' naming a mask_mod)", "mask")
        if self.pattern != "block" and self.mask is not None:
            raise PolicyError(f"only pattern 'block' takes a mask, not pattern {self.pattern!r}", "mask")
        if self.mask is not None and not _MASK_REF.fullmatch(self.mask):
            raise PolicyError(f"expected 'module:function', got {self.mask!r}", "mask")

    def load_mask(self) -> Callable[..., Any]:
        """Import and return the mask_mod(b, h, q_idx, kv_idx) named by `mask`."""
        if self.mask is None:
            raise PolicyError(f"pattern {self.pattern!r} has no mask to load", "mask")
        module_name, _, attribute = self.mask.partition(":")
        try:
            found: Any = importlib.import_module(module_name)
            for part in attribute.split("."):
                found = getattr(found, part)
        except Exception as error:
            problem = f"cannot load mask {self.mask!r}: {type(error).__name__}: {error}"
            raise PolicyError(problem, "mask") from error
        if not callable(found):
            raise PolicyError(f"mask {self.mask!r} is not callable, got {_show(found)}", "mask")
        _check_mask_signature(self.mask, found)
        return found


def _check_mask_signature(name: str, mask_mod: Callable[..., Any]) -> None:
    """A mask is called as mask_mod(b, h, q_idx, kv_idx) with index tensors (codegen/reference/masks.py)."""
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


@dataclass(frozen=True)
class Softplus(_Variant):
    """LSSA / LSSAR softplus attention with re-weighting power p (0 = LSSA only). VARIANTS.md §5."""

    variant: ClassVar[str] = "softplus"
    minimum: ClassVar[dict[str, float]] = {"reweight_p": 0}
    reweight_p: float = 15.0


@dataclass(frozen=True)
class Mala(_Variant):
    """Magnitude-aware linear attention; sim_scale None = the official 1/(sqrt(D)*N). VARIANTS.md §6."""

    variant: ClassVar[str] = "mala"
    sim_scale: float | None = None

    def _check(self) -> None:
        if self.sim_scale is not None and self.sim_scale <= 0:
            raise PolicyError(f"must be > 0, got {self.sim_scale!r}", "sim_scale")


@dataclass(frozen=True)
class SQA(_Variant):
    """Sparse query attention: fewer query heads (None = half the site's heads). VARIANTS.md §7."""

    variant: ClassVar[str] = "sqa"
    minimum: ClassVar[dict[str, float]] = {"query_heads": 1, "kv_heads": 1}
    query_heads: int | None = None
    kv_heads: int | None = None
    init: Literal["mean", "select"] = "mean"


@dataclass(frozen=True)
class ResidualKeep(_Variant):
    """Leave the residual adds as they are."""

    variant: ClassVar[str] = "keep"


@dataclass(frozen=True)
class AttnRes(_Variant):
    """Attention residuals over depth; block_size sublayers per block (1 = Full AttnRes). VARIANTS.md §9."""

    variant: ClassVar[str] = "attnres"
    minimum: ClassVar[dict[str, float]] = {"block_size": 1}
    block_size: int = 1


AttentionVariant = Union[Keep, Softmax, Linear, Sparse, Softplus, Mala, SQA]
ResidualVariant = Union[ResidualKeep, AttnRes]

ATTENTION_VARIANTS: dict[str, type] = {
    "keep": Keep,
    "softmax": Softmax,
    "linear": Linear,
    "sparse": Sparse,
    "softplus": Softplus,
    "mala": Mala,
    "sqa": SQA,
}
RESIDUAL_VARIANTS: dict[str, type] = {"keep": ResidualKeep, "attnres": AttnRes}


def _build(cls: type, data: object, noun: str = "key", owner: str = "", **extra: object) -> Any:
    """cls(**data) for a mapping from a file, rejecting unknown and missing keys."""
    if not isinstance(data, Mapping):
        raise PolicyError(f"expected a mapping, got {_show(data)}")
    names = [f.name for f in fields(cls) if f.name not in extra]
    for key in data:
        if key not in names:
            raise PolicyError(_unknown(noun, key, names, owner))
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    for name in required:
        if name not in data and name not in extra:
            raise PolicyError(f"missing key {name!r}")
    return cls(**data, **extra)


def _variant(value: object, registry: dict[str, type]) -> Any:
    """A variant from an instance, a bare name, or a mapping {variant: name, **params}."""
    if type(value) in registry.values():
        return value
    if isinstance(value, _Variant):
        raise PolicyError(f"{type(value).__name__} is not allowed here; Valid: {', '.join(registry)}")
    if isinstance(value, Mapping):
        if "variant" not in value:
            raise PolicyError(f"missing key 'variant'; Valid: {', '.join(registry)}")
        name, params = value["variant"], {k: v for k, v in value.items() if k != "variant"}
    elif isinstance(value, str):
        name, params = value, {}
    else:
        raise PolicyError(f"expected a variant name or a mapping with 'variant', got {_show(value)}")
    if not isinstance(name, str) or name not in registry:
        raise PolicyError(_unknown("variant", name, list(registry)))
    return _build(registry[name], params, "parameter", f" for variant {name!r}")


def _variant_value(variant: _Variant) -> str | dict[str, Any]:
    """File form of a variant: its bare name when it has no parameters."""
    if not variant.params():
        return variant.variant
    return {"variant": variant.variant, **{k: v for k, v in variant.params().items() if v is not None}}


LayerRange = tuple[int, Union[int, None]]
_RANGE = re.compile(r"\s*(\d+)\s*(?:(-)\s*(\d*)\s*)?")


def _layer_range(item: object) -> LayerRange:
    """One inclusive range from 3, "3", "0-5", "20-" or (start, end)."""
    if isinstance(item, tuple) and len(item) == 2:
        start, end = item
    elif isinstance(item, str):
        match = _RANGE.fullmatch(item)
        if match is None:
            raise PolicyError(f"invalid layer range {item!r}; expected 'N', 'N-M' or 'N-'")
        start = int(match[1])
        end = None if match[2] and not match[3] else int(match[3] or match[1])
    else:
        start, end = item, item
    if not _is(start, int) or not (end is None or _is(end, int)):
        raise PolicyError(f"expected a layer index or a range like '0-5', got {_show(item)}")
    if start < 0:
        raise PolicyError(f"layer {start} must be >= 0")
    if end is not None and end < start:
        raise PolicyError(f"invalid layer range {item!r}: start {start} > end {end}")
    return start, end


def _format_range(start: int, end: int | None) -> str:
    return f"{start}-" if end is None else str(start) if end == start else f"{start}-{end}"


@dataclass(frozen=True)
class Where:
    """Which sites a rule applies to: layer ranges (inclusive, None end = open) and/or a module glob."""

    layers: tuple[LayerRange, ...] | None = None
    module: str | None = None

    def __post_init__(self) -> None:
        if self.layers is not None:
            with _at("layers"):
                object.__setattr__(self, "layers", self._parse_layers(self.layers))
        if self.module is not None and (not isinstance(self.module, str) or not self.module):
            raise PolicyError(f"expected a non-empty glob string, got {_show(self.module)}", "module")

    @staticmethod
    def _parse_layers(layers: object) -> tuple[LayerRange, ...]:
        if not isinstance(layers, (list, tuple)):
            return (_layer_range(layers),)
        if not layers:
            raise PolicyError("empty list; give at least one layer or range")
        ranges = []
        for index, item in enumerate(layers):
            with _at(f"[{index}]"):
                ranges.append(_layer_range(item))
        return tuple(ranges)

    def matches(self, module: str, layer: int | None) -> bool:
        if self.layers is not None and (layer is None or not self._in_layers(layer)):
            return False
        return self.module is None or fnmatch.fnmatchcase(module, self.module)

    def _in_layers(self, layer: int) -> bool:
        return any(start <= layer and (end is None or layer <= end) for start, end in self.layers or ())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.layers is not None:
            out["layers"] = [_format_range(start, end) for start, end in self.layers]
        if self.module is not None:
            out["module"] = self.module
        return out


@dataclass(frozen=True)
class Rule:
    """Use `use` at the sites `where` matches. Accepts the file forms of both fields."""

    where: Where
    use: AttentionVariant

    def __post_init__(self) -> None:
        if not isinstance(self.where, Where):
            with _at("where"):
                object.__setattr__(self, "where", _build(Where, self.where))
        with _at("use"):
            object.__setattr__(self, "use", _variant(self.use, ATTENTION_VARIANTS))


@dataclass(frozen=True)
class Target(_Checked):
    """Optional facts about the deployment."""

    minimum: ClassVar[dict[str, float]] = {"max_seq_len": 1}
    device: str | None = None
    dtype: str | None = None
    max_seq_len: int | None = None


@dataclass(frozen=True)
class AttentionPolicy:
    """Rules tried in order (first match wins); `default` for sites none matches."""

    default: AttentionVariant = Keep()
    rules: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        with _at("default"):
            object.__setattr__(self, "default", _variant(self.default, ATTENTION_VARIANTS))
        if not isinstance(self.rules, (list, tuple)):
            raise PolicyError(f"expected a list of rules, got {_show(self.rules)}", "rules")
        rules = []
        for index, rule in enumerate(self.rules):
            with _at(f"rules[{index}]"):
                rules.append(rule if isinstance(rule, Rule) else _build(Rule, rule))
        object.__setattr__(self, "rules", tuple(rules))


def _target(value: object) -> Target:
    return value if isinstance(value, Target) else _build(Target, value)


def _attention(value: object) -> AttentionPolicy:
    """`attention:` is {default, rules} or a bare variant meaning {default: <it>, rules: []}."""
    if isinstance(value, AttentionPolicy):
        return value
    if isinstance(value, Mapping) and "variant" not in value:
        return _build(AttentionPolicy, value)
    return AttentionPolicy(default=_variant(value, ATTENTION_VARIANTS))


def _residual(value: object) -> ResidualVariant:
    """`residual:` is {use: <variant>} or a bare variant."""
    if isinstance(value, Mapping) and "variant" not in value:
        unknown = [key for key in value if key != "use"]
        if unknown:
            raise PolicyError(_unknown("key", unknown[0], ["use"]))
        with _at("use"):
            return _variant(value.get("use", "keep"), RESIDUAL_VARIANTS)
    return _variant(value, RESIDUAL_VARIANTS)


def _check_version(version: object) -> None:
    if not _is(version, int) or version not in SUPPORTED_VERSIONS:
        supported = ", ".join(map(str, SUPPORTED_VERSIONS))
        raise PolicyError(f"unsupported version {version!r}; supported: {supported}", "version")


@dataclass(frozen=True)
class Policy:
    """A whole rewrite policy. Accepts the file forms of its fields; `source` names where it came from."""

    version: int = 1
    name: str = "unnamed"
    target: Target = Target()
    attention: AttentionPolicy = AttentionPolicy()
    residual: ResidualVariant = ResidualKeep()
    source: str = field(default="<dict>", compare=False)

    def __post_init__(self) -> None:
        try:
            _check_version(self.version)
            if not isinstance(self.name, str) or not self.name:
                raise PolicyError(f"expected a non-empty string, got {_show(self.name)}", "name")
            for name, parse in (("target", _target), ("attention", _attention), ("residual", _residual)):
                with _at(name):
                    object.__setattr__(self, name, parse(getattr(self, name)))
        except PolicyError as error:
            raise error.with_source(self.source) from None

    def choose(self, module: str, layer: int | None) -> tuple[AttentionVariant, int | None]:
        """The variant for a site and the index of the rule that chose it (None = the default)."""
        for index, rule in enumerate(self.attention.rules):
            if rule.where.matches(module, layer):
                return rule.use, index
        return self.attention.default, None

    def to_dict(self) -> dict[str, Any]:
        """The canonical file form (None-valued fields left out); load_policy(p.to_dict()) == p."""
        target = {f.name: getattr(self.target, f.name) for f in fields(self.target)}
        out: dict[str, Any] = {"version": self.version, "name": self.name}
        if any(v is not None for v in target.values()):
            out["target"] = {k: v for k, v in target.items() if v is not None}
        rules = [{"where": r.where.to_dict(), "use": _variant_value(r.use)} for r in self.attention.rules]
        out["attention"] = {"default": _variant_value(self.attention.default), "rules": rules}
        out["residual"] = {"use": _variant_value(self.residual)}
        return out


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as `1e-6` (YAML 1.1 wants `1.0e-6`) and rejects
    duplicate keys (SafeLoader keeps the last one silently). Keys brought in by a `<<` merge may be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: SafeLoader reports it
                continue
            if duplicate:
                raise PolicyError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1}); "
                                  "a key may appear once per mapping")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_YamlLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _parse_toml(text: str) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: an object with a repeated key is an error, not its last value."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise PolicyError(f"duplicate key {key!r}; a key may appear once per object")
        out[key] = value
    return out


_READERS: dict[str, Callable[[str], Any]] = {
    ".yaml": lambda text: yaml.load(text, Loader=_YamlLoader),
    ".yml": lambda text: yaml.load(text, Loader=_YamlLoader),
    ".toml": _parse_toml,
    ".json": lambda text: json.loads(text, object_pairs_hook=_unique_keys),
}


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        problem = f"unknown file suffix {path.suffix!r}; Valid: {', '.join(_READERS)}"
        raise PolicyError(problem, source=str(path))
    return suffix


def load_policy(src: str | os.PathLike[str] | Mapping[str, Any] | Policy) -> Policy:
    """A validated Policy from a .yaml/.yml/.toml/.json file, a dict, or a Policy (returned as is)."""
    if isinstance(src, Policy):
        return src
    if isinstance(src, Mapping):
        return _from_mapping(src, "<dict>")
    if not isinstance(src, (str, os.PathLike)):
        raise PolicyError(f"expected a path, a dict or a Policy, got {_show(src)}")
    path = Path(src)
    reader = _READERS[_suffix(path)]
    if not path.is_file():
        raise PolicyError("file not found", source=str(path))
    try:
        data = reader(path.read_text(encoding="utf-8"))
    except PolicyError as error:
        raise error.with_source(str(path)) from None
    except Exception as error:
        raise PolicyError(f"cannot parse {path.suffix[1:].upper()}: {error}", source=str(path)) from error
    return _from_mapping(data, str(path))


def _from_mapping(data: object, source: str) -> Policy:
    try:
        if not isinstance(data, Mapping):
            raise PolicyError(f"expected a mapping at the top level, got {_show(data)}")
        _check_version(data.get("version", 1))
        return _build(Policy, data, source=source)
    except PolicyError as error:
        raise error.with_source(source) from None


def dump_policy(policy: Policy, path: str | os.PathLike[str]) -> None:
    """Write `policy` in the format its suffix names."""
    path = Path(path)
    suffix, data = _suffix(path), policy.to_dict()
    if suffix == ".json":
        text = json.dumps(data, indent=2) + "\n"
    elif suffix == ".toml":
        text = _toml_dumps(data)
    else:
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    path.write_text(text, encoding="utf-8")


def _toml_dumps(data: Mapping[str, Any]) -> str:
    """Minimal TOML writer for policy dicts: top-level mappings become [tables], lists of
    mappings become [[arrays of tables]], everything else is written inline."""
    lines: list[str] = []
    _toml_table(lines, data, ())
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_table(lines: list[str], table: Mapping[str, Any], path: tuple[str, ...]) -> None:
    nested = []
    for key, value in table.items():
        is_array_of_tables = isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value)
        if is_array_of_tables or (isinstance(value, Mapping) and not path):
            nested.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in nested:
        header = ".".join(_toml_key(part) for part in (*path, key))
        for item in [value] if isinstance(value, Mapping) else value:
            lines += ["", f"[{header}]" if isinstance(value, Mapping) else f"[[{header}]]"]
            _toml_table(lines, item, (*path, key))


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _toml_char(char: str) -> str:
    if char in '"\\':
        return "\\" + char
    if ord(char) < 0x20 or ord(char) == 0x7F:
        return f"\\u{ord(char):04x}"
    return char


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(map(_toml_char, value)) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {_show(value)} as TOML")


def check_sites(policy: Policy, sites: list[tuple[str, int | None]], num_layers: int) -> None:
    """Raise PolicyError if a rule names layers the model lacks or matches none of `sites`."""
    last = num_layers - 1
    model = f"layers 0-{last}" if num_layers > 0 else "no layers"
    modules = list(dict.fromkeys(module for module, _ in sites))
    seen = ", ".join(modules[:8]) + (f", ... ({len(modules) - 8} more)" if len(modules) > 8 else "")
    for index, rule in enumerate(policy.attention.rules):
        path = f"attention.rules[{index}]"
        for start, end in rule.where.layers or ():
            bad = end if end is not None and end > last else start
            if bad > last:
                problem = f"layer {bad} is outside the model ({model})"
                raise PolicyError(problem, f"{path}.where.layers", policy.source)
        if not any(rule.where.matches(module, layer) for module, layer in sites):
            problem = f"matches no attention site; modules seen: {seen or '(none)'}"
            raise PolicyError(problem, path, policy.source)
