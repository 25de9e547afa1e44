"""The explain report: one row per attention or residual site."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

SITE_FIELDS = (
    "kind", "module", "layer", "pattern", "heads", "kv_heads", "head_dim", "causal", "mask",
    "variant", "params", "status", "reason", "kernel",
)


@dataclass
class Site:
    kind: str  # attention | residual
    module: str
    layer: int | None
    pattern: str
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    causal: bool | None = None
    mask: str = "none"
    variant: str = "keep"
    params: dict[str, Any] = field(default_factory=dict)
    status: str = "kept"  # rewritten | kept | unsupported
    reason: str = ""
    kernel: str | None = None
    scale: float | None = None
    dropout: float | None = 0.0  # None: a probability known only at run time
    cross: bool = False
    graph: int = 0  # which of the backend's graphs (0, 1, ...): prefill and decode steps are graphs of their own

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    sites: list[Site] = field(default_factory=list)
    policy: str = ""
    graphs: int = 0
    pattern_hits: dict[str, int] = field(default_factory=dict)
    pass_seconds: dict[str, float] = field(default_factory=dict)  # time in each pass, summed over graphs
    frame: Any = None  # the Python frame the graph was compiled from (one report per graph)
    ran: bool = False  # the compiled graph has been called

    def attention(self) -> list[Site]:
        return [s for s in self.sites if s.kind == "attention"]

    def count(self, status: str | None = None, kind: str | None = None) -> int:
        return sum(1 for s in self.sites if (status is None or s.status == status) and (kind is None or s.kind == kind))

    def to_json(self, **kwargs) -> str:
        return json.dumps(
            {"policy": self.policy, "graphs": self.graphs, "sites": [s.to_dict() for s in self.sites]},
            default=str,
            **kwargs,
        )

    def table(self) -> str:
        header = ["#", "graph", "kind", "module", "layer", "pattern", "H", "Hkv", "D", "causal", "mask", "variant", "status", "reason"]
        rows = []
        for i, s in enumerate(self.sites):
            params = ",".join(f"{k}={v}" for k, v in s.params.items())
            variant = s.variant + (f"({params})" if params else "")
            rows.append([
                str(i), str(s.graph), s.kind, s.module or "-", "-" if s.layer is None else str(s.layer), s.pattern,
                _opt(s.heads), _opt(s.kv_heads), _opt(s.head_dim), _opt(s.causal), s.mask,
                variant, s.status, s.reason + (f" [kernel {s.kernel}]" if s.kernel else ""),
            ])
        widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header] + rows]
        counts = ", ".join(f"{n} {st}" for st in ("rewritten", "kept", "unsupported") if (n := self.count(st)))
        lines.append(f"{len(self.sites)} sites in {self.graphs} graph(s): {counts or 'none'}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _opt(x: Any) -> str:
    return "-" if x is None else str(x)
