"""softmax: attncc's own softmax attention, the same math as the site it replaces (VARIANTS.md §1).

Its op is the flash kernel (flash.py, derived in README.md) when the mask's structure is one the
kernel serves (none, causal, sliding window, each with key padding) and the tensors suit it; the
reference (reference.py) otherwise. A mask that depends on input values goes to
`attncc::flash_attention_checked`, which checks it on every call and falls back to the dense mask.
The sparse variant runs its patterns on the same kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from attncc.codegen import runtime_mask
from attncc.config import VariantConfig
from attncc.facts import SiteFacts

from ..base import SiteCall, Variant, scaled
from . import ops, route
from .reference import softmax_attention

DenseKernel = Literal["auto", "attncc", "cudnn", "flash"]


@dataclass(frozen=True)
class Softmax(VariantConfig):
    """attncc's own softmax attention op (same math as the original). `kernel`: what a dense site (mask
    none or causal, no padding) runs on CUDA: the fastest measured (auto), attncc's flash kernel, or
    SDPA's cuDNN or FlashAttention-2 backend (route.py)."""

    variant: ClassVar[str] = "softmax"
    kernel: DenseKernel = "auto"


class SoftmaxVariant(Variant):
    config = Softmax
    title = "softmax attention"
    structures = ("none", "causal", "sliding_window", "other")
    takes_dropout = True

    def check(self, site: SiteFacts, config: Softmax) -> str | None:
        return None  # the same math as any matched site: every site can take it

    def constants(self, site: SiteFacts, config: Softmax) -> dict:
        return {"kernel": config.kernel}

    def run(self, call: SiteCall, q, k, v, mask, scale, dropout_p) -> torch.Tensor:
        return attention(call, q, k, v, mask, scale, dropout_p)


def attention(call: SiteCall, q, k, v, mask, scale, dropout_p=0.0) -> torch.Tensor:
    """Softmax attention of a site with the site's own mask (`call.mask` says what it is).

    `mask` is None for a none or causal structure known at compile time without padding, else the
    site's mask as the model computed it. The flash kernel runs when it can serve the structure;
    otherwise the reference, which applies the mask as given. SQA sites call this too.
    """
    kind = call.mask
    causal = kind.causal
    why = "the flash kernel serves none, causal, sliding-window and padding masks" if not kind.structural else \
        ops.flash_unsupported(q, k, v, dropout_p)
    why = why or call.queries_end_keys(q, k)
    if why or not call.use_kernels(q, k, v):
        call.ran_reference(q, k, v, why=why)
        if mask is not None:
            return softmax_attention(q, k, v, scale=scale, mask=mask, dropout_p=dropout_p)
        return softmax_attention(q, k, v, scale=scale, causal=causal, dropout_p=dropout_p)
    q, scale = scaled(q, scale)
    window = int(kind.window or 0)
    if kind.checked:
        return ops.flash_checked(q, k, v, mask, call.mask_check(mask, q), scale=scale, kind=kind.structure,
                                 window=window, site=call.key)
    pattern = "sliding_window" if kind.structure == "sliding_window" else "dense"
    if pattern == "dense" and not kind.padding and call.kernels == "auto":
        choice = route.choose(call.constants.get("kernel", "auto"), q, k, v, scale=scale, causal=causal)
        name = ops.flash_spec(q, k, causal=causal, pattern=pattern).name if choice.kernel == "attncc" else \
            f"sdpa_{choice.kernel}"
        call.ran(f"{name} ({choice.note})")
        return route.run(choice.kernel, q, k, v, scale=scale, causal=causal)
    keys = static_keys(mask, q) if kind.padding else None
    call.ran(ops.flash_spec(q, k, causal=causal, pattern=pattern, window=window, padded=kind.padding).name)
    return ops.flash(q, k, v, keys, scale=scale, causal=causal, pattern=pattern, window=window)


def static_keys(mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[B, Tk] key padding of a mask whose structure is a compile-time fact (no check needed)."""
    _, per_head = runtime_mask.keys_per_head(mask)
    return runtime_mask.batch_keys(per_head.any(dim=1), q.shape[0])


VARIANT = SoftmaxVariant()
