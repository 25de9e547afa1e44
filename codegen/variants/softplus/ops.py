"""The softplus variant's ops. attncc::softplus_attention(q, k, v, key_padding?, causal, reweight_p) runs
the reference (reference.py; its backward op differentiates it, base.reference_op). On the kernel path LSSA
(reweight_p = 0) runs attncc::lssa_flash and LSSAR (reweight_p > 0) attncc::lssar_flash (flash.py),
forward and backward."""

from __future__ import annotations

import math

import torch

from attncc.codegen import emit

from ..base import reference_op
from . import flash
from .reference import softplus_attention as _softplus


def reference(q, k, v, key_padding, causal, reweight_p):
    return _softplus(q, k, v, causal=causal, reweight_p=reweight_p, key_padding=key_padding)


@torch.library.custom_op("attncc::softplus_attention", mutates_args=())
def softplus_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
                       causal: bool, reweight_p: float) -> torch.Tensor:
    return reference(q, k, v, key_padding, causal, reweight_p).contiguous()


reference_op(softplus_attention, reference, tensors=4)


# --- LSSA on the flash-style kernels (flash.py) -----------------------------------------------------

EPS = 1e-8  # the reference's row-sum epsilon


def kernel_spec(q, k, *, causal: bool, padded: bool, reweight_p: float = 0.0) -> emit.KernelSpec:
    constants = (("causal", causal), ("d", int(q.shape[-1])), ("g", int(q.shape[-3] // k.shape[-3])),
                 ("padded", padded), ("", emit.dtype_name(q.dtype)))
    if reweight_p > 0:
        return emit.KernelSpec("lssar_flash", flash.__name__, (("p", f"{reweight_p:g}"),) + constants)
    return emit.KernelSpec("lssa_flash", flash.__name__, constants)


@torch.library.custom_op("attncc::lssa_flash", mutates_args=())
def lssa_flash(qn: torch.Tensor, kn: torch.Tensor, v: torch.Tensor, c: torch.Tensor, key_padding: torch.Tensor | None,
               causal: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, l): LSSA of l2-normalized q̂, k̂ with row scales c [B, Tq]; l (row sums) is kept for the backward."""
    emit.record(kernel_spec(qn, kn, causal=causal, padded=key_padding is not None))
    return flash.lssa_fwd(qn, kn, v, c, key_padding=key_padding, causal=causal, eps=eps)


@lssa_flash.register_fake
def _(qn, kn, v, c, key_padding, causal, eps):
    return qn.new_empty((*qn.shape[:-1], v.shape[-1])), qn.new_empty(qn.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("attncc::lssa_flash_backward", mutates_args=())
def lssa_flash_backward(do: torch.Tensor, qn: torch.Tensor, kn: torch.Tensor, v: torch.Tensor, c: torch.Tensor,
                        o: torch.Tensor, l: torch.Tensor, key_padding: torch.Tensor | None, causal: bool,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return flash.lssa_bwd(do, qn, kn, v, c, o, l, key_padding=key_padding, causal=causal, eps=eps)


@lssa_flash_backward.register_fake
def _(do, qn, kn, v, c, o, l, key_padding, causal, eps):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (qn, kn, v))


def _lssa_setup(ctx, inputs, output):
    qn, kn, v, c, key_padding, causal, eps = inputs
    ctx.save_for_backward(qn, kn, v, c, output[0], output[1], key_padding)
    ctx.constants = (causal, eps)


def _lssa_backward(ctx, do, dl):
    qn, kn, v, c, o, l, key_padding = ctx.saved_tensors
    dq, dk, dv = lssa_flash_backward(do, qn, kn, v, c, o, l, key_padding, *ctx.constants)
    return dq, dk, dv, None, None, None, None


lssa_flash.register_autograd(_lssa_backward, setup_context=_lssa_setup)


# --- LSSAR on the two-pass kernels (flash.py) ------------------------------------------------------

@torch.library.custom_op("attncc::lssar_flash", mutates_args=())
def lssar_flash(qn: torch.Tensor, kn: torch.Tensor, v: torch.Tensor, c: torch.Tensor, n: torch.Tensor,
                key_padding: torch.Tensor | None, causal: bool, p: float,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, l, lse): LSSAR of l2-normalized q̂, k̂ with row scales c and allowed-key counts n [B, Tq];
    l (row sums) and lse (−inf where the row kept no entry and returns LSSA) are kept for the backward."""
    emit.record(kernel_spec(qn, kn, causal=causal, padded=key_padding is not None, reweight_p=p))
    return flash.lssar_fwd(qn, kn, v, c, n, key_padding=key_padding, causal=causal, p=p, eps=eps)


@lssar_flash.register_fake
def _(qn, kn, v, c, n, key_padding, causal, p, eps):
    rows = qn.new_empty(qn.shape[:-1], dtype=torch.float32)
    return qn.new_empty((*qn.shape[:-1], v.shape[-1])), rows, torch.empty_like(rows)


@torch.library.custom_op("attncc::lssar_flash_backward", mutates_args=())
def lssar_flash_backward(do: torch.Tensor, qn: torch.Tensor, kn: torch.Tensor, v: torch.Tensor, c: torch.Tensor,
                         n: torch.Tensor, o: torch.Tensor, l: torch.Tensor, lse: torch.Tensor,
                         key_padding: torch.Tensor | None, causal: bool, p: float,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return flash.lssar_bwd(do, qn, kn, v, c, n, o, l, lse, key_padding=key_padding, causal=causal, p=p, eps=eps)


@lssar_flash_backward.register_fake
def _(do, qn, kn, v, c, n, o, l, lse, key_padding, causal, p, eps):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (qn, kn, v))


def _lssar_setup(ctx, inputs, output):
    qn, kn, v, c, n, key_padding, causal, p, eps = inputs
    ctx.save_for_backward(qn, kn, v, c, n, *output, key_padding)
    ctx.constants = (causal, p, eps)


def _lssar_backward(ctx, do, dl, dlse):
    qn, kn, v, c, n, o, l, lse, key_padding = ctx.saved_tensors
    dq, dk, dv = lssar_flash_backward(do, qn, kn, v, c, n, o, l, lse, key_padding, *ctx.constants)
    return dq, dk, dv, None, None, None, None, None, None


lssar_flash.register_autograd(_lssar_backward, setup_context=_lssar_setup)


def _rows(q, k, key_padding, causal: bool):
    """(q̂, k̂, c, n): the l2-normalized rows (autograd differentiates the normalization), each query row's
    number of allowed keys n_i [B, Tq] and its scale c_i = log(D)·log(max(n_i, 1))."""
    B, _, TQ, D = q.shape
    valid = key_padding.float() if key_padding is not None else q.new_ones(B, k.shape[-2], dtype=torch.float32)
    n = valid.cumsum(-1)[:, :TQ] if causal else valid.sum(-1, keepdim=True).expand(B, TQ)
    c = math.log(D) * torch.log(n.clamp(min=1))
    qn = torch.nn.functional.normalize(q.float(), dim=-1).to(q.dtype)
    kn = torch.nn.functional.normalize(k.float(), dim=-1).to(k.dtype)
    return qn, kn, c.contiguous(), n.contiguous()


def lssa(q, k, v, key_padding, causal: bool) -> torch.Tensor:
    """LSSA on the kernels: the rows normalized and c computed here, the attention in attncc::lssa_flash."""
    qn, kn, c, _ = _rows(q, k, key_padding, causal)
    o, _ = lssa_flash(qn, kn, v, c, key_padding, causal, EPS)
    return o


def lssar(q, k, v, key_padding, causal: bool, reweight_p: float) -> torch.Tensor:
    """LSSAR on the kernels: the rows normalized and c, n computed here, the attention in attncc::lssar_flash."""
    qn, kn, c, n = _rows(q, k, key_padding, causal)
    o, _, _ = lssar_flash(qn, kn, v, c, n, key_padding, causal, float(reweight_p), EPS)
    return o
