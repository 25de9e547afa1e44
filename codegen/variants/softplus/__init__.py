"""softplus: LSSA / LSSAR softplus attention with re-weighting power p (0 = LSSA only). VARIANTS.md §5."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attncc.config import VariantConfig
from attncc.facts import SiteFacts

from ..base import SiteCall, Variant
from . import flash, ops


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
        keys = call.keys(mask, q)
        why = flash.supports(q.shape[-1], v.shape[-1], q.dtype, c["reweight_p"]) if q.dim() == 4 else \
            "softplus kernel needs 4-D [B, H, T, D] tensors"
        why = why or call.queries_end_keys(q, k)
        if why or not call.use_kernels(q, k, v):
            call.ran_reference(q, k, v, why=why)
            return ops.softplus_attention(q, k, v, keys, c["causal"], c["reweight_p"])
        call.ran(ops.kernel_spec(q, k, causal=c["causal"], padded=keys is not None, reweight_p=c["reweight_p"]).name)
        if c["reweight_p"] > 0:
            return ops.lssar(q, k, v, keys, c["causal"], c["reweight_p"])
        return ops.lssa(q, k, v, keys, c["causal"])


VARIANT = SoftplusVariant()
