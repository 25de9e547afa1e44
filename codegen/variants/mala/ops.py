"""The MALA variant's op: attncc::mala_attention(q, k, v, key_padding?, causal, sim_scale?).
It runs the reference (reference.py); its gradient recomputes the reference (base.reference_op)."""

from __future__ import annotations

import torch

from ..base import reference_op
from .reference import mala_attention as _mala


def reference(q, k, v, key_padding, causal, sim_scale):
    return _mala(q, k, v, causal=causal, sim_scale=sim_scale, key_padding=key_padding)


@torch.library.custom_op("attncc::mala_attention", mutates_args=())
def mala_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
                   causal: bool, sim_scale: float | None) -> torch.Tensor:
    return reference(q, k, v, key_padding, causal, sim_scale).contiguous()


reference_op(mala_attention, reference, tensors=4)
