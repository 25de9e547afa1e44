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
) -> torch.Tensor:
    """Softmax attention with the site's own math (VARIANTS.md §1)."""
    return softmax_attention(q, k, v, scale=scale, causal=causal, mask=mask, dropout_p=dropout_p)
