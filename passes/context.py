"""The state one pipeline run carries from pass to pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from attncc.report import Report, Site


@dataclass(frozen=True)
class Options:
    inner: str = "inductor"
    kernels: str = "auto"
    verify: bool = False
    debug: bool = False


@dataclass
class SiteState:
    site: Site
    match: Any = None  # AttentionMatch, or None for a site that did not match
    mask: Any = None  # MaskKind
    variant: Any = None  # the policy's variant instance


@dataclass
class Context:
    gm: fx.GraphModule
    example_inputs: list[Any]
    policy: Any
    options: Options = field(default_factory=Options)
    report: Report = field(default_factory=Report)
    graph_index: int = 0
    sites: list[SiteState] = field(default_factory=list)
    misses: list[tuple[str, str]] = field(default_factory=list)
    refused_ops: list[tuple[fx.Node, str]] = field(default_factory=list)
    policy_warnings: list[str] = field(default_factory=list)

    def add_site(self, site: Site, match: Any) -> SiteState:
        site.graph = self.graph_index
        state = SiteState(site, match)
        self.sites.append(state)
        return state

    def count(self, pattern: str) -> None:
        hits = self.report.pattern_hits
        hits[pattern] = hits.get(pattern, 0) + 1

    def num_layers(self) -> int:
        layers = [s.site.layer for s in self.sites if s.site.kind == "attention" and s.site.layer is not None]
        return max(layers, default=0) + 1

    def placeholder_values(self) -> dict[fx.Node, Any]:
        nodes = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        values = {}
        for node, value in zip(nodes, self.example_inputs):
            if isinstance(value, torch.Tensor) and _is_fake(value):
                continue
            if isinstance(value, torch.SymInt):
                hint = value.node.hint
                if hint is None:
                    continue
                value = int(hint)
            values[node] = value
        return values

    def evaluate(self, target: fx.Node, seed: dict) -> torch.Tensor | None:
        from .attention import evaluate_mask

        return evaluate_mask(self, target, seed)


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)
