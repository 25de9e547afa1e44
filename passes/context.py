"""The state one pipeline run carries from pass to pass."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from attncc.codegen import emit
from attncc.config import VariantConfig
from attncc.facts import MaskKind
from attncc.patterns.attention import AttentionMatch
from attncc.patterns.residual import ResidualMatch
from attncc.policy import Policy
from attncc.report import Report, Site


@dataclass(frozen=True)
class Options:
    inner: str = "inductor"
    kernels: str = "auto"
    verify: bool = False
    debug: bool = False
    mask_modules: tuple[str, ...] = ()  # modules a policy's block masks may be imported from
    cudagraphs: str = "decode"  # decode: a state decode step's graph runs as a CUDA graph (Inductor, GPU); never


_SITE_KEYS = itertools.count()


class SiteState:
    """One site as the passes see it: typed facts and decisions, passed from pass to pass.

    `site` is the site's report row: passes write it (what they found, decided and why), and never
    read it back; the facts they decide from are the typed fields here.
    """

    def __init__(self, site: Site, match: AttentionMatch | ResidualMatch | None, key: str):
        self.site = site
        self.match = match  # None for a site that did not match
        self.key = key  # unique in the process: the site's ops record under it what they ran
        self.kind = site.kind  # attention | residual
        self.module = site.module
        self.mask: MaskKind | None = None
        self.variant: VariantConfig | None = None  # the policy's choice
        self._layer = site.layer
        self._cross = site.cross

    @property
    def layer(self) -> int | None:
        return self._layer

    @layer.setter
    def layer(self, value: int | None) -> None:
        self._layer = self.site.layer = value

    @property
    def cross(self) -> bool:
        """Queries and keys come from different sequences (cross attention)."""
        return self._cross

    @cross.setter
    def cross(self, value: bool) -> None:
        self._cross = self.site.cross = value


@dataclass
class Context:
    gm: fx.GraphModule
    example_inputs: list[Any]
    policy: Policy
    options: Options = field(default_factory=Options)
    report: Report = field(default_factory=Report)
    graph_index: int = 0
    sites: list[SiteState] = field(default_factory=list)
    misses: list[tuple[str, str]] = field(default_factory=list)
    refused_ops: list[tuple[fx.Node, str]] = field(default_factory=list)
    policy_warnings: list[str] = field(default_factory=list)
    decode_step: bool = False  # every attention site is a recurrent state step of one query (passes.state)

    def add_site(self, site: Site, match: Any) -> SiteState:
        site.graph = self.graph_index
        state = SiteState(site, match, key=f"{site.module or 'site'}#{next(_SITE_KEYS)}")
        emit.watch(state.key, site)
        self.sites.append(state)
        return state

    def count(self, pattern: str) -> None:
        hits = self.report.pattern_hits
        hits[pattern] = hits.get(pattern, 0) + 1

    def input_values(self) -> dict[fx.Node, Any]:
        """Each placeholder's example input, as dynamo passed it (real or fake tensors, SymInts)."""
        return dict(zip([n for n in self.gm.graph.nodes if n.op == "placeholder"], self.example_inputs))

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

    def concrete(self, size: Any, bindings: dict) -> int | None:
        """A size at the example's values (bindings empty) or with its symbols rebound."""
        if isinstance(size, int):
            return size
        if isinstance(size, torch.SymInt):
            if not bindings:
                hint = size.node.hint
                return None if hint is None else int(hint)
            try:
                return int(size.node.expr.xreplace(bindings))
            except (TypeError, ValueError):
                return None
        return None

    def alternative_lengths(self, constants: set[int], limit: int = 5000) -> list[tuple[dict, dict]]:
        """Placeholder values with every size symbol rebound to other lengths, for symbolic graphs.

        Tensor inputs are rebuilt at the new sizes (ones, so they carry no padding); yields
        (values, {symbol: new size}) pairs. Empty for a graph with static sizes.
        """
        nodes = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        symbols = {}
        for node, value in zip(nodes, self.example_inputs):
            if isinstance(value, torch.SymInt) and value.node.hint is not None and value.node.expr.is_Symbol:
                symbols[value.node.expr] = int(value.node.hint)
        if not symbols:
            return []
        base = max(symbols.values())
        lengths = sorted({base + 5} | {c + 3 for c in constants if base < c + 3 <= limit})
        out = []
        for length in lengths:
            bindings = {sym: (length if hint == base else hint) for sym, hint in symbols.items()}
            values = self._values_with(nodes, bindings)
            if values is not None:
                out.append((values, bindings))
        return out

    def _values_with(self, nodes: list[fx.Node], bindings: dict) -> dict | None:
        values = {}
        for node, value in zip(nodes, self.example_inputs):
            if isinstance(value, torch.SymInt):
                values[node] = int(value.node.expr.xreplace(bindings))
            elif isinstance(value, torch.Tensor) and not _is_fake(value):
                fake = node.meta.get("example_value")
                shape = [self.concrete(d, bindings) for d in (fake.shape if isinstance(fake, torch.Tensor) else ())]
                if any(d is None for d in shape):
                    return None
                values[node] = value if tuple(shape) == tuple(value.shape) else torch.ones(shape, dtype=value.dtype, device=value.device)
            else:
                values[node] = value
        return values


def _is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, FakeTensor)
