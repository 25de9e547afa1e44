"""The softplus variant's op: attncc::softplus_attention(q, k, v, key_padding?, causal, reweight_p).
It runs the reference (reference.py); its gradient recomputes the reference (base.reference_op)."""

from __future__ import annotations

import torch

from ..base import reference_op
from .reference import softplus_attention as _softplus


def reference(q, k, v, key_padding, causal, reweight_p):
    return _softplus(q, k, v, causal=causal, reweight_p=reweight_p, key_padding=key_padding)


@torch.library.custom_op("attncc::softplus_attention", mutates_args=())
def softplus_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
                       causal: bool, reweight_p: float) -> torch.Tensor:
    return reference(q, k, v, key_padding, causal, reweight_p).contiguous()


reference_op(softplus_attention, reference, tensors=4)
