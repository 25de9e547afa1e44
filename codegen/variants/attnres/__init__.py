"""attnres: Attention Residuals, softmax attention over depth (VARIANTS.md §9); and residual `keep`.

The residual stream's rewrite is passes/residual.py; the aggregation it inserts is `aggregate` (ops.py):
the fused Triton kernel (fused.py) on CUDA or with kernels="triton", else reference.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attncc.config import VariantConfig

from .ops import aggregate

__all__ = ["AttnRes", "ResidualKeep", "aggregate"]


@dataclass(frozen=True)
class ResidualKeep(VariantConfig):
    """Leave the residual adds as they are."""

    variant: ClassVar[str] = "keep"


@dataclass(frozen=True)
class AttnRes(VariantConfig):
    """Attention residuals over depth; block_size sublayers per block (1 = Full AttnRes). VARIANTS.md §9.

    exact_start (a deviation from the paper, off by default): every aggregation is scaled by its number
    of sources S. With zero queries the weights are 1/S, so the scaled aggregation is the plain sum of
    the sources, which in a pre-norm stream is exactly the original residual stream: the converted
    model starts from the original's function (the paper's form starts from the mean, which the norms
    hide only up to their eps, and which readers of the raw stream see as it is)."""

    variant: ClassVar[str] = "attnres"
    minimum: ClassVar[dict[str, float]] = {"block_size": 1}
    block_size: int = 1
    exact_start: bool = False
