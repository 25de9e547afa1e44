"""The linear variant's op: attncc::linear_attention(q, k, v, key_padding?, decay?, causal, feature_map,
normalize, eps). Tensors are run-time inputs; the rest are the site's constants. It runs the
reference (reference.py); its gradient recomputes the reference under autograd (base.reference_op).
"""

from __future__ import annotations

import torch

from ..base import reference_op
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
