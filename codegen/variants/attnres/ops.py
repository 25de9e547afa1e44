"""The AttnRes aggregation's ops, and the function the rewritten stream calls (`aggregate`).

    attncc::attnres_fused(Tensor[] sources, Tensor query, Tensor norm_weight, float eps) -> (o, r, p)
        the fused Triton kernel (fused.py): o = Σ_i p_i v_i, and r, p ([S, ...] fp32: each source's
        inverse RMS and weight) for the backward, with
    attncc::attnres_fused_backward(do, sources, query, norm_weight, r, p) -> (dv [S, ...], dquery, dnorm_weight)
        dv holds every source's gradient, stacked; the autograd formula hands back its slices.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from attncc.codegen import emit

from ..base import KERNEL_CHOICES
from . import fused
from .reference import attnres


def kernel_spec(sources: Sequence[torch.Tensor]) -> emit.KernelSpec:
    """The fused template's specialization (named in reports): attnres_fused_S3_d64_bf16."""
    constants = (("S", len(sources)), ("d", int(sources[0].shape[-1])), ("", emit.dtype_name(sources[0].dtype)))
    return emit.KernelSpec("attnres_fused", fused.__name__, constants)


def supports(sources: Sequence[torch.Tensor], query: torch.Tensor, norm_weight: torch.Tensor) -> str | None:
    """Why the fused kernel cannot take these tensors (the reference runs instead), or None."""
    first = sources[0]
    if first.dtype not in fused.DTYPES:
        return f"attnres kernel: dtype {first.dtype} is not supported (float16, bfloat16, float32)"
    if any(s.dtype != first.dtype for s in sources):
        return "attnres kernel: the sources have different dtypes"
    if any(s.shape != first.shape for s in sources):
        return "attnres kernel: the sources have different shapes"
    if first.dim() and first.shape[-1] > fused.MAX_D:
        return f"attnres kernel: d = {first.shape[-1]} is wider than its {fused.MAX_D} (one row in registers)"
    if first.dim() == 0 or query.shape != first.shape[-1:] or norm_weight.shape != first.shape[-1:]:
        return "attnres kernel: query and norm weight must be vectors of the sources' last dim"
    if any(t.device != first.device for t in (*sources, query, norm_weight)):
        return "attnres kernel: the tensors are on different devices"
    return None


def aggregate(sources: Sequence[torch.Tensor], query: torch.Tensor, norm_weight: torch.Tensor, eps: float = 1e-6,
              kernels: str = "auto", site: str = "") -> torch.Tensor:
    """reference.attnres, on the fused kernel when `kernels` asks for one (under `auto`: CUDA tensors).
    One source is returned as it is. Records what runs under the site key `site` (emit.ran)."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels={kernels!r}; valid: {', '.join(KERNEL_CHOICES)}")
    if len(sources) == 1:
        return sources[0]
    tensors = (*sources, query, norm_weight)
    use = kernels == "triton" or (kernels == "auto" and all(t.is_cuda for t in tensors))
    why = supports(sources, query, norm_weight) if use else None
    if use and why is None:
        emit.ran(site, kernel_spec(sources).name)
        return torch.ops.attncc.attnres_fused(list(sources), query, norm_weight, float(eps))[0]
    emit.ran(site, "reference" if why is None else f"reference ({why})")
    if why is not None and kernels == "triton":  # kernels were asked for everywhere: say so where the choice is made
        warnings.warn(f"kernels='triton': the attnres aggregation {site or '(no site)'} runs the reference ({why}); "
                      "explain's `kernel` column shows what each site ran", stacklevel=2)
    return attnres(sources, query, norm_weight, eps)


@torch.library.custom_op("attncc::attnres_fused", mutates_args=())
def attnres_fused(sources: list[torch.Tensor], query: torch.Tensor, norm_weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, r, p): the aggregation, and each source's 1/RMS and softmax weight per token (fp32, [S, ...])."""
    why = supports(sources, query, norm_weight)
    if why is not None:
        raise ValueError(why)
    emit.record(kernel_spec(sources))
    shape = sources[0].shape
    o, r, p = fused.attnres_fwd(sources, query, norm_weight, eps)
    return o.view(shape), r.view(len(sources), *shape[:-1]), p.view(len(sources), *shape[:-1])


@attnres_fused.register_fake
def _(sources, query, norm_weight, eps):
    first = sources[0]
    saved = (len(sources), *first.shape[:-1])
    return (first.new_empty(first.shape), first.new_empty(saved, dtype=torch.float32),
            first.new_empty(saved, dtype=torch.float32))


@torch.library.custom_op("attncc::attnres_fused_backward", mutates_args=())
def attnres_fused_backward(do: torch.Tensor, sources: list[torch.Tensor], query: torch.Tensor,
                           norm_weight: torch.Tensor, r: torch.Tensor,
                           p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dv, dquery, dnorm_weight), dv [S, ...] stacked (fused.py derives the formulas)."""
    dv, dquery, dnorm = fused.attnres_bwd(do, sources, query, norm_weight, r, p)
    return dv.view(len(sources), *sources[0].shape), dquery, dnorm


@attnres_fused_backward.register_fake
def _(do, sources, query, norm_weight, r, p):
    first = sources[0]
    return (first.new_empty((len(sources), *first.shape)), torch.empty_like(query), torch.empty_like(norm_weight))


def _setup(ctx, inputs, output):
    sources, query, norm_weight, _ = inputs
    _, r, p = output
    ctx.save_for_backward(*sources, query, norm_weight, r, p)
    ctx.n_sources = len(sources)
    ctx.mark_non_differentiable(r, p)


def _backward(ctx, do, dr, dp):
    *sources, query, norm_weight, r, p = ctx.saved_tensors
    dv, dquery, dnorm = attnres_fused_backward(do, sources, query, norm_weight, r, p)
    return list(dv.unbind(0)), dquery, dnorm, None


attnres_fused.register_autograd(_backward, setup_context=_setup)
