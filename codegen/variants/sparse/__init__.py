"""sparse: softmax attention over a sparse allowed set. VARIANTS.md §8.

sliding_window (+ sinks) and power run on softmax's flash kernel (variants/softmax/flash.py), which
takes them as patterns; a user's block mask, and any site the kernel cannot take, run the
reference op (ops.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Literal

import torch

from attncc.config import VariantConfig
from attncc.errors import PolicyError
from attncc.facts import SiteFacts

from ..base import SiteCall, Variant, scaled, served
from ..softmax import ops as flash_ops
from . import ops
from .block_mask import MASK_REF, load_mask, loaded


@dataclass(frozen=True)
class Sparse(VariantConfig):
    """Sparse softmax attention: sliding window + sinks, PowerAttention, or a block mask. VARIANTS.md §8."""

    variant: ClassVar[str] = "sparse"
    minimum: ClassVar[dict[str, float]] = {"window": 1, "sinks": 0, "block": 1, "window_blocks": 1}
    pattern: Literal["sliding_window", "power", "block"] = "sliding_window"
    window: int = 1024
    sinks: int = 0
    block: int = 128
    window_blocks: int = 5
    mask: str | None = None

    def _check(self) -> None:
        if self.pattern == "block" and self.mask is None:
            raise PolicyError("pattern 'block' requires a mask ('module:function' naming a mask_mod)", "mask")
        if self.pattern != "block" and self.mask is not None:
            raise PolicyError(f"only pattern 'block' takes a mask, not pattern {self.pattern!r}", "mask")
        if self.mask is not None and not MASK_REF.fullmatch(self.mask):
            raise PolicyError(f"expected 'module:function', got {self.mask!r}", "mask")

    def load_mask(self, allowed: Iterable[str]) -> Callable[..., Any]:
        """Import (from an `allowed` module), check and register the mask_mod(b, h, q_idx, kv_idx) named by `mask`."""
        if self.mask is None:
            raise PolicyError(f"pattern {self.pattern!r} has no mask to load", "mask")
        return load_mask(self.mask, allowed)


class SparseVariant(Variant):
    config = Sparse
    title = "sparse attention"

    def load(self, config: Sparse, *, mask_modules: tuple[str, ...]) -> None:
        if config.pattern == "block":
            config.load_mask(mask_modules)

    def check(self, site: SiteFacts, config: Sparse) -> str | None:
        if config.pattern == "block":
            refusal = served(site, ("none", "causal"), "sparse block attention")
            if not refusal:
                loaded(config.mask)  # loaded when the backend was built; fail now, not inside the graph
            return refusal
        return served(site, ("causal",), f"sparse {config.pattern} attention (a causal pattern)")

    def constants(self, site: SiteFacts, config: Sparse) -> dict:
        return dict(pattern=config.pattern, window=config.window, sinks=config.sinks, block=config.block,
                    window_blocks=config.window_blocks, mask_fn=config.mask, causal=site.causal)

    def run(self, call: SiteCall, q, k, v, mask, scale, dropout_p) -> torch.Tensor:
        c = call.constants
        q, scale = scaled(q, scale)
        keys = call.keys(mask, q)
        pattern = c["pattern"]
        why = "no block-sparse kernel yet" if pattern == "block" else flash_ops.flash_unsupported(q, k, v)
        why = why or call.queries_end_keys(q, k)
        if why or not call.use_kernels(q, k, v):
            call.ran_reference(q, k, v, why=why)
            if pattern == "sliding_window" and q.shape[-2] != k.shape[-2]:
                k, v, keys = window_keys(q, k, v, keys, c["window"], c["sinks"])
            return ops.sparse_attention(q, k, v, keys, scale, pattern, c["window"], c["sinks"], c["block"],
                                        c["window_blocks"], c["mask_fn"], c["causal"])
        pattern_constants = dict(window=c["window"], sinks=c["sinks"], block=c["block"],
                                 window_blocks=c["window_blocks"])
        call.ran(flash_ops.flash_spec(q, k, causal=True, pattern=pattern, padded=keys is not None,
                                      **pattern_constants).name)
        return flash_ops.flash(q, k, v, keys, scale=scale, causal=True, pattern=pattern, **pattern_constants)


def window_keys(q, k, v, keys, window: int, sinks: int):
    """(k, v, key padding) cut to what a sliding window with sinks lets queries that end the keys reach:
    the sinks and the last Tq + window - 1 keys. A decode step then reads O(window) keys, not the cache.

    Exact: with the first `start - sinks` non-sink keys dropped, every kept key and every query move
    back by the same amount (the offset Tk - Tq shrinks with Tk), so distances, causality and which
    keys are sinks are unchanged."""
    tq, tk = q.shape[-2], k.shape[-2]
    start = torch.sym_max(sinks, tk - tq - window + 1)
    cut = lambda x: torch.cat([x[..., :sinks, :], x[..., start:, :]], dim=-2)  # noqa: E731
    if keys is not None:
        keys = torch.cat([keys[:, :sinks], keys[:, start:]], dim=-1)
    return cut(k), cut(v), keys


VARIANT = SparseVariant()
