"""Sites that decode from a recurrent state (attncc.decode): the attention function of a StateCache
generate emits one attncc::linear_state, attncc::mala_state or attncc::window_state op per layer. They are attention that
is already attncc's, so nothing is matched or rewritten; each becomes a report row, and its op's
`site` argument becomes the row's key, so the op records into it what it ran on each call."""

from __future__ import annotations

import torch

from attncc.fx import layer_of, shape_of
from attncc.report import Site

from .context import Context

STATE_OPS = {"linear_state": "linear", "mala_state": "mala", "window_state": "sparse"}
HOLDS = {"window_state": "decodes from the StateCache's window cache: the sinks and the last window keys, not the "
                         "whole KV cache"}


def find_state_sites(ctx: Context) -> None:
    """Report each state op; `ctx.decode_step` when the graph's attention is only state ops of one query
    each (a decode step, which the backend may run as a CUDA graph)."""
    steps = []
    for node in ctx.gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        namespace, name = node.target.namespace, node.target._opname
        if namespace != "attncc" or name not in STATE_OPS:
            continue
        module = node.args[-1] if isinstance(node.args[-1], str) else str(node.kwargs.get("site", ""))
        q, k = (shape_of(a) for a in node.args[:2])
        site = Site(kind="attention", module=module, layer=layer_of(module), pattern=f"{name} ({'window cache' if name in HOLDS else 'recurrent state'})",
                    heads=_dim(q, 1), kv_heads=_dim(k, 1), head_dim=_dim(q, -1), causal=True, mask="causal+padding",
                    variant=STATE_OPS[name], status="rewritten",
                    reason=HOLDS.get(name, "decodes from the StateCache: O(d²) per head, not the KV cache"))
        state = ctx.add_site(site, None)
        node.update_arg(len(node.args) - 1, state.key)
        ctx.count(f"state.{name}")
        steps.append(_dim(q, -2) == 1)
    ctx.decode_step = bool(steps) and all(steps) and sum(s.kind == "attention" for s in ctx.sites) == len(steps)


def _dim(shape, axis: int) -> int | None:
    try:
        value = shape[axis]
        return value if isinstance(value, int) else None
    except (TypeError, IndexError):
        return None
