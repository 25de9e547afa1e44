"""Masks read at run time: a site's key padding, and the check of the structure it was compiled for.

Dynamo guards shapes, not values. A site whose mask depends on input values (an `attention_mask`, a
buffer) was classified from one example: its structure (none, causal, sliding window) is a hypothesis. Every call reads the mask again here:

    keys[b, j]  = some query of batch b may attend key j              (key padding, True = real key)
    holds       = allowed == structure(Tq, Tk) & keys[b, None, j]     (and an additive mask adds 0
                                                                       wherever it allows)

`mask_keys` is the op a variant's site calls: it returns the key padding, or raises `MaskMismatch`
naming the site when the mask no longer has its structure (a variant cannot serve other masks). A
softmax site calls `mask_check` instead, which returns the key padding and whether the structure
holds, and falls back to the dense mask when it does not (ops.flash_attention_checked).

The sites of one graph that read the same mask share one check (`variants.base.shared`): the check
runs on every call of the compiled graph, once per mask rather than once per layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attncc.errors import MaskMismatch
from attncc.facts import queries_end_keys

from .masks import NO_KEY


def allowed(mask: Tensor) -> Tensor:
    """May-attend booleans of a bool mask (True = attend) or an additive mask."""
    return mask if mask.dtype == torch.bool else mask > NO_KEY


def keys_per_head(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(may-attend [B', H', Tq', Tk], keys [B', H', Tk]: the keys some query attends) of a mask that
    broadcasts to [B, H, Tq, Tk] (fewer leading dims are unsqueezed)."""
    ok = allowed(mask)
    while ok.dim() < 4:
        ok = ok.unsqueeze(0)
    return ok, ok.any(dim=-2)


def structure(kind: str, window: int, tq: int, tk: int, device: torch.device) -> Tensor | None:
    """[Tq, Tk] may-attend of a structure, or None when it cannot apply to these sizes. Causal queries
    end the key sequence (query i is position Tk - Tq + i, codegen/masks.py)."""
    if kind == "none":
        return torch.ones(tq, tk, dtype=torch.bool, device=device)
    if tq > tk or kind not in ("causal", "sliding_window"):
        return None
    i = torch.arange(tk - tq, tk, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    out = j <= i
    return out & (i - j < window) if kind == "sliding_window" else out


def check(mask: Tensor, kind: str, window: int, tq: int) -> tuple[Tensor, str | None]:
    """(keys [B', Tk], None when the mask is `kind` & key padding for `tq` queries, else why not).

    The mask broadcasts to [B', H', Tq, Tk] (fewer leading dims are unsqueezed; a mask with one row
    is shared by every query). Causal queries that end a longer key sequence (a decode step) must
    have their own keys real: a cache whose unused slots trail the queries (a static cache) puts the
    queries elsewhere than at the end.
    """
    ok, per_head = keys_per_head(mask)
    ok = ok.expand(*ok.shape[:-2], tq, ok.shape[-1])
    keys = per_head[:, 0]
    if mask.dtype != torch.bool and not bool((torch.where(ok, mask, 0) == 0).all()):
        return keys, "an additive mask adds values other than 0 where it allows a key"
    if not bool((per_head == keys[:, None]).all()):
        return keys, "the mask differs between heads"
    tq, tk = ok.shape[-2:]
    shape = structure(kind, window, tq, tk, mask.device)
    if shape is None:
        return keys, f"a {tq}x{tk} mask cannot be {kind}"
    if not bool((ok == (shape & keys[:, None, None, :])).all()):
        return keys, f"the mask is not {describe(kind, window)} with key padding"
    if kind != "none" and not queries_end_keys(keys, tq):
        return keys, f"the {tq} queries do not end the {tk} keys (keys after them are masked, as in a static cache)"
    return keys, None


def describe(kind: str, window: int) -> str:
    return f"sliding_window({window})" if kind == "sliding_window" else kind


def batch_keys(keys: Tensor, batch: int) -> Tensor:
    """[B', Tk] -> [B, Tk] (a mask shared by the batch has B' = 1)."""
    return keys.expand(batch, keys.shape[-1])


@torch.library.custom_op("attncc::mask_keys", mutates_args=())
def mask_keys(mask: Tensor, kind: str, window: int, tq: int, site: str) -> Tensor:
    """The key padding [B', Tk] of a mask of structure `kind` for `tq` queries; raises MaskMismatch
    when it is not one."""
    keys, problem = check(mask, kind, window, tq)
    if problem:
        raise MaskMismatch(
            f"attncc: site {site}: {problem}, but the site was compiled for {describe(kind, window)} masks "
            "(classified from the first call's mask) and its variant can serve no other. Compile with "
            "`softmax` or `keep` for this site, or call it with masks of that structure."
        )
    return keys.contiguous()


@mask_keys.register_fake
def _(mask, kind, window, tq, site):
    lead = mask.shape[0] if mask.dim() == 4 else 1
    return mask.new_empty((lead, mask.shape[-1]), dtype=torch.bool)


@torch.library.custom_op("attncc::mask_check", mutates_args=())
def mask_check(mask: Tensor, kind: str, window: int, tq: int) -> tuple[Tensor, Tensor]:
    """(key padding [B', Tk], whether the mask is `kind` & key padding for `tq` queries: a CPU bool)."""
    keys, problem = check(mask, kind, window, tq)
    return keys.contiguous(), torch.tensor(problem is None)


@mask_check.register_fake
def _(mask, kind, window, tq):
    lead = mask.shape[0] if mask.dim() == 4 else 1
    return mask.new_empty((lead, mask.shape[-1]), dtype=torch.bool), torch.empty((), dtype=torch.bool)
