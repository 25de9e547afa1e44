"""The sparse variant's op for patterns without a kernel (a user's block mask, or any pattern the
flash kernel cannot take): attncc::sparse_attention(q, k, v, key_padding?, scale, pattern, window,
sinks, block, window_blocks, mask_fn?, causal). It runs the reference (reference.py); its gradient
recomputes the reference (base.reference_op). sliding_window and power run on softmax's flash kernel.

attncc::window_state(q, k, v, key_padding?, scale, window, sinks, step, kernels, site) is a sliding window's
prefill and decode step for attncc.decode's window cache (flash kernel or reference).
"""

from __future__ import annotations

import torch

from attncc.codegen import emit
from attncc.codegen.masks import and_masks, causal as causal_mask, causal_offset

from ..base import reference_op
from ..softmax.ops import flash, flash_spec, flash_unsupported
from ..softmax.reference import softmax_attention
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


# --- a sliding window decoded from its window cache (attncc.decode) -----------------------------------

@torch.library.custom_op("attncc::window_state", mutates_args=())
def window_state(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None, scale: float,
                 window: int, sinks: int, step: bool, kernels: str, site: str) -> torch.Tensor:
    """Sliding-window attention with sinks for a StateCache layer (attncc.decode). A prefill (not `step`):
    the causal window over the prompt, as the graph rewrite computes it. A decode `step`: k, v
    are the layer's window cache, the sinks and the last `window` keys in slot order (a ring), and
    `key_padding` marks the filled slots; every filled slot is in the queries' window, so the step is
    softmax over them, in any order. Inference only: no backward."""
    prefill = not step
    if prefill:
        constants = dict(causal=True, pattern="sliding_window", window=window, sinks=sinks)
    else:
        constants = dict(causal=False, pattern="dense")
    why = ("reference" if kernels == "reference" or (kernels == "auto" and not q.is_cuda)
           else flash_unsupported(q, k, v))
    if why is None:
        emit.ran(site, flash_spec(q, k, padded=key_padding is not None, **constants).name
                 + (" (prefill)" if prefill else " (over the window cache)"))
        return flash(q, k, v, key_padding, scale=scale, **constants)
    emit.ran(site, "reference" + ("" if why == "reference" else f" ({why})"))
    if prefill:
        return reference(q, k, v, key_padding, scale, "sliding_window", window, sinks, 0, 0, None, True).contiguous()
    mask = None if key_padding is None else key_padding[:, None, None, :]
    return softmax_attention(q, k, v, scale=scale, mask=mask).contiguous()


@window_state.register_fake
def _(q, k, v, key_padding, scale, window, sinks, step, kernels, site):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))
