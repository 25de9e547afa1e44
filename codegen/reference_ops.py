"""The variant references as torch.library ops: the op boundary a kernel will later take over.

    attncc::linear_attention(q, k, v, key_padding?, decay?, causal, feature_map, normalize, eps)
    attncc::sparse_attention(q, k, v, key_padding?, scale, pattern, window, sinks, block, window_blocks, mask_fn?, causal)
    attncc::softplus_attention(q, k, v, key_padding?, causal, reweight_p)
    attncc::mala_attention(q, k, v, key_padding?, causal, sim_scale?)

Tensors are the runtime inputs; every other argument is a constant of the site (what a kernel
specializes on). Each op runs its reference (codegen/reference/), returns a contiguous
[B, H, Tq, Dv] tensor (the fake implementation promises exactly that), and gets its gradient by
recomputing the reference under autograd: correct for any variant, and replaced by a backward
kernel when the variant gets one. softmax and sparse sliding_window/power have kernels (ops.py).
"""

from __future__ import annotations

from typing import Callable

import torch

from attncc.codegen.reference.linear import linear_attention as _linear
from attncc.codegen.reference.masks import and_masks, causal as causal_mask
from attncc.codegen.reference.mala import mala_attention as _mala
from attncc.codegen.reference.softplus import softplus_attention as _softplus
from attncc.codegen.reference.sparse import sparse_attention as _sparse
from attncc.policy import Sparse


def _sparse_reference(q, k, v, key_padding, scale, pattern, window, sinks, block, window_blocks, mask_fn, causal):
    mask_mod = None
    if pattern == "block":
        mask_mod = Sparse(pattern="block", mask=mask_fn).load_mask()
        if causal:
            mask_mod = and_masks(causal_mask(), mask_mod)
    return _sparse(q, k, v, scale=scale, pattern=pattern, window=window, sinks=sinks, block=block,
                   window_blocks=window_blocks, mask_mod=mask_mod, key_padding=key_padding)


REFERENCES: dict[str, Callable] = {
    "linear": lambda q, k, v, key_padding, decay, causal, feature_map, normalize, eps: _linear(
        q, k, v, causal=causal, feature_map=feature_map, normalize=normalize, decay=decay, eps=eps,
        key_padding=key_padding),
    "sparse": _sparse_reference,
    "softplus": lambda q, k, v, key_padding, causal, reweight_p: _softplus(
        q, k, v, causal=causal, reweight_p=reweight_p, key_padding=key_padding),
    "mala": lambda q, k, v, key_padding, causal, sim_scale: _mala(
        q, k, v, causal=causal, sim_scale=sim_scale, key_padding=key_padding),
}


@torch.library.custom_op("attncc::linear_attention", mutates_args=())
def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
                     decay: torch.Tensor | None, causal: bool, feature_map: str, normalize: bool,
                     eps: float) -> torch.Tensor:
    return REFERENCES["linear"](q, k, v, key_padding, decay, causal, feature_map, normalize, eps).contiguous()


@torch.library.custom_op("attncc::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
                     scale: float, pattern: str, window: int, sinks: int, block: int, window_blocks: int,
                     mask_fn: str | None, causal: bool) -> torch.Tensor:
    return REFERENCES["sparse"](q, k, v, key_padding, scale, pattern, window, sinks, block, window_blocks, mask_fn,
                                causal).contiguous()


@torch.library.custom_op("attncc::softplus_attention", mutates_args=())
def softplus_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
                       causal: bool, reweight_p: float) -> torch.Tensor:
    return REFERENCES["softplus"](q, k, v, key_padding, causal, reweight_p).contiguous()


@torch.library.custom_op("attncc::mala_attention", mutates_args=())
def mala_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
                   causal: bool, sim_scale: float | None) -> torch.Tensor:
    return REFERENCES["mala"](q, k, v, key_padding, causal, sim_scale).contiguous()


def _register(op, name: str, tensors: int) -> None:
    """Fake: a contiguous [B, H, Tq, Dv] in q's dtype. Autograd: recompute the reference, differentiate."""
    reference = REFERENCES[name]

    def fake(q, k, v, *rest):
        return q.new_empty((*q.shape[:-1], v.shape[-1]))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:tensors])
        ctx.constants = inputs[tensors:]

    def backward(ctx, grad):
        saved = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() if t is not None and i < 3 else t for i, t in enumerate(saved)]
            out = reference(*inputs, *ctx.constants)
            grads = torch.autograd.grad(out, inputs[:3], grad, allow_unused=True)
        return (*grads, *([None] * (len(saved) - 3 + len(ctx.constants))))

    op.register_fake(fake)
    op.register_autograd(backward, setup_context=setup_context)


_register(linear_attention, "linear", tensors=5)
_register(sparse_attention, "sparse", tensors=4)
_register(softplus_attention, "softplus", tensors=4)
_register(mala_attention, "mala", tensors=4)
