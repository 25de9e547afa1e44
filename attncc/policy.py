"""Rewrite policies: typed, versioned, frozen data saying which variant each attention site gets.

A policy is loaded from a YAML/YML/TOML/JSON file or a dict (see ``attncc/policies/`` for examples)
and validated on construction, so a bad policy fails before any compile work. Rules are tried in
order and the first match wins; sites no rule matches get ``attention.default``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Union

import yaml

from attncc.codegen.variants import ATTENTION, RESIDUAL
from attncc.config import Checked, VariantConfig, at, is_a, show, unknown
from attncc.errors import PolicyError

SUPPORTED_VERSIONS = (1,)
ATTENTION_VARIANTS: dict[str, type] = {config.variant: config for config in ATTENTION}  # name -> config type
RESIDUAL_VARIANTS: dict[str, type] = {config.variant: config for config in RESIDUAL}


def _build(cls: type, data: object, noun: str = "key", owner: str = "", **extra: object) -> Any:
    """cls(**data) for a mapping from a file, rejecting unknown and missing keys."""
    if not isinstance(data, Mapping):
        raise PolicyError(f"expected a mapping, got {show(data)}")
    names = [f.name for f in fields(cls) if f.name not in extra]
    for key in data:
        if key not in names:
            raise PolicyError(unknown(noun, key, names, owner))
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    for name in required:
        if name not in data and name not in extra:
            raise PolicyError(f"missing key {name!r}")
    return cls(**data, **extra)


def _variant(value: object, registry: dict[str, type]) -> Any:
    """A variant from an instance, a bare name, or a mapping {variant: name, **params}."""
    if type(value) in registry.values():
        return value
    if isinstance(value, VariantConfig):
        raise PolicyError(f"{type(value).__name__} is not allowed here; Valid: {', '.join(registry)}")
    if isinstance(value, Mapping):
        if "variant" not in value:
            raise PolicyError(f"missing key 'variant'; Valid: {', '.join(registry)}")
        name, params = value["variant"], {k: v for k, v in value.items() if k != "variant"}
    elif isinstance(value, str):
        name, params = value, {}
    else:
        raise PolicyError(f"expected a variant name or a mapping with 'variant', got {show(value)}")
    if not isinstance(name, str) or name not in registry:
        raise PolicyError(unknown("variant", name, list(registry)))
    return _build(registry[name], params, "parameter", f" for variant {name!r}")


def _variant_value(variant: VariantConfig) -> str | dict[str, Any]:
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
    if not is_a(start, int) or not (end is None or is_a(end, int)):
        raise PolicyError(f"expected a layer index or a range like '0-5', got {show(item)}")
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
            with at("layers"):
                object.__setattr__(self, "layers", self._parse_layers(self.layers))
        if self.module is not None and (not isinstance(self.module, str) or not self.module):
            raise PolicyError(f"expected a non-empty glob string, got {show(self.module)}", "module")

    @staticmethod
    def _parse_layers(layers: object) -> tuple[LayerRange, ...]:
        if not isinstance(layers, (list, tuple)):
            return (_layer_range(layers),)
        if not layers:
            raise PolicyError("empty list; give at least one layer or range")
        ranges = []
        for index, item in enumerate(layers):
            with at(f"[{index}]"):
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
    use: VariantConfig

    def __post_init__(self) -> None:
        if not isinstance(self.where, Where):
            with at("where"):
                object.__setattr__(self, "where", _build(Where, self.where))
        with at("use"):
            object.__setattr__(self, "use", _variant(self.use, ATTENTION_VARIANTS))


@dataclass(frozen=True)
class Target(Checked):
    """Optional facts about the deployment."""

    minimum: ClassVar[dict[str, float]] = {"max_seq_len": 1}
    device: str | None = None
    dtype: str | None = None
    max_seq_len: int | None = None


@dataclass(frozen=True)
class AttentionPolicy:
    """Rules tried in order (first match wins); `default` for sites none matches."""

    default: VariantConfig | str = "keep"
    rules: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        with at("default"):
            object.__setattr__(self, "default", _variant(self.default, ATTENTION_VARIANTS))
        if not isinstance(self.rules, (list, tuple)):
            raise PolicyError(f"expected a list of rules, got {show(self.rules)}", "rules")
        rules = []
        for index, rule in enumerate(self.rules):
            with at(f"rules[{index}]"):
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


def _residual(value: object) -> VariantConfig:
    """`residual:` is {use: <variant>} or a bare variant."""
    if isinstance(value, Mapping) and "variant" not in value:
        extra = [key for key in value if key != "use"]
        if extra:
            raise PolicyError(unknown("key", extra[0], ["use"]))
        with at("use"):
            return _variant(value.get("use", "keep"), RESIDUAL_VARIANTS)
    return _variant(value, RESIDUAL_VARIANTS)


def _check_version(version: object) -> None:
    if not is_a(version, int) or version not in SUPPORTED_VERSIONS:
        supported = ", ".join(map(str, SUPPORTED_VERSIONS))
        raise PolicyError(f"unsupported version {version!r}; supported: {supported}", "version")


@dataclass(frozen=True)
class Policy:
    """A whole rewrite policy. Accepts the file forms of its fields; `source` names where it came from."""

    version: int = 1
    name: str = "unnamed"
    target: Target = Target()
    attention: AttentionPolicy = AttentionPolicy()
    residual: VariantConfig | str = "keep"
    source: str = field(default="<dict>", compare=False)

    def __post_init__(self) -> None:
        try:
            _check_version(self.version)
            if not isinstance(self.name, str) or not self.name:
                raise PolicyError(f"expected a non-empty string, got {show(self.name)}", "name")
            for name, parse in (("target", _target), ("attention", _attention), ("residual", _residual)):
                with at(name):
                    object.__setattr__(self, name, parse(getattr(self, name)))
        except PolicyError as error:
            raise error.with_source(self.source) from None

    def attention_configs(self) -> list[tuple[str, VariantConfig]]:
        """(field path, config) of every attention variant the policy names: the default, then each rule's."""
        rules = [(f"attention.rules[{i}].use", rule.use) for i, rule in enumerate(self.attention.rules)]
        return [("attention.default", self.attention.default), *rules]

    def choose(self, module: str, layer: int | None) -> tuple[VariantConfig, int | None]:
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
        raise PolicyError(f"expected a path, a dict or a Policy, got {show(src)}")
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
            raise PolicyError(f"expected a mapping at the top level, got {show(data)}")
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
    raise TypeError(f"cannot write {show(value)} as TOML")


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
