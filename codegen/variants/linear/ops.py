"""The linear variant's ops. Tensors are run-time inputs; the rest are the site's constants.

    attncc::linear_attention(q, k, v, key_padding?, decay?, causal, feature_map, normalize, eps) -> o
        the reference (reference.py); its backward op differentiates the reference (base.reference_op)
    attncc::linear_chunked(q, k, v, key_padding?, decay?, causal, feature_map, normalize, eps, fp32_out,
                           with_den=True)
        -> (o, den, S_c, z_c): the chunked Triton kernels (chunked.py); without with_den (and normalize),
        den and z_c are empty and no kernel computes the normalizer; with
    attncc::linear_chunked_backward(do, dden?, o, den, q, k, v, key_padding?, decay?, S_c, z_c, ...)
        -> (dq, dk, dv). den (the normalizer) is an output so that MALA can build on it.
"""

from __future__ import annotations

import torch

from attncc.codegen import emit

from ..base import reference_op
from . import chunked
from .reference import causal_scan as _scan
from .reference import feature_dim
from .reference import linear_attention as _linear


def reference(q, k, v, key_padding, decay, causal, feature_map, normalize, eps):
    return _linear(q, k, v, causal=causal, feature_map=feature_map, normalize=normalize, decay=decay, eps=eps,
                   key_padding=key_padding)


@torch.library.custom_op("attncc::linear_attention", mutates_args=())
def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
                     decay: torch.Tensor | None, causal: bool, feature_map: str, normalize: bool,
                     eps: float) -> torch.Tensor:
    return reference(q, k, v, key_padding, decay, causal, feature_map, normalize, eps).contiguous()


reference_op(linear_attention, reference, tensors=5)


# --- the chunked kernels (chunked.py) --------------------------------------------------------------

def kernel_spec(q, k, *, causal: bool, feature_map: str, normalize: bool, decay: str, padded: bool,
                fp32_out: bool = False, with_den: bool = False) -> emit.KernelSpec:
    """The chunked template's specialization (named in reports): linear_chunked_elu1_causal_norm_...
    ("den": the normalizer is computed for the caller, unnormalized)."""
    constants: list[tuple[str, object]] = [("", feature_map), ("causal", causal), ("norm", normalize),
                                           ("den", with_den and not normalize)]
    if decay != "none":
        constants.append(("decay_", decay))
    constants += [("d", int(q.shape[-1])), ("g", int(q.shape[-3] // k.shape[-3])), ("padded", padded),
                  ("", emit.dtype_name(q.dtype)), ("fp32out", fp32_out)]
    return emit.KernelSpec("linear_chunked", chunked.__name__, tuple(constants))


def _state_shapes(q, k, v, decay, causal, with_z):
    B, H, T, D = q.shape
    heads = H if decay is not None else k.shape[1]
    chunks = (T + chunked.CHUNK - 1) // chunked.CHUNK
    lead = (B, heads, chunks) if causal else (B, heads)
    return (*lead, D, v.shape[-1]), (*lead, D) if with_z else (0,)


@torch.library.custom_op("attncc::linear_chunked", mutates_args=())
def linear_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
                   decay: torch.Tensor | None, causal: bool, feature_map: str, normalize: bool, eps: float,
                   fp32_out: bool, with_den: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor]:
    """(o, den, S_c, z_c): the chunked kernels' forward; S_c, z_c are kept for the backward."""
    emit.record(kernel_spec(q, k, causal=causal, feature_map=feature_map, normalize=normalize,
                            decay="none" if decay is None else "rates", padded=key_padding is not None,
                            fp32_out=fp32_out, with_den=with_den))
    o, den, (s, z), _ = chunked.linear_fwd(q, k, v, key_padding=key_padding, decay=decay, causal=causal,
                                           feature_map=feature_map, normalize=normalize, eps=eps,
                                           out_dtype=torch.float32 if fp32_out else q.dtype, with_den=with_den)
    return o, den, s, z


@linear_chunked.register_fake
def _(q, k, v, key_padding, decay, causal, feature_map, normalize, eps, fp32_out, with_den=True):
    with_z = with_den or normalize
    s_shape, z_shape = _state_shapes(q, k, v, decay, causal, with_z)
    state_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
    return (q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=torch.float32 if fp32_out else q.dtype),
            q.new_empty(q.shape[:-1] if with_z else (0,), dtype=torch.float32),
            q.new_empty(s_shape, dtype=state_dtype), q.new_empty(z_shape, dtype=torch.float32))


