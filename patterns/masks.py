"""Classify an attention mask from its values: none, causal, sliding_window(w), padding, combinations, other.

The mask is whatever a site adds to (or fills into) its scores, evaluated on the example inputs as a
boolean "may attend" tensor [B', H', Tq, Tk]. Classification tests it against the structural
candidates (all, causal, causal window w) combined with a per-key padding vector read off the mask
itself (a key is padding when no query attends to it). For a graph compiled with symbolic sizes
the caller evaluates the mask at more than one length and requires the same answer each time.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def __str__(self) -> str:
        text = self.kind
        if self.structure == "sliding_window":
            text = text.replace("sliding_window", f"sliding_window({self.window})")
        return text


NONE = MaskKind("none")
CAUSAL = MaskKind("causal")
OTHER = MaskKind("other")


def allowed_from_bias(bias: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(may-attend bool tensor, whether the allowed entries add exactly zero) of an additive or bool mask."""
    if bias.dtype == torch.bool:
        return bias, True
    bias = bias.float()
    floor = torch.finfo(torch.float16).min / 2  # finfo(dtype).min of any float dtype, and -inf
    allowed = bias > floor
    return allowed, bool((bias[allowed] == 0).all())


def classify(allowed: torch.Tensor, pure: bool = True) -> MaskKind:
    """Classify a boolean may-attend tensor broadcastable to [B, H, Tq, Tk]."""
    if not pure:
        return OTHER
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    if allowed.dim() > 4:
        return OTHER
    if allowed.shape[1] > 1 and not bool((allowed == allowed[:, :1]).all()):
        return OTHER
    allowed = allowed[:, 0]  # [B', Tq, Tk]
    tq, tk = allowed.shape[-2:]
    keys = allowed.any(dim=-2)  # [B', Tk]: a key nobody attends is padding
    padded = not bool(keys.all())
    i = torch.arange(tq, device=allowed.device)[:, None]
    j = torch.arange(tk, device=allowed.device)[None, :]

    def same(structure: torch.Tensor) -> bool:
        expected = structure[None] & keys[:, None, :]
        return bool((allowed == expected).all())

    if same(torch.ones(tq, tk, dtype=torch.bool, device=allowed.device)):
        return MaskKind("none", padding=padded)
    if tq != tk:
        return OTHER
    causal = j <= i
    if same(causal):
        return MaskKind("causal", padding=padded)
    inside = allowed & causal[None]
    if not bool(inside.any()):
        return OTHER
    distance = (i - j).expand(tq, tk)[None].expand_as(inside)
    window = int(distance[inside].max()) + 1
    if same(causal & (i - j < window)):
        return MaskKind("sliding_window", window, padding=padded)
    return OTHER
