"""mala: magnitude-aware linear attention. VARIANTS.md §6."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attncc.config import VariantConfig
from attncc.errors import PolicyError
from attncc.facts import SiteFacts

from ..base import SiteCall, Variant
from ..linear import chunked
from ..linear import ops as linear_ops
from . import ops


@dataclass(frozen=True)
class Mala(VariantConfig):
    """Magnitude-aware linear attention; sim_scale None = the official 1/(sqrt(D)*N). VARIANTS.md §6."""

    variant: ClassVar[str] = "mala"
    sim_scale: float | None = None

    def _check(self) -> None:
        if self.sim_scale is not None and self.sim_scale <= 0:
            raise PolicyError(f"must be > 0, got {self.sim_scale!r}", "sim_scale")


class MalaVariant(Variant):
    config = Mala
    title = "MALA"
    scaled = False

    def constants(self, site: SiteFacts, config: Mala) -> dict:
        return dict(causal=site.causal, sim_scale=config.sim_scale)

    def run(self, call: SiteCall, q, k, v, mask, scale, dropout_p) -> torch.Tensor:
        c = call.constants
        keys = call.keys(mask, q)
        why = chunked.supports(q.shape[-1], v.shape[-1], q.dtype, "elu1") if q.dim() == 4 else \
            "MALA's kernel needs 4-D [B, H, T, D] tensors"
        why = why or call.queries_end_keys(q, k)
        if why or not call.use_kernels(q, k, v):
            call.ran_reference(q, k, v, why=why)
            return ops.mala_attention(q, k, v, keys, c["causal"], c["sim_scale"])
        spec = linear_ops.kernel_spec(q, k, causal=c["causal"], feature_map="elu1", normalize=False, decay="none",
                                      padded=keys is not None, fp32_out=True, with_den=True)
        call.ran(f"mala on {spec.name}")
        return ops.from_linear_sums(q, k, v, keys, c["causal"], c["sim_scale"])


VARIANT = MalaVariant()
