"""Which kernel a dense softmax site runs on CUDA: attncc's flash kernel or one of SDPA's, by measurement.

A `softmax` or `sqa` site whose mask is none or causal (no padding, no dropout, queries aligned with
keys) is plain softmax attention, which PyTorch's `scaled_dot_product_attention` also computes exactly,
through cuDNN or FlashAttention-2. Which is fastest depends on the GPU, the dtype, the head dim, the
lengths and whether a backward follows, so the choice is measured, not assumed: when the site is
traced, each candidate runs on random tensors of the site's shapes, strides and dtype (forward, plus
backward when the inputs need gradients), and the fastest wins. The choice and the times go into the
report's kernel column; the policy's `kernel` (auto | attncc | cudnn | flash, the config's `DenseKernel`)
overrides it.

Measurements are cached per process by shape and device, so the layers of one model measure once.
Timing varies from run to run, so two processes can choose differently (both exact, rounding apart): a
policy that needs bitwise-repeatable runs names its kernel. A measurement that fails for any reason
leaves the site on attncc's kernel, and the report gives the error.
Sizes that are symbolic (dynamic shapes) are measured at their hints, the sizes dynamo saw first,
and the report says so.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attncc.codegen.masks import repeat_kv
from attncc.errors import AttnccError

from .ops import flash

SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
_NAMES = {"attncc": "attncc flash", "cudnn": "SDPA cuDNN", "flash": "SDPA FlashAttention-2"}


@dataclass(frozen=True)
class Choice:
    kernel: str  # attncc | cudnn | flash
    note: str  # what the report says: the measured times, or that the policy chose


def sdpa(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
         causal: bool) -> torch.Tensor:
    """Softmax attention through SDPA's `kernel` backend alone (kv heads repeated for grouped queries)."""
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    with sdpa_kernel([SDPA_BACKENDS[kernel]]):
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        except RuntimeError as e:
            raise AttnccError(f"kernel {kernel!r} ({_NAMES[kernel]}) cannot run a site with {q.dtype} q of shape "
                              f"{tuple(q.shape)}: {str(e).splitlines()[0]}. Use the policy's `kernel: auto` (the "
                              "fastest that runs) or `kernel: attncc`") from e


def run(kernel: str, q, k, v, *, scale: float, causal: bool) -> torch.Tensor:
    if kernel == "attncc":
        return flash(q, k, v, None, scale=scale, causal=causal)
    return sdpa(kernel, q, k, v, scale=scale, causal=causal)


def choose(policy: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
           causal: bool) -> Choice:
    """The kernel for these (possibly fake) tensors: the policy's, or under `auto` the fastest measured."""
    if policy != "auto":
        return Choice(policy, "the policy's kernel")
    if q.dtype not in (torch.float16, torch.bfloat16):
        return Choice("attncc", f"SDPA's cuDNN and FlashAttention-2 backends take fp16 and bf16, not {q.dtype}")
    raw = [s for t in (q, k, v) for s in (*t.shape, *t.stride())]
    sizes = [_hint(s) for s in raw]
    if None in sizes:
        return Choice("attncc", "not measured: the sizes have no hint")
    grad = any(t.requires_grad for t in (q, k, v))
    key = (q.device.index, q.dtype, tuple(sizes), grad, causal, float(scale))
    with _LOCK:
        choice = _CHOSEN.get(key)
        if choice is None:
            try:
                choice = _measure(q, k, v, sizes, grad=grad, scale=scale, causal=causal)
            except Exception as e:  # measuring must not break a compile: attncc's kernel is always right
                choice = Choice("attncc", f"not measured: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            _CHOSEN[key] = choice
    if any(isinstance(s, torch.SymInt) for s in raw):
        return Choice(choice.kernel, f"{choice.note} (symbolic sizes: measured at the sizes dynamo saw first)")
    return choice


_LOCK = threading.Lock()
_CHOSEN: dict[tuple, Choice] = {}


def _hint(size) -> int | None:
    if isinstance(size, torch.SymInt):
        return size.node.hint if size.node.has_hint() else None
    return int(size)


def _measure(q, k, v, sizes, *, grad: bool, scale: float, causal: bool) -> Choice:
    """Time each candidate on real random tensors shaped like q, k, v, on q's device, outside any tracing
    mode (the site is traced with fake tensors): triton's do_bench on CUDA, wall-clock elsewhere."""
    from torch.utils._python_dispatch import _disable_current_modes

    n = len(q.shape)
    layouts = [(sizes[i * 2 * n:i * 2 * n + n], sizes[i * 2 * n + n:(i + 1) * 2 * n]) for i in range(3)]
    times: dict[str, float] = {}
    failed: dict[str, str] = {}
    with _disable_current_modes(), torch.autocast(q.device.type, enabled=False), torch.enable_grad(), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SDPA warns why a backend cannot run before it raises
        device = q.device
        rng = torch.Generator(device).manual_seed(0)  # the user's RNG stream is left as it was
        real = [torch.empty_strided(shape, stride, device=device, dtype=q.dtype).normal_(generator=rng)
                .requires_grad_(grad) for shape, stride in layouts]
        for kernel in ("attncc", "cudnn", "flash"):
            def step(kernel=kernel):
                o = run(kernel, *real, scale=scale, causal=causal)
                if grad:
                    torch.autograd.grad(o, real, torch.ones_like(o))
            try:
                step()
                times[kernel] = _time(step, device)
            except (RuntimeError, AttnccError) as e:  # the backend cannot take these tensors
                failed[kernel] = str(e).splitlines()[0][:120]
    if not times:
        return Choice("attncc", "not measured: no candidate ran (" + "; ".join(f"{k}: {e}" for k, e in failed.items()) + ")")
    best = min(times, key=times.get)
    what = "fwd+bwd" if grad else "fwd"
    measured = ", ".join(f"{_NAMES[k]} {t:.3g} ms" for k, t in sorted(times.items(), key=lambda kv: kv[1]))
    unavailable = "".join(f"; {_NAMES[k]} cannot run it" for k in failed)
    return Choice(best, f"fastest measured {what}: {measured}{unavailable}")


def _time(fn, device: torch.device) -> float:
    """Median milliseconds of fn."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=3, rep=30, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]
