"""Kernel emission: one specialization of a kernel template per site, named, cached and dumpable.

A template is a Triton kernel whose site constants are `tl.constexpr` parameters; Triton compiles
one binary per distinct set of constants and caches it. `KernelSpec` is that set, named so that it
can appear in explain reports; `record` keeps every spec emitted in this process (the cache key is
the spec) and, with ATTNCC_DUMP_KERNELS=<dir>, writes the template's source with the spec in front.
Adding a variant's kernel means adding its template module and a `<variant>_spec` function here.
"""

from __future__ import annotations

import inspect
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class KernelSpec:
    template: str  # the module in codegen/triton that holds the kernels
    constants: tuple[tuple[str, object], ...]

    @property
    def name(self) -> str:
        parts = [self.template] + [f"{k}{v}" if not isinstance(v, bool) else (k if v else "") for k, v in self.constants]
        return "_".join(p for p in parts if p)


EMITTED: dict[KernelSpec, int] = {}


def flash_spec(q: torch.Tensor, k: torch.Tensor, *, causal: bool, pattern: str, window: int = 0, sinks: int = 0,
               block: int = 128, window_blocks: int = 0, padded: bool = False) -> KernelSpec:
    constants: list[tuple[str, object]] = [("", pattern), ("causal", bool(causal))]
    if pattern == "sliding_window":
        constants += [("w", int(window)), ("s", int(sinks))]
    elif pattern == "power":
        constants += [("b", int(block)), ("wb", int(window_blocks))]
    constants += [("d", int(q.shape[-1])), ("g", int(q.shape[-3] // k.shape[-3])), ("padded", bool(padded)),
                  ("", _DTYPE_NAMES.get(q.dtype, str(q.dtype)))]
    return KernelSpec("flash", tuple(constants))


def record(spec: KernelSpec) -> KernelSpec:
    """Count a launch of `spec`; the first time, dump its source when ATTNCC_DUMP_KERNELS is set."""
    first = spec not in EMITTED
    EMITTED[spec] = EMITTED.get(spec, 0) + 1
    directory = os.environ.get("ATTNCC_DUMP_KERNELS")
    if first and directory:
        dump(spec, Path(directory))
    return spec


def dump(spec: KernelSpec, directory: Path) -> Path:
    from attncc.codegen import triton as templates

    module = __import__(f"{templates.__name__}.{spec.template}", fromlist=["_"])
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
