"""Typed facts about an attention site: what the passes establish and the variants decide from.

`MaskKind` is the site's mask structure (patterns/masks.py classifies it; a variant's op is
specialized on it; `queries_end_keys` is the alignment rule both the classifier and the run-time
check apply). `SiteFacts` is what a variant may look at when it decides whether it can serve
a site and which constants its op gets; it carries no graph nodes, so variants stay out of FX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class MaskKind:
    """What a site's mask is: a structure, plus whether key padding and a run-time check come with it.

    structure  none | causal | sliding_window | other (other: kept dense, applied as it is)
    padding    keys may be padding: the op reads the key padding off the mask at run time
    checked    the mask depends on input values: the structure was read off the example and is a
               hypothesis, which the op checks on every call
    """

    structure: str
    window: int | None = None
    padding: bool = False
    checked: bool = False

    @property
    def kind(self) -> str:
        """The report's spelling: none, causal, sliding_window, padding, causal+padding, ..., other."""
        if self.structure == "none" and self.padding:
            return "padding"
        return self.structure + ("+padding" if self.padding and self.structure != "other" else "")

    @property
    def causal(self) -> bool:
        return self.structure in ("causal", "sliding_window")

    @property
    def structural(self) -> bool:
        """A structure kernels and variants can serve (every kind but `other`)."""
        return self.structure != "other"

    @property
    def needs_tensor(self) -> bool:
        """Whether the site's op needs the mask tensor: anything but a plain none/causal compile-time fact."""
        return self.padding or self.checked or self.structure not in ("none", "causal")

    def __str__(self) -> str:
        text = self.kind
        if self.structure == "sliding_window":
            text = text.replace("sliding_window", f"sliding_window({self.window})")
        return text


NONE = MaskKind("none")
CAUSAL = MaskKind("causal")
OTHER = MaskKind("other")


def queries_end_keys(keys: torch.Tensor, tq: int) -> bool:
    """Whether tq causal queries can sit at the end of the keys, given which keys are real (keys
    [B', Tk] bool): as many queries as keys, or fewer whose own keys (the last tq) are all real. A cache
    whose unused slots trail the queries (a static cache) puts them elsewhere."""
    tk = keys.shape[-1]
    return tq == tk or (tq < tk and bool(keys[:, tk - tq:].all()))


@dataclass(frozen=True)
class SiteFacts:
    """One attention site as a variant sees it.

    q_shape, k_shape  example shapes of q and k as the op receives them ([..., H, T, D]; sizes may be
                      SymInts in a graph with dynamic shapes)
    heads, kv_heads, head_dim  static counts, None when not static
    layer             the site's layer index; layers: the whole model's layer count, None when unknown
    dropout           the attention dropout probability (None: a value known only at run time)
    """

    mask: MaskKind
    q_shape: tuple[Any, ...]
    k_shape: tuple[Any, ...]
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    layer: int | None = None
    layers: int | None = None
    dropout: float | None = 0.0

    @property
    def causal(self) -> bool:
        return self.mask.causal
