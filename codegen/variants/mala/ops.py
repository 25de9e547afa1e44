"""The MALA variant's ops. attncc::mala_attention(q, k, v, key_padding?, causal, sim_scale?) runs the
reference (reference.py; its backward op differentiates it, base.reference_op). On the kernel path,
`from_linear_sums` builds MALA on linear's chunked kernels (VARIANTS.md §6.5: the chunked algorithm
plus the carried Σ φ(k) and Σ v)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attncc.codegen import emit
from attncc.codegen.masks import repeat_kv

from ..base import reference_op
from ..linear import ops as linear_ops
from .reference import causal_scan as _scan
from .reference import mala_attention as _mala


def reference(q, k, v, key_padding, causal, sim_scale):
    return _mala(q, k, v, causal=causal, sim_scale=sim_scale, key_padding=key_padding)


@torch.library.custom_op("attncc::mala_attention", mutates_args=())
def mala_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
                   causal: bool, sim_scale: float | None) -> torch.Tensor:
    return reference(q, k, v, key_padding, causal, sim_scale).contiguous()


reference_op(mala_attention, reference, tensors=4)


def from_linear_sums(q, k, v, key_padding, causal, sim_scale, eps: float = 1e-6):
    """MALA on the linear kernels: Σ φ(q)·φ(k) v and Σ φ(q)·φ(k) (elu1, unnormalized, fp32) from
    attncc::linear_chunked, then the per-row β, γ correction and Σ v (prefix sums when causal) in
    PyTorch, differentiable through the kernel's backward. Same formula as reference.py."""
    num, den, _, _ = linear_ops.linear_chunked(q, k, v, key_padding, None, causal, "elu1", False, 0.0, True, True)
    B, H, T, D = q.shape
    group = H // k.shape[1]
    valid = q.new_ones(1, 1, T, 1, dtype=torch.float32)
    if key_padding is not None:
        valid = key_padding[:, None, :, None].float()
    v_valid = v.float() * valid
    if causal:  # prefix sums along the last dim (a parallel scan; along dim 2 CUDA scans each column serially)
        v_sum = v_valid.transpose(-1, -2).contiguous().cumsum(dim=-1).transpose(-1, -2)
        count = valid.transpose(-1, -2).contiguous().cumsum(dim=-1).transpose(-1, -2)
    else:
        v_sum, count = v_valid.sum(dim=2, keepdim=True), valid.sum(dim=2, keepdim=True)
    v_sum = v_sum.repeat_interleave(group, dim=1) if group > 1 else v_sum
    count = count.clamp(min=1)
    c = (D ** -0.5 if sim_scale is None else sim_scale) / count
    z = c * den.unsqueeze(-1)
    beta = 1 + 1 / (z + eps)
    gamma = z / count
    return (beta * c * num - gamma * v_sum).to(q.dtype)


# --- the recurrent form (decode from a cache of state, attncc/decode.py) ----------------------------

@torch.library.custom_op("attncc::mala_state", mutates_args=())
def mala_state(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
               kv: torch.Tensor | None, k_sum: torch.Tensor | None, v_sum: torch.Tensor | None,
               count: torch.Tensor | None, sim_scale: float | None, kernels: str,
               site: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, Σ φ(k) vᵀ, Σ φ(k), Σ v, count): causal MALA of the queries aligned with k, v, continuing the
    sums of every earlier key (None: none), and the sums after the last key (reference.causal_scan's
    state, float32, per query head). A prefill (no earlier key) runs MALA on the linear kernels where
    they serve, and sums its keys in closed form; a step with a state runs the recurrent form.
    Inference only: no backward."""
    why = linear_ops.state_kernel(q, k, v, kernels)
    if kv is None and why is None:
        spec = linear_ops.kernel_spec(q, k, causal=True, feature_map="elu1", normalize=False, decay="none",
                                      padded=key_padding is not None, fp32_out=True, with_den=True)
        emit.ran(site, f"mala on {spec.name}, state summed in closed form")
        o = from_linear_sums(q, k, v, key_padding, True, sim_scale)
        heads = q.shape[1]
        fk = F.elu(repeat_kv(k.float(), heads)) + 1
        vv = repeat_kv(v.float(), heads)
        valid = q.new_ones(1, 1, k.shape[-2], 1, dtype=torch.float32)
        if key_padding is not None:
            valid = key_padding[:, None, :, None].float()
        fk, vv = fk * valid, vv * valid
        return (o, fk.mT @ vv, fk.sum(dim=-2, keepdim=True), vv.sum(dim=-2, keepdim=True),
                valid.sum(dim=-2, keepdim=True).expand(q.shape[0], 1, 1, 1).contiguous())
    emit.ran(site, "reference recurrent form" + ("" if why in (None, "reference") else f" ({why})"))
    o, state = _scan(q, k, v, None if kv is None else (kv, k_sum, v_sum, count), sim_scale=sim_scale,
                     key_padding=key_padding)
    return (o.contiguous(), *(t.contiguous() for t in state))


@mala_state.register_fake
def _(q, k, v, key_padding, kv, k_sum, v_sum, count, sim_scale, kernels, site):
    B, H, _, D = q.shape
    DV = v.shape[-1]
    f32 = dict(dtype=torch.float32)
    return (q.new_empty((*q.shape[:-1], DV)), q.new_empty((B, H, D, DV), **f32), q.new_empty((B, H, 1, D), **f32),
            q.new_empty((B, H, 1, DV), **f32), q.new_empty((B, 1, 1, 1), **f32))
