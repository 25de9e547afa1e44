"""explain(): what attncc finds in a model and what the policy makes of each site, without running Inductor."""

from __future__ import annotations

from typing import Any

import torch

from attncc.compiler import AttnccError, Backend
from attncc.policy import PolicyError, check_sites
from attncc.report import Report


def explain(model: torch.nn.Module, example_args: Any, policy: Any = None,
            example_kwargs: dict | None = None) -> Report:
    """Trace `model(*example_args, **example_kwargs)` with dynamo, run attncc's passes, return the report.

    The graph runs once through the rewritten graph in eager mode (no Inductor compile).
    Raises AttnccError when the model has no attention that attncc can see, and PolicyError when a
    policy rule matches no site or names a layer outside the model.
    """
    if not isinstance(example_args, (tuple, list)):
        example_args = (example_args,)
    be = Backend(policy, inner="eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=be, fullgraph=False)
    try:
        compiled(*example_args, **(example_kwargs or {}))
    except torch._dynamo.exc.BackendCompilerFailed as err:
        # dynamo wraps what the backend raises; a bad policy or an attncc error surfaces as itself
        inner = getattr(err, "inner_exception", None)
        if isinstance(inner, (PolicyError, AttnccError)):
            raise inner from err
        raise
    report = be.report
    if not report.graphs:
        raise AttnccError("dynamo captured no graph of this model (is its forward fully Python-side?)")
    if not report.attention():
        raise AttnccError(
            f"no attention found in {type(model).__name__}: attncc looks for scaled_dot_product_attention calls "
            "and softmax(q·kᵀ)·v chains. If the model has attention, it may live in an op attncc does not "
            "decompose; run with ATTNCC_DEBUG=1 to dump the graphs."
        )
    check_sites(be.policy, [(s.module, s.layer) for s in report.attention()],
                max((s.layer for s in report.attention() if s.layer is not None), default=0) + 1)
    return report
