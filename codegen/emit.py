"""Kernel emission: one specialization of a kernel template per site, named, cached and dumpable.

A template is a Triton kernel whose site constants are `tl.constexpr` parameters; Triton compiles
one binary per distinct set of constants and caches it. `KernelSpec` is that set, named so that it
can appear in explain reports; `record` keeps every spec emitted in this process (the cache key is
the spec) and, with ATTNCC_DUMP_KERNELS=<dir>, writes the template's source with the spec in front.
A variant's kernel module (codegen/variants/<name>/) builds its own specs with `spec`.

`ran` records what each site's op ran (a kernel's name, or "reference (why)") where the choice is
made, and writes it into the site's report row.
"""

from __future__ import annotations

import importlib
import inspect
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype))


@dataclass(frozen=True)
class KernelSpec:
    template: str  # the template's short name, first in the spec's name
    module: str  # the module that holds the template's kernels (its source is what `dump` writes)
    constants: tuple[tuple[str, object], ...]

    @property
    def name(self) -> str:
        parts = [self.template] + [f"{k}{v}" if not isinstance(v, bool) else (k if v else "") for k, v in self.constants]
        return "_".join(p for p in parts if p)


EMITTED: dict[KernelSpec, int] = {}


def record(spec: KernelSpec) -> KernelSpec:
    """Count a launch of `spec`; the first time, dump its source when ATTNCC_DUMP_KERNELS is set."""
    first = spec not in EMITTED
    EMITTED[spec] = EMITTED.get(spec, 0) + 1
    directory = os.environ.get("ATTNCC_DUMP_KERNELS")
    if first and directory:
        dump(spec, Path(directory))
    return spec


def dump(spec: KernelSpec, directory: Path) -> Path:
    module = importlib.import_module(spec.module)
    header = "\n".join(f"# {k or 'variant'} = {v!r}" for k, v in spec.constants)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{spec.name}.py"
    path.write_text(f"# attncc kernel {spec.name}\n# constexpr specialization:\n{header}\n\n{inspect.getsource(module)}")
    return path


RAN: dict[str, str] = {}  # site key -> what its op ran last (a kernel's name, or "reference (why)")
_ROWS: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()  # site key -> its report row


def watch(site: str, row: object) -> None:
    """Write what site `site` runs into `row.kernel` (a report row) whenever it is recorded."""
    _ROWS[site] = row


def ran(site: str, what: str) -> None:
    """Record what a site's op ran, where the choice is made: at trace time for a choice that tracing
    fixes (the traced graph runs it on every call), inside the op for one it makes on each call."""
    if not site:
        return
    RAN[site] = what
    row = _ROWS.get(site)
    if row is not None:
        row.kernel = what
