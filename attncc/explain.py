"""explain(): what attncc finds in a model and what the policy makes of each site, without running Inductor."""

from __future__ import annotations

import copy
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from attncc.attnres import prepare
from attncc.compiler import Backend, keeping_last_report, trace_once
from attncc.errors import AttnccError
from attncc.policy import check_sites
from attncc.report import Report

# torch >= 2.13: the trace's recompiles get their own count, so they never use up another compile's limit


def explain(model: torch.nn.Module, example_args: Any, policy: Any = None,
            example_kwargs: dict | None = None, mask_modules: tuple[str, ...] = ()) -> Report:
    """Trace `model(*example_args, **example_kwargs)` with dynamo, run attncc's passes, return the report.

    The graph runs once through the rewritten graph in eager mode (no Inductor compile).
    Raises AttnccError when the model has no attention that attncc can see, and PolicyError when a
    policy rule matches no site or names a layer outside the model.

    explain leaves the process as it found it: it traces a copy of the model that shares its parameters
    (with an AttnRes policy, attncc.prepare runs on the copy: its AttnRes parameters and buffer updates
    land on the copy), from an entry function of its own and without
    resetting dynamo, so functions compiled before it keep their compiled code; last_report() is unchanged.
    One trace is left behind: that of a graph-breaking model whose code was compiled before (see
    _dropping_new_cache_entries); torch >= 2.13 keeps it from counting against that compile's recompile limit.
    """
    if not isinstance(example_args, (tuple, list)):
        example_args = (example_args,)
    be = Backend(policy, inner="eager", mask_modules=mask_modules)
    traced = _copy_sharing_parameters(getattr(model, "_orig_mod", model))
    breaks_before = dict(torch._dynamo.utils.counters["graph_break"])
    with keeping_last_report(), _dropping_new_cache_entries():
        if be.policy.residual.variant != "keep":  # the copy gets its own AttnRes parameters
            prepare(traced, be.policy, example_args, example_kwargs)
        trace_once(traced, be, tuple(example_args), example_kwargs or {})
    report = be.report
    breaks = _new_graph_breaks(breaks_before)
    if not report.graphs:
        raise AttnccError(f"dynamo captured no graph of {type(model).__name__}, so attncc never saw it{breaks}")
    if not report.attention():
        raise AttnccError(
            f"no attention found in {type(model).__name__}: attncc looks for scaled_dot_product_attention calls "
            "and softmax(q·kᵀ)·v chains. If the model has attention, it may live in an op attncc does not "
            f"decompose, or in code dynamo did not capture; run with ATTNCC_DEBUG=1 to dump the graphs.{breaks}"
        )
    check_sites(be.policy, [(s.module, s.layer) for s in report.attention()],
                max((s.layer for s in report.attention() if s.layer is not None), default=0) + 1)
    return report


def _new_graph_breaks(before: dict[str, int]) -> str:
    """The graph breaks dynamo counted since `before`, as a sentence for an error (empty when none)."""
    now = torch._dynamo.utils.counters["graph_break"]
    reasons = [reason.split("\n")[0] for reason, n in now.items() if n > before.get(reason, 0)]
    if not reasons:
        return ""
    return (". dynamo broke the graph (code after a break that dynamo skips, such as torch.nn's own modules, "
            "is never compiled): " + "; ".join(reasons[:3]))


def _copy_sharing_parameters(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `model` whose parameters are the model's own (no copy of the weights): what the trace adds
    to the module tree (AttnRes parameters) or updates in place (buffers, e.g. BatchNorm statistics) stays off it."""
    return copy.deepcopy(model, {id(p): p for p in model.parameters()})


@contextmanager
def _dropping_new_cache_entries() -> Iterator[None]:
    """After a graph break dynamo compiles the model's own frames too; drop the entries of code objects that had
    none before the trace. (A code object that already had entries keeps the trace's: torch has no way to drop
    some entries of a code object; the trace's own frame holds them whenever the model has no graph break.)"""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list, reset_code
    from torch._dynamo.convert_frame import input_codes

    def compiled_codes() -> dict[int, types.CodeType]:
        codes = (ref() for ref in input_codes.seen)
        return {id(code): code for code in codes if code is not None and _debug_get_cache_entry_list(code)}

    before = compiled_codes()
    try:
        yield
    finally:
        for key, code in compiled_codes().items():
            if key not in before:
                reset_code(code)
