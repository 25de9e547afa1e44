"""linear: kernelized linear attention (Katharopoulos; Based's taylor2; Lightning decay). VARIANTS.md §2-4."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from attncc.config import VariantConfig
from attncc.errors import PolicyError
from attncc.facts import SiteFacts

from ..base import SiteCall, Variant
from . import chunked, ops
from .reference import constant_decay_rates, lightning_decay_rates


@dataclass(frozen=True)
class Linear(VariantConfig):
    """Kernelized linear attention (Katharopoulos; Based's taylor2; Lightning decay). VARIANTS.md §2-4."""

    variant: ClassVar[str] = "linear"
    minimum: ClassVar[dict[str, float]] = {"eps": 0}
    feature_map: Literal["elu1", "relu", "identity", "taylor2"] = "elu1"
    normalize: bool = True
    decay: Literal["none", "lightning"] | float = "none"
    eps: float = 1e-6

    def _check(self) -> None:
        if isinstance(self.decay, float) and not 0 < self.decay <= 1:
            raise PolicyError(f"a fixed decay must be in (0, 1], got {self.decay!r}", "decay")


NO_LAYER_COUNT = ("lightning decay depends on the model's number of layers, which attncc reads from the model "
                  "registered by attncc.prepare(model) or attncc.compile(model, policy) (the length of the module "
                  "list holding this site's layer); call one of them before compiling")


class LinearVariant(Variant):
    config = Linear
    title = "linear attention"
    scaled = False

    def needs_layers(self, config: Linear) -> bool:
        return config.decay == "lightning"

    def check(self, site: SiteFacts, config: Linear) -> str | None:
        refusal = super().check(site, config)
        if refusal or config.decay == "none":
            return refusal
        if not site.causal:
            return "linear attention with decay is causal-only; this site is bidirectional"
        if site.heads is None:
            return "linear attention with decay needs a static head count (one rate per head)"
        if config.decay == "lightning" and site.layers is None:
            return NO_LAYER_COUNT
        return None

    def constants(self, site: SiteFacts, config: Linear) -> dict:
        rates = None
        if config.decay == "lightning":
            rates = lightning_decay_rates(site.heads, site.layer or 0, site.layers)
        elif config.decay != "none":
            rates = constant_decay_rates(site.heads, float(config.decay))
        return dict(causal=site.causal, feature_map=config.feature_map, normalize=config.normalize,
                    decay_rates=None if rates is None else tuple(float(r) for r in rates), eps=config.eps)

    def run(self, call: SiteCall, q, k, v, mask, scale, dropout_p) -> torch.Tensor:
        c = call.constants
        rates = c["decay_rates"]
        decay = None if rates is None else torch.tensor(rates, dtype=torch.float32, device=q.device)
        keys = call.keys(mask, q)
        why = chunked.supports(q.shape[-1], v.shape[-1], q.dtype, c["feature_map"]) if q.dim() == 4 else \
            "linear kernel needs 4-D [B, H, T, D] tensors"
        why = why or call.queries_end_keys(q, k)
        if why or not call.use_kernels(q, k, v):
            call.ran_reference(q, k, v, why=why)
            return ops.linear_attention(q, k, v, keys, decay, c["causal"], c["feature_map"], c["normalize"],
                                        c["eps"])
        call.ran(ops.kernel_spec(q, k, causal=c["causal"], feature_map=c["feature_map"], normalize=c["normalize"],
                                 decay=self.decay_kind(rates), padded=keys is not None).name)
        o, *_ = ops.linear_chunked(q, k, v, keys, decay, c["causal"], c["feature_map"], c["normalize"], c["eps"],
                                   False, False)  # den only to normalize
        return o

    @staticmethod
    def decay_kind(rates: tuple[float, ...] | None) -> str:
        return "none" if rates is None else "rates"


VARIANT = LinearVariant()
