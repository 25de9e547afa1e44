import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest

# Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel, so this must run before any
# kernel module is imported. Without a GPU, kernels run in the (slow) interpreter.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run with `pytest -m gpu` on the device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: dynamo's per-code-object cache would otherwise hit its
    recompile limit across the many model instances of one class and silently fall back to eager."""
    import torch._dynamo

    torch._dynamo.reset()
    yield


def _poisoned_alloc(shape, dtype, device):
    """NaN-filled instead of uninitialised, for floating dtypes: an element the kernel never writes
    stays NaN and fails any comparison (torch.empty could hold stale memory that happens to pass)."""
    if dtype.is_floating_point or dtype.is_complex:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    """Every buffer the kernels' launchers allocate (outputs, lse, states, gradients) starts as NaN, in
    every test that reaches the kernels (the *_kernel.py tests, test_ops.py, kernels="triton"), the way
    flash-linear-attention's tests/ops/conftest.py patches the allocators. Launchers allocate through
    `attncc.codegen.launch.alloc`, looked up at each call. The import happens here, after
    TRITON_INTERPRET is set above."""
    from attncc.codegen import launch

    monkeypatch.setattr(launch, "alloc", _poisoned_alloc)
    yield
