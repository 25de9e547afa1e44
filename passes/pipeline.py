"""The compile pipeline: named passes over the dynamo FX graph, in order, each with its reason.

    PASSES                what it does, and why it comes where it does
    decompose_modules     nn.MultiheadAttention / TransformerEncoderLayer ops become plain ops to match
    canonicalize          one spelling per op, so each pattern has one form per meaning
    find_attention        match SDPA calls and softmax(q·kᵀ)·v chains; report every near-miss
    classify_masks        evaluate each site's mask, so causal masks built in the graph become causal=True
    choose_variants       apply the policy (first matching rule wins); needs layers and modules from matching
    find_residual         match each sublayer's residual add (pre-/post-norm); names it by its attention/MLP site
    rewrite_attention     replace chosen sites with their variant's op; refused sites stay unchanged
    rewrite_residual      residual adds become AttnRes aggregations (policy `residual`); it rewires the stream
    find_state_sites      report the recurrent-state ops a StateCache generate emits (attncc.decode); last, as
                          they are no pattern and nothing before needs them

The rewritten graph then goes to the inner compiler (Inductor by default). With debug on
(`attncc.backend(..., debug=True)` or ATTNCC_DEBUG=1), each pass's graph is dumped before and after
to ATTNCC_DEBUG_DIR (default ./attncc_debug).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch.fx as fx

from .attention import choose_variants, classify_masks, find_attention, rewrite_attention
from .canonicalize import canonicalize
from .decompose import decompose
from .residual import find_residual, rewrite_residual
from .state import find_state_sites
from .context import Context


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Context], None]
    why: str


def _canonicalize(ctx: Context) -> None:
    for rule, hits in canonicalize(ctx.gm).items():
        ctx.report.pattern_hits[f"canonicalize.{rule}"] = ctx.report.pattern_hits.get(f"canonicalize.{rule}", 0) + hits


def _decompose(ctx: Context) -> None:
    hits, refused = decompose(ctx.gm)
    for rule, n in hits.items():
        ctx.report.pattern_hits[f"decompose.{rule}"] = n
    ctx.refused_ops.extend(refused)


PASSES: tuple[Pass, ...] = (
    Pass("decompose_modules", _decompose, "torch.nn's opaque attention ops become plain ops that patterns can see"),
    Pass("canonicalize", _canonicalize, "one spelling per op, so each pattern has one form per meaning"),
    Pass("find_attention", find_attention, "match attention sites; report near-misses with a reason"),
    Pass("classify_masks", classify_masks, "a causal mask built in the graph becomes causal=True"),
    Pass("choose_variants", choose_variants, "the policy needs each site's module and layer"),
    Pass("find_residual", find_residual, "needs the attention sites; after the passes that treat every site as attention"),
    Pass("rewrite_attention", rewrite_attention, "replace chosen sites; refused sites stay unchanged"),
    Pass("rewrite_residual", rewrite_residual, "rewire the stream last: attention rewrites only touch sublayer interiors"),
    Pass("find_state_sites", find_state_sites, "state ops are attncc's already: reported, not matched"),
)


def run_pipeline(ctx: Context) -> fx.GraphModule:
    debug_dir = _debug_dir(ctx)
    for index, p in enumerate(PASSES):
        if debug_dir:
            _dump(debug_dir, ctx, index, p.name, "before")
        start = time.perf_counter()
        p.run(ctx)
        ctx.gm.graph.lint()
        ctx.report.pass_seconds[p.name] = time.perf_counter() - start
        if debug_dir:
            _dump(debug_dir, ctx, index, p.name, "after")
    ctx.gm.recompile()
    for state in ctx.sites:
        ctx.report.sites.append(state.site)
    return ctx.gm


def _debug_dir(ctx: Context) -> Path | None:
    if not (ctx.options.debug or os.environ.get("ATTNCC_DEBUG") == "1"):
        return None
    path = Path(os.environ.get("ATTNCC_DEBUG_DIR", "attncc_debug"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _dump(directory: Path, ctx: Context, index: int, name: str, when: str) -> None:
    path = directory / f"graph{ctx.graph_index}_{index:02d}_{name}_{when}.txt"
    path.write_text(str(ctx.gm.graph))
