"""The registry of variants: each config type, and the Variant that serves it.

A policy names a variant by its config's `variant` name; the passes look the Variant up by the
config's type. Adding a variant: write its folder (see base.py for what it holds), then add one line
below.
"""

from __future__ import annotations

from typing import Any

from attncc.config import VariantConfig

from . import keep, linear, mala, softmax, softplus, sparse, sqa
from .attnres import AttnRes, ResidualKeep
from .base import KERNEL_CHOICES, SiteCall, Variant, same_size

ATTENTION: dict[type[VariantConfig], Variant] = {
    keep.Keep: keep.VARIANT,
    softmax.Softmax: softmax.VARIANT,
    linear.Linear: linear.VARIANT,
    sparse.Sparse: sparse.VARIANT,
    softplus.Softplus: softplus.VARIANT,
    mala.Mala: mala.VARIANT,
    sqa.SQA: sqa.VARIANT,
}
RESIDUAL: tuple[type[VariantConfig], ...] = (ResidualKeep, AttnRes)


def variant_for(config: Any) -> Variant:
    """The Variant that serves an attention config."""
    return ATTENTION[type(config)]


__all__ = ["ATTENTION", "KERNEL_CHOICES", "RESIDUAL", "SiteCall", "Variant", "same_size", "variant_for"]
