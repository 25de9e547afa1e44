"""The sparse variant's op for patterns without a kernel (a user's block mask, or any pattern the
flash kernel cannot take): attncc::sparse_attention(q, k, v, key_padding?, scale, pattern, window,
sinks, block, window_blocks, mask_fn?, causal). It runs the reference (reference.py); its gradient
recomputes the reference (base.reference_op). sliding_window and power run on softmax's flash kernel.
"""

from __future__ import annotations

import torch

from attncc.codegen.masks import and_masks, causal as causal_mask, causal_offset

from ..base import reference_op
from .block_mask import loaded
from .reference import sparse_attention as _sparse


def reference(q, k, v, key_padding, scale, pattern, window, sinks, block, window_blocks, mask_fn, causal):
    mask_mod = None
    if pattern == "block":
        mask_mod = loaded(mask_fn)
        if causal:
            mask_mod = and_masks(causal_mask(), mask_mod)
    offset = causal_offset(q.shape[-2], k.shape[-2]) if causal or pattern != "block" else 0
    return _sparse(q, k, v, scale=scale, pattern=pattern, window=window, sinks=sinks, block=block,
                   window_blocks=window_blocks, mask_mod=mask_mod, key_padding=key_padding, q_offset=offset)


@torch.library.custom_op("attncc::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
                     scale: float, pattern: str, window: int, sinks: int, block: int, window_blocks: int,
                     mask_fn: str | None, causal: bool) -> torch.Tensor:
    return reference(q, k, v, key_padding, scale, pattern, window, sinks, block, window_blocks, mask_fn,
                     causal).contiguous()


reference_op(sparse_attention, reference, tensors=4)
