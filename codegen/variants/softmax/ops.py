"""torch.library ops around the emitted kernels, so a rewritten graph stays whole under torch.compile.

    attncc::flash_attention(q, k, v, key_padding?, scale, causal, pattern, window, sinks, block,
                            window_blocks) -> (o, lse)
    attncc::flash_attention_backward(do, q, k, v, o, lse, key_padding?, <same constants>) -> (dq, dk, dv)

The constants are the kernel's specialization (Triton constexprs); tensors are the only runtime
inputs. Fake implementations return exactly the strides the real ops return (contiguous outputs),
because Inductor asserts them. Autograd of the forward op calls the backward op, which runs the
backward kernels. custom_op (not triton_op) is used because it compiles on the GPU and, under
TRITON_INTERPRET=1, on the CPU too (ENV.md).
"""

from __future__ import annotations

import torch

from attncc.codegen import emit, runtime_mask

from .flash import flash_attention_bwd, flash_attention_fwd, supports
from .reference import softmax_attention, softmax_attention_backward


def flash_spec(q: torch.Tensor, k: torch.Tensor, *, causal: bool, pattern: str, window: int = 0, sinks: int = 0,
               block: int = 0, window_blocks: int = 0, padded: bool = False) -> emit.KernelSpec:
    """The flash template's specialization for these tensors and constants (named in reports)."""
    constants: list[tuple[str, object]] = [("", pattern), ("causal", bool(causal))]
    if pattern == "sliding_window":
        constants += [("w", int(window)), ("s", int(sinks))]
    elif pattern == "power":
        constants += [("b", int(block)), ("wb", int(window_blocks))]
    constants += [("d", int(q.shape[-1])), ("g", int(q.shape[-3] // k.shape[-3])), ("padded", bool(padded)),
                  ("", emit.dtype_name(q.dtype))]
    return emit.KernelSpec("flash", flash_attention_fwd.__module__, tuple(constants))


def flash_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> str | None:
    """Why the flash kernel cannot run these tensors (the reference runs instead), or None."""
    if q.dim() != 4:
        return "flash kernel needs 4-D [B, H, T, D] tensors"
    if v.shape[-1] != q.shape[-1]:
        return f"flash kernel needs the value head dim ({v.shape[-1]}) to equal the head dim ({q.shape[-1]})"
    if dropout_p:
        return "flash kernel has no attention dropout"
    ok, reason = supports(q.shape[-1], q.dtype)
    return None if ok else reason


@torch.library.custom_op("attncc::flash_attention", mutates_args=())
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
                    scale: float, causal: bool, pattern: str, window: int, sinks: int, block: int,
                    window_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    emit.record(flash_spec(q, k, causal=causal, pattern=pattern, window=window, sinks=sinks, block=block,
                                window_blocks=window_blocks, padded=key_padding is not None))
    return flash_attention_fwd(q, k, v, scale=scale, causal=causal, pattern=pattern, window=window, sinks=sinks,
                               block=block, window_blocks=window_blocks, key_padding=key_padding)


@flash_attention.register_fake
def _(q, k, v, key_padding, scale, causal, pattern, window, sinks, block, window_blocks):
    b, h, tq, _ = q.shape
    o = q.new_empty((b, h, tq, v.shape[-1]))
    lse = q.new_empty((b, h, tq), dtype=torch.float32)
    return o, lse


@torch.library.custom_op("attncc::flash_attention_backward", mutates_args=())
def flash_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                             lse: torch.Tensor, key_padding: torch.Tensor | None, scale: float, causal: bool,
                             pattern: str, window: int, sinks: int, block: int,
                             window_blocks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return flash_attention_bwd(do.contiguous(), q, k, v, o, lse, scale=scale, causal=causal, pattern=pattern,
                               window=window, sinks=sinks, block=block, window_blocks=window_blocks,
                               key_padding=key_padding)


@flash_attention_backward.register_fake
def _(do, q, k, v, o, lse, key_padding, scale, causal, pattern, window, sinks, block, window_blocks):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


_CONSTANTS = ("scale", "causal", "pattern", "window", "sinks", "block", "window_blocks")


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding, *constants = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, key_padding)
    ctx.constants = constants


def _backward(ctx, do, dlse):
    q, k, v, o, lse, key_padding = ctx.saved_tensors
    dq, dk, dv = flash_attention_backward(do, q, k, v, o, lse, key_padding, *ctx.constants)
    return dq, dk, dv, None, None, None, None, None, None, None, None


flash_attention.register_autograd(_backward, setup_context=_setup_context)


def flash(q, k, v, key_padding, *, scale: float, causal: bool, pattern: str = "dense", window: int = 0,
          sinks: int = 0, block: int = 0, window_blocks: int = 0) -> torch.Tensor:
    o, _ = flash_attention(q, k, v, key_padding, float(scale), bool(causal), pattern, int(window), int(sinks),
                           int(block), int(window_blocks))
    return o


# --- softmax over a mask read at run time ------------------------------------------------------------

def _checked_pattern(kind: str) -> tuple[bool, str]:
    """(causal, kernel pattern) of a mask structure."""
    return kind != "none", ("sliding_window" if kind == "sliding_window" else "dense")


@torch.library.custom_op("attncc::flash_attention_checked", mutates_args=())
def flash_attention_checked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                            keys: torch.Tensor, holds: torch.Tensor, scale: float, kind: str, window: int, site: str
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax attention under a mask compiled as `kind` & key padding: the flash kernel when this
    call's mask has that structure, else the dense reference (exact for any mask). `keys` and `holds`
    are `attncc::mask_check(mask, kind, window, Tq)`, computed once for every site that reads the mask.
    Returns (o, lse, key padding [B, Tk], whether the kernel ran)."""
    problem = None
    if not bool(holds):  # the reason, for the report (the fallback path only)
        problem = runtime_mask.check(mask, kind, window, q.shape[-2])[1] or "the mask check failed"
    if not problem and kind != "none" and q.shape[-2] != k.shape[-2]:
        problem = "the causal queries end a longer key sequence (the kernel needs Tq == Tk)"
    keys = runtime_mask.batch_keys(keys, q.shape[0]).clone(memory_format=torch.contiguous_format)  # not an alias of the input
    if problem:
        emit.ran(site, f"reference ({problem} on this call)")
        o = softmax_attention(q, k, v, scale=scale, mask=mask).contiguous()
        return o, q.new_zeros(q.shape[:3], dtype=torch.float32), keys, torch.tensor(False)
    causal, pattern = _checked_pattern(kind)
    spec = emit.record(flash_spec(q, k, causal=causal, pattern=pattern, window=window, padded=True))
    emit.ran(site, spec.name)
    o, lse = flash_attention_fwd(q, k, v, scale=scale, causal=causal, pattern=pattern, window=window,
                                 key_padding=keys)
    return o, lse, keys, torch.tensor(True)


@flash_attention_checked.register_fake
def _(q, k, v, mask, keys, holds, scale, kind, window, site):
    b, h, tq, _ = q.shape
    return (q.new_empty((b, h, tq, v.shape[-1])), q.new_empty((b, h, tq), dtype=torch.float32),
            q.new_empty((b, k.shape[-2]), dtype=torch.bool), q.new_empty((), dtype=torch.bool, device="cpu"))


@torch.library.custom_op("attncc::flash_attention_checked_backward", mutates_args=())
def flash_attention_checked_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     o: torch.Tensor, lse: torch.Tensor, keys: torch.Tensor, ran_kernel: torch.Tensor,
                                     mask: torch.Tensor, scale: float, kind: str, window: int
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if bool(ran_kernel):
        causal, pattern = _checked_pattern(kind)
        return flash_attention_bwd(do.contiguous(), q, k, v, o, lse, scale=scale, causal=causal, pattern=pattern,
                                   window=window, key_padding=keys)
    grads = softmax_attention_backward(do, q, k, v, scale=scale, mask=mask)
    return tuple(g.contiguous() for g in grads)


@flash_attention_checked_backward.register_fake
def _(do, q, k, v, o, lse, keys, ran_kernel, mask, scale, kind, window):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _checked_setup(ctx, inputs, output):
    q, k, v, mask, _, _, *constants = inputs
    o, lse, keys, ran_kernel = output
    ctx.save_for_backward(q, k, v, o, lse, keys, ran_kernel, mask)
    ctx.constants = constants[:3]  # scale, kind, window


def _checked_backward(ctx, do, dlse, dkeys, dran):
    q, k, v, o, lse, keys, ran_kernel, mask = ctx.saved_tensors
    dq, dk, dv = flash_attention_checked_backward(do, q, k, v, o, lse, keys, ran_kernel, mask, *ctx.constants)
    return dq, dk, dv, None, None, None, None, None, None, None


flash_attention_checked.register_autograd(_checked_backward, setup_context=_checked_setup)


def flash_checked(q, k, v, mask, check: tuple[torch.Tensor, torch.Tensor], *, scale: float, kind: str, window: int,
                  site: str) -> torch.Tensor:
    """`check`: (keys, holds), `attncc::mask_check` of this mask, shared by the sites that read it."""
    keys, holds = check
    o, *_ = flash_attention_checked(q, k, v, mask, keys, holds, float(scale), kind, int(window), site)
    return o
