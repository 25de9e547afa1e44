"""What the GPU benchmarks share: timing, the compiled FlexAttention and its block masks, the SDPA backend.

Imported by the bench_*.py scripts (run as scripts, so this folder is on sys.path).
"""

from __future__ import annotations

import warnings

import torch
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

# One compiled flex_attention serves every mask and size: let dynamo keep all of its graphs (past the
# default limit of 8 it would fall back to the unfused path, which materializes N x N scores).
for _name in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 64)
warnings.filterwarnings("ignore", message="_compile flag on create_block_mask")
flex = torch.compile(flex_attention, dynamic=False)


def bench(fn, grads) -> float:
    """Median ms of fn (triton.testing.do_bench), the gradients of `grads` reset between calls."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")


def block_mask(mask_mod, n: int):
    """FlexAttention's block mask of mask_mod for n queries and keys (compiled where the torch has the flag)."""
    try:
        return create_block_mask(mask_mod, None, None, n, n, device="cuda", _compile=True)
    except TypeError:
        return create_block_mask(mask_mod, None, None, n, n, device="cuda")


def sdpa_backend(head_dim: int, dtype: torch.dtype) -> tuple[SDPBackend, str]:
    """(backend, name): cuDNN if it runs causal attention here, else flash."""
    q = torch.randn(1, 2, 256, head_dim, device="cuda", dtype=dtype)
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return SDPBackend.CUDNN_ATTENTION, "cuDNN"
    except RuntimeError:
        return SDPBackend.FLASH_ATTENTION, "flash"
