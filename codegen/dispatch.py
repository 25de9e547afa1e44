"""What a rewritten site calls: one function per variant, choosing a kernel or the reference.

The rewrite inserts `call_function(<variant>_site, (q, k, v, mask, scale), {constants})` into the
dynamo graph. Tensors are arguments; everything the kernel specializes on (head dim, causality,
pattern, window, ...) is a Python constant of the call, so it is fixed per site when AOT traces the
graph. The choice between kernel and reference is made at trace time from the tensors' device and
the `kernels` option: `reference` always uses the reference, `auto` uses kernels on CUDA tensors,
`triton` uses kernels everywhere (on the CPU that needs TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

from attncc.codegen.reference.softmax import softmax_attention

KERNEL_CHOICES = ("auto", "triton", "reference")


def use_kernels(kernels: str, *tensors: torch.Tensor) -> bool:
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels={kernels!r}; valid: {', '.join(KERNEL_CHOICES)}")
    if kernels == "reference":
        return False
    if kernels == "triton":
        return True
    return all(t.is_cuda for t in tensors)


def flash_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> str | None:
    """Why the flash kernel cannot run these tensors (the reference runs instead), or None."""
    from attncc.codegen.triton.flash import supports

    if q.dim() != 4:
        return "flash kernel needs 4-D [B, H, T, D] tensors"
    if v.shape[-1] != q.shape[-1]:
        return f"flash kernel needs the value head dim ({v.shape[-1]}) to equal the head dim ({q.shape[-1]})"
    if dropout_p:
        return "flash kernel has no attention dropout"
    ok, reason = supports(q.shape[-1], q.dtype)
    return None if ok else reason


def kernel_mask(mask_kind: str) -> tuple[str, bool, int, bool] | None:
    """(pattern, causal, window, needs key padding) for a mask kind the flash kernel serves, else None."""
    base, _, padding = mask_kind.partition("+")
    padded = base == "padding" or padding == "padding"
    if base in ("none", "padding"):
        return "dense", False, 0, padded
    if base == "causal":
        return "dense", True, 0, padded
    if base.startswith("sliding_window("):
        return "sliding_window", True, int(base[len("sliding_window("):-1]), padded
    return None


def softmax_site(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | torch.Tensor,
    *,
    causal: bool,
    dropout_p: float = 0.0,
    kernels: str = "auto",
    mask_kind: str = "other",
) -> torch.Tensor:
    """Softmax attention with the site's own math (VARIANTS.md §1): the flash kernel when it can serve
    the site's mask (none, causal, sliding window, padding), else the reference."""
    served = kernel_mask(mask_kind) if mask is not None else ("dense", causal, 0, False)
    if use_kernels(kernels, q, k, v) and served is not None and not flash_unsupported(q, k, v, dropout_p):
        from attncc.codegen import ops

        pattern, is_causal, window, padded = served
        q, scale = _scaled(q, scale)
        key_padding = key_padding_from_mask(mask, q.shape[0]) if padded else None
        return ops.flash(q, k, v, key_padding, scale=scale, causal=is_causal, pattern=pattern, window=window)
    return softmax_attention(q, k, v, scale=scale, causal=causal, mask=mask, dropout_p=dropout_p)


def key_padding_from_mask(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """[B, Tk] True for real keys, from a site's mask (bool may-attend, or additive) of a padding kind."""
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(torch.float16).min / 2
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    keys = allowed.any(dim=-2).any(dim=1)  # [B', Tk]
    return keys.expand(batch, keys.shape[-1])


def _padding(mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    return None if mask is None else key_padding_from_mask(mask, q.shape[0])


def _scaled(q: torch.Tensor, scale: float | torch.Tensor) -> tuple[torch.Tensor, float]:
    """Fold a tensor-valued scale into q, so references and kernels see a Python float."""
    if isinstance(scale, torch.Tensor):
        return q * scale.to(q.dtype), 1.0
    return q, float(scale)


def linear_site(q, k, v, mask, *, causal: bool, feature_map: str, normalize: bool,
                decay_rates: tuple[float, ...] | None, eps: float, kernels: str = "auto") -> torch.Tensor:
    from attncc.codegen import reference_ops

    decay = None if decay_rates is None else torch.tensor(decay_rates, dtype=torch.float32, device=q.device)
    return reference_ops.linear_attention(q, k, v, _padding(mask, q), decay, causal, feature_map, normalize, eps)


def sparse_site(q, k, v, mask, scale, *, pattern: str, window: int, sinks: int, block: int, window_blocks: int,
                mask_fn: str | None, causal: bool, kernels: str = "auto") -> torch.Tensor:
    from attncc.codegen import reference_ops

    q, scale = _scaled(q, scale)
    if pattern != "block" and use_kernels(kernels, q, k, v) and not flash_unsupported(q, k, v):
        from attncc.codegen import ops

        return ops.flash(q, k, v, _padding(mask, q), scale=scale, causal=True, pattern=pattern, window=window,
                         sinks=sinks, block=block, window_blocks=window_blocks)
    return reference_ops.sparse_attention(q, k, v, _padding(mask, q), scale, pattern, window, sinks, block,
                                          window_blocks, mask_fn, causal)


def softplus_site(q, k, v, mask, *, causal: bool, reweight_p: float, kernels: str = "auto") -> torch.Tensor:
    from attncc.codegen import reference_ops

    return reference_ops.softplus_attention(q, k, v, _padding(mask, q), causal, float(reweight_p))


def mala_site(q, k, v, mask, *, causal: bool, sim_scale: float | None, kernels: str = "auto") -> torch.Tensor:
    from attncc.codegen import reference_ops

    return reference_ops.mala_attention(q, k, v, _padding(mask, q), causal, sim_scale)
