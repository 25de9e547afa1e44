"""What every kernel launcher shares: the interpreter switch, the allocator of kernel buffers, the
dot precision and the [B, H, T, ...] strides.

Every buffer a launcher hands to a kernel comes from `alloc`; the tests replace it with one that fills
with NaN (tests/conftest.py), so an element a kernel forgets to write shows up. Launchers look it up
as `launch.alloc` at each call, so that replacement reaches them all.
"""

from __future__ import annotations

import json
import os

import torch


def interpreting() -> bool:
    """Kernels run in the Triton interpreter (the CPU): TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def tiles(env: str, config_type, interpreter, gpu):
    """A kernel family's tile config: `interpreter` under the interpreter, else `gpu`; the environment
    variable `env` (a JSON list of config_type's fields) overrides both, for tuning and tests."""
    override = os.environ.get(env)
    if override:
        return config_type(*json.loads(override))
    return interpreter if interpreting() else gpu


def alloc(shape, dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: exact fp32 for fp32 inputs (and in the interpreter), else tf32."""
    return "ieee" if dtype == torch.float32 or interpreting() else "tf32"


def strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, token) strides of a [B, H, T, ...] tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def key_padding(key_padding: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """(int8 [B, T] key padding or a dummy, its batch stride, whether there is padding)."""
    if key_padding is None:
        return like.new_zeros(1, dtype=torch.int8), 0, False
    kp = key_padding.to(torch.int8).contiguous()
    return kp, kp.stride(0), True
