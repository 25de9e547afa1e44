"""Classify an attention mask from its values: none, causal, sliding_window(w), padding, combinations, other.

The mask is whatever a site adds to (or fills into) its scores, evaluated on the example inputs as a
boolean "may attend" tensor [B', H', Tq, Tk]. Classification tests it against the structural
candidates (all, causal, causal window w) combined with a per-key padding vector read off the mask
itself (a key is padding when no query attends to it). For a graph compiled with symbolic sizes
the caller evaluates the mask at more than one length and requires the same answer each time.
"""

from __future__ import annotations

import torch

from attncc.facts import OTHER, MaskKind, queries_end_keys


def allowed_from_bias(bias: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(may-attend bool tensor, whether the allowed entries add exactly zero) of an additive or bool mask."""
    if bias.dtype == torch.bool:
        return bias, True
    bias = bias.float()
    floor = torch.finfo(torch.float16).min / 2  # finfo(dtype).min of any float dtype, and -inf
    allowed = bias > floor
    return allowed, bool((bias[allowed] == 0).all())


def classify(allowed: torch.Tensor, pure: bool = True, *, decoding: bool = False) -> MaskKind:
    """Classify a boolean may-attend tensor broadcastable to [B, H, Tq, Tk].

    Causal structures put the queries at the end of the keys (query i is position Tk - Tq + i: a
    decode step or chunked prefill over a cache), and need the queries' own keys to be real (a static
    cache, whose unused slots trail the queries, is not causal here: it stays none + padding). With
    one query every visible key is also "none"; `decoding` (a self-attention decode step) prefers
    causal then, so that position-dependent variants see the query's position.
    """
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
    i = torch.arange(tk - tq, tk, device=allowed.device)[:, None]  # the queries' positions
    j = torch.arange(tk, device=allowed.device)[None, :]

    def same(structure: torch.Tensor) -> bool:
        expected = structure[None] & keys[:, None, :]
        return bool((allowed == expected).all())

    everything = same(torch.ones(tq, tk, dtype=torch.bool, device=allowed.device))
    ends_keys = queries_end_keys(keys, tq)
    if everything and not (decoding and tq == 1 and ends_keys):
        return MaskKind("none", padding=padded)
    if not ends_keys:
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