@torch.library.custom_op("attncc::linear_chunked_backward", mutates_args=())
def linear_chunked_backward(do: torch.Tensor | None, dden: torch.Tensor | None, o: torch.Tensor, den: torch.Tensor,
                            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
                            decay: torch.Tensor | None, s: torch.Tensor, z: torch.Tensor, causal: bool,
                            feature_map: str, normalize: bool,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv). With o = num / (den + eps): ∂L/∂num = do / (den + eps) and ∂L/∂den gains
    -(do·o) / (den + eps) (chunked.py's docstring derives the rest)."""
    do = do if do is not None else torch.zeros_like(o)
    if normalize:
        g, d = chunked.normalized_grads(do, o, den, dden, eps, s.dtype)
    else:  # the kernels take dO as it is (no float copy and back); no δ when nothing read den
        g, d = do, dden if dden is not None and den.numel() else None
    return chunked.linear_bwd(g, d, q, k, v, (s, z), key_padding=key_padding, decay=decay, causal=causal,
                              feature_map=feature_map)


@linear_chunked_backward.register_fake
def _(do, dden, o, den, q, k, v, key_padding, decay, s, z, causal, feature_map, normalize, eps):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _chunked_setup(ctx, inputs, output):
    q, k, v, key_padding, decay, causal, feature_map, normalize, eps, *_ = inputs
    o, den, s, z = output
    ctx.save_for_backward(o, den, q, k, v, key_padding, decay, s, z)
    ctx.set_materialize_grads(False)  # no zero-filled gradients of the unused outputs (S_c alone is N·D·Dv/64)
    ctx.constants = (causal, feature_map, normalize, eps)


def _chunked_backward(ctx, do, dden, ds, dz):
    o, den, q, k, v, key_padding, decay, s, z = ctx.saved_tensors
    dq, dk, dv = linear_chunked_backward(do, dden, o, den, q, k, v, key_padding, decay, s, z, *ctx.constants)
    return dq, dk, dv, None, None, None, None, None, None, None, None


linear_chunked.register_autograd(_chunked_backward, setup_context=_chunked_setup)


# --- the recurrent form (decode from a cache of state, attncc/decode.py) ----------------------------

def state_kernel(q, k, v, kernels: str) -> str | None:
    """Why the chunked kernels cannot run a recurrent step or prefill on these tensors (None: they can)."""
    if kernels == "reference" or (kernels == "auto" and not q.is_cuda):
        return "reference"
    return chunked.supports(q.shape[-1], v.shape[-1], q.dtype, "elu1")


def _per_query_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


@torch.library.custom_op("attncc::linear_state", mutates_args=())
def linear_state(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
                 decay: torch.Tensor | None, s: torch.Tensor | None, z: torch.Tensor | None, feature_map: str,
                 normalize: bool, eps: float, kernels: str, site: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, S, z): causal linear attention of the queries aligned with k, v, continuing the state (S, z)
    of every earlier key (None: none), and the state after the last key. S [B, H, F, Dv], z [B, H, F, 1],
    float32, per query head (reference.causal_scan). Inference only: no backward."""
    heads = q.shape[1]
    why = state_kernel(q, k, v, kernels) or (None if feature_map in chunked.FEATURE_MAPS else
                                             f"feature map {feature_map} has no kernel")
    if why is None:
        emit.ran(site, kernel_spec(q, k, causal=True, feature_map=feature_map, normalize=normalize,
                                   decay="none" if decay is None else "rates", padded=key_padding is not None).name
                 + " (state in, state out)")
        state = None
        if s is not None:
            group = heads // (heads if decay is not None else k.shape[1])
            state = (s[:, ::group].contiguous(), z[:, ::group, :, 0].contiguous())
        o, _, _, (s, z) = chunked.linear_fwd(q, k, v, key_padding=key_padding, decay=decay, causal=True,
                                             feature_map=feature_map, normalize=normalize, eps=eps,
                                             initial_state=state)
        return o, _per_query_head(s, heads), _per_query_head(z, heads).unsqueeze(-1)
    emit.ran(site, "reference recurrent form" + ("" if why == "reference" else f" ({why})"))
    o, (s, z) = _scan(q, k, v, None if s is None else (s, z), feature_map=feature_map, normalize=normalize,
                      decay=decay, eps=eps, key_padding=key_padding)
    return o.contiguous(), s.contiguous(), z.contiguous()


@linear_state.register_fake
def _(q, k, v, key_padding, decay, s, z, feature_map, normalize, eps, kernels, site):
    B, H, _, D = q.shape
    F = feature_dim(feature_map, D)
    return (q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty((B, H, F, v.shape[-1]), dtype=torch.float32),
            q.new_empty((B, H, F, 1), dtype=torch.float32))
