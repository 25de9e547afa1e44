"""softplus: LSSA / LSSAR softplus attention with re-weighting power p (0 = LSSA only). VARIANTS.md §5."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attncc.config import VariantConfig
from attncc.facts import SiteFacts

from ..base import SiteCall, Variant
from . import ops


@dataclass(frozen=True)
class Softplus(VariantConfig):
    """LSSA / LSSAR softplus attention with re-weighting power p (0 = LSSA only). VARIANTS.md §5."""

    variant: ClassVar[str] = "softplus"
    minimum: ClassVar[dict[str, float]] = {"reweight_p": 0}
    reweight_p: float = 15.0


class SoftplusVariant(Variant):
    config = Softplus
    title = "softplus attention"
    scaled = False

    def constants(self, site: SiteFacts, config: Softplus) -> dict:
        return dict(causal=site.causal, reweight_p=float(config.reweight_p))

    def run(self, call: SiteCall, q, k, v, mask, scale, dropout_p) -> torch.Tensor:
        c = call.constants
        call.ran_reference(q, k, v)
        return ops.softplus_attention(q, k, v, call.keys(mask, q.shape[0]), c["causal"], c["reweight_p"])


VARIANT = SoftplusVariant()
