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

from attncc.codegen import emit, ops, reference_ops, runtime_mask
from attncc.codegen.reference.softmax import softmax_attention

KERNEL_CHOICES = ("auto", "triton", "reference")
VARIANTS_WITHOUT_KERNELS = ("linear", "softplus", "mala")  # their sites run the reference op everywhere


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


def softmax_site(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | torch.Tensor,
    *,
    structure: str,
    window: int = 0,
    padding: bool = False,
    checked: bool = False,
    dropout_p: float = 0.0,
    kernels: str = "auto",
    site: str = "",
) -> torch.Tensor:
    """Softmax attention with the site's own math (VARIANTS.md §1).

    `mask` is None for a none or causal structure known at compile time without padding (then
    `structure` says it all), else the site's mask as the model computed it. `checked`: the structure is a hypothesis
    from the example, checked on every call, with the dense mask as the fallback. The flash kernel
    runs when it can serve the structure; otherwise the reference, which applies the mask as given.
    """
    causal = structure in ("causal", "sliding_window")
    kernel = structure != "other" and use_kernels(kernels, q, k, v) and not flash_unsupported(q, k, v, dropout_p)
    if not kernel:
        emit.ran(site, _reference_reason(kernels, q, k, v, dropout_p, structure))
        if mask is not None:
            return softmax_attention(q, k, v, scale=scale, mask=mask, dropout_p=dropout_p)
        return softmax_attention(q, k, v, scale=scale, causal=causal, dropout_p=dropout_p)
    q, scale = _scaled(q, scale)
    if checked:
        return ops.flash_checked(q, k, v, mask, scale=scale, kind=structure, window=window, site=site)
    pattern = "sliding_window" if structure == "sliding_window" else "dense"
    keys = _static_keys(mask, q) if padding else None
    emit.ran(site, emit.flash_spec(q, k, causal=causal, pattern=pattern, window=window, padded=padding).name)
    return ops.flash(q, k, v, keys, scale=scale, causal=causal, pattern=pattern, window=window)


def _reference_reason(kernels: str, q, k, v, dropout_p: float = 0.0, structure: str = "none") -> str:
    if not use_kernels(kernels, q, k, v):
        return "reference"
    if structure == "other":
        return "reference (the flash kernel serves none, causal, sliding-window and padding masks)"
    why = flash_unsupported(q, k, v, dropout_p)
    return f"reference ({why})" if why else "reference"


def _static_keys(mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[B, Tk] key padding of a mask whose structure is a compile-time fact (no check needed)."""
    _, per_head = runtime_mask.keys_per_head(mask)
    return runtime_mask.batch_keys(per_head.any(dim=1), q.shape[0])


def _keys(mask: torch.Tensor | None, q: torch.Tensor, structure: str, window: int, site: str) -> torch.Tensor | None:
    """A variant's key padding: None without a mask, else read (and the structure checked) on every call."""
    if mask is None:
        return None
    keys = runtime_mask.mask_keys(mask, structure, int(window), site)
    return runtime_mask.batch_keys(keys, q.shape[0])


def _scaled(q: torch.Tensor, scale: float | torch.Tensor) -> tuple[torch.Tensor, float]:
    """Fold a tensor-valued scale into q, so references and kernels see a Python float."""
    if isinstance(scale, torch.Tensor):
        return q * scale.to(q.dtype), 1.0
    return q, float(scale)


def _no_kernel(kernels: str, variant: str, site: str, *tensors: torch.Tensor) -> None:
    assert variant in VARIANTS_WITHOUT_KERNELS
    emit.ran(site, f"reference (no {variant} kernel yet)" if use_kernels(kernels, *tensors) else "reference")


def linear_site(q, k, v, mask, *, structure: str, window: int = 0, causal: bool, feature_map: str, normalize: bool,
                decay_rates: tuple[float, ...] | None, eps: float, kernels: str = "auto", site: str = "") -> torch.Tensor:
    _no_kernel(kernels, "linear", site, q, k, v)
    decay = None if decay_rates is None else torch.tensor(decay_rates, dtype=torch.float32, device=q.device)
    return reference_ops.linear_attention(q, k, v, _keys(mask, q, structure, window, site), decay, causal,
                                          feature_map, normalize, eps)


def sparse_site(q, k, v, mask, scale, *, structure: str, window_mask: int = 0, pattern: str, window: int, sinks: int,
                block: int, window_blocks: int, mask_fn: str | None, causal: bool, kernels: str = "auto",
                site: str = "") -> torch.Tensor:
    q, scale = _scaled(q, scale)
    keys = _keys(mask, q, structure, window_mask, site)
    if pattern != "block" and use_kernels(kernels, q, k, v) and not flash_unsupported(q, k, v):
        emit.ran(site, emit.flash_spec(q, k, causal=True, pattern=pattern, window=window, sinks=sinks, block=block,
                                       window_blocks=window_blocks, padded=keys is not None).name)
        return ops.flash(q, k, v, keys, scale=scale, causal=True, pattern=pattern, window=window,
                         sinks=sinks, block=block, window_blocks=window_blocks)
    emit.ran(site, _reference_reason(kernels, q, k, v) if pattern != "block" else
             ("reference (no block-sparse kernel yet)" if use_kernels(kernels, q, k, v) else "reference"))
    return reference_ops.sparse_attention(q, k, v, keys, scale, pattern, window, sinks, block,
                                          window_blocks, mask_fn, causal)


def softplus_site(q, k, v, mask, *, structure: str, window: int = 0, causal: bool, reweight_p: float,
                  kernels: str = "auto", site: str = "") -> torch.Tensor:
    _no_kernel(kernels, "softplus", site, q, k, v)
    return reference_ops.softplus_attention(q, k, v, _keys(mask, q, structure, window, site), causal,
                                            float(reweight_p))


def mala_site(q, k, v, mask, *, structure: str, window: int = 0, causal: bool, sim_scale: float | None,
              kernels: str = "auto", site: str = "") -> torch.Tensor:
    _no_kernel(kernels, "mala", site, q, k, v)
    return reference_ops.mala_attention(q, k, v, _keys(mask, q, structure, window, site), causal, sim_scale)
