"""What a variant is, and what a rewritten site calls.

A variant is one unit in its own folder, `codegen/variants/<name>/`:

    config     the policy schema: a frozen `VariantConfig` dataclass, defaults declared once
    Variant    `check(site, config)` -> why it cannot serve a site, or None; `constants(site, config)`
               -> the Python constants its op is specialized on; `run(call, q, k, v, mask, scale,
               dropout_p)` -> the site's output, through its op
    reference  the math of VARIANTS.md, in plain PyTorch (reference.py)
    ops        its torch.library ops (ops.py): fake, autograd, and the one place that picks kernel or
               reference and records the choice (`SiteCall.ran`)
    kernels    its Triton templates, when it has them

The registry (`codegen/variants/__init__.py`) maps each config type to its Variant.

A rewritten site is one `call_function` node whose target is a `SiteCall`: the variant, the typed
mask kind, the constants, the `kernels` option and the site's key, all fixed when the graph is
rewritten; its arguments are the tensors (q, k, v, the mask or None, the scale, the dropout
probability). AOT traces through the call, so the constants specialize the ops it reaches.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Mapping

import torch

from attncc.codegen import emit, runtime_mask
from attncc.config import VariantConfig
from attncc.facts import MaskKind, SiteFacts

KERNEL_CHOICES = ("auto", "triton", "reference")


class Variant:
    """One attention variant. Subclass it in the variant's folder; register one instance."""

    config: ClassVar[type[VariantConfig]]
    title: ClassVar[str]  # how messages name it: "linear attention"
    structures: ClassVar[tuple[str, ...]] = ("none", "causal")  # mask structures it serves (+padding)
    scaled: ClassVar[bool] = True  # it uses the site's softmax scale
    takes_dropout: ClassVar[bool] = False  # it applies the site's attention dropout
    rewrites: ClassVar[bool] = True  # False for `keep`: the site stays as the model wrote it
    rewrites_projections: ClassVar[bool] = False  # the pass also rebuilds the projections (sqa)
    warns_on_refusal: ClassVar[bool] = False  # refusals are also a compile-time warning, once per graph

    @property
    def name(self) -> str:
        return self.config.variant

    def check(self, site: SiteFacts, config: Any) -> str | None:
        """Why this variant cannot serve `site` with `config` (the site is then left unchanged), or None."""
        return served(site, self.structures, self.title)

    def load(self, config: Any, *, mask_modules: tuple[str, ...]) -> None:
        """Load what `config` names outside the policy (code: a block mask), when the backend is built,
        from the modules the user allows only. Raises PolicyError."""

    def needs_layers(self, config: Any) -> bool:
        """Whether `check`/`constants` read `site.layers` (the model's layer count, costly to find)."""
        return False

    def constants(self, site: SiteFacts, config: Any) -> dict[str, Any]:
        """The Python constants of the site's op (what its kernel specializes on)."""
        return {}

    def run(self, call: SiteCall, q, k, v, mask, scale, dropout_p) -> torch.Tensor:
        raise NotImplementedError

    def call(self, site: SiteFacts, config: Any, *, kernels: str, key: str) -> SiteCall:
        """The graph's call target for a site this variant serves (after `check` passed)."""
        return SiteCall(self, site.mask, MappingProxyType(self.constants(site, config)), kernels, key)


@dataclass(frozen=True, eq=False)
class SiteCall:
    """A rewritten site's call target: `call(q, k, v, mask, scale, dropout_p)` runs the variant."""

    variant: Variant
    mask: MaskKind
    constants: Mapping[str, Any] = field(default_factory=dict)
    kernels: str = "auto"
    key: str = ""  # the site's key: its ops record under it what they ran

    @property
    def __name__(self) -> str:  # FX names the node after its target
        return f"attncc_{self.variant.name}"

    def __call__(self, q, k, v, mask=None, scale=1.0, dropout_p=0.0) -> torch.Tensor:
        q, k, v = autocast(q, k, v)
        return self.variant.run(self, q, k, v, mask, scale, dropout_p)

    def use_kernels(self, *tensors: torch.Tensor) -> bool:
        """Whether the `kernels` option asks for a kernel on these tensors (CUDA under `auto`)."""
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels={self.kernels!r}; valid: {', '.join(KERNEL_CHOICES)}")
        if self.kernels == "reference":
            return False
        return self.kernels == "triton" or all(t.is_cuda for t in tensors)

    def ran(self, what: str) -> None:
        """Record what this site runs (at trace time: the traced graph runs it on every call)."""
        emit.ran(self.key, what)

    def ran_reference(self, *tensors: torch.Tensor, why: str | None = None) -> None:
        """Record that the reference runs: because `kernels` says so, else because of `why`."""
        if not self.use_kernels(*tensors):
            self.ran("reference")
            return
        why = why or f"no {self.variant.name} kernel yet"
        self.ran(f"reference ({why})")
        if self.kernels == "triton":  # kernels were asked for everywhere: say so where the choice is made
            warnings.warn(f"kernels='triton': the {self.variant.name} site {self.key} runs the reference ({why}); "
                          "explain's `kernel` column shows what each site ran", stacklevel=2)

    def keys(self, mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
        """The key padding [B, Tk] of this call's mask, its structure checked for q's queries
        (MaskMismatch if it is not the compiled one); None without a mask."""
        if mask is None:
            return None
        kind, window, tq = self._structure(q)
        keys = shared(mask, ("mask_keys", kind, window, str(tq)),
                      lambda: runtime_mask.mask_keys(mask, kind, window, tq, self.key))
        return runtime_mask.batch_keys(keys, q.shape[0])

    def _structure(self, q: torch.Tensor) -> tuple[str, int, Any]:
        """(structure, window, query count): what a mask of this site is checked against."""
        return self.mask.structure, int(self.mask.window or 0), q.shape[-2]

    def mask_check(self, mask: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys [B', Tk], whether the mask has the compiled structure): `attncc::mask_check`, shared by
        the sites that read this mask in the graph being traced."""
        kind, window, tq = self._structure(q)
        return shared(mask, ("mask_check", kind, window, str(tq)),
                      lambda: runtime_mask.mask_check(mask, kind, window, tq))

    def queries_end_keys(self, q: torch.Tensor, k: torch.Tensor) -> str | None:
        """Why the kernels cannot run this call: a causal site whose queries end a longer key sequence
        (a decode step; the kernels align queries with keys), else None. Decided per call: comparing
        the sizes installs a guard, so a graph traced with Tq == Tk is not reused for Tq < Tk."""
        if self.mask.causal and q.shape[-2] != k.shape[-2]:
            return "the causal queries end a longer key sequence (a decode step); the kernels need Tq == Tk"
        return None


def autocast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v as `scaled_dot_product_attention` sees them under autocast: in autocast's dtype.

    Autocast casts SDPA's (and matmul's) inputs, so a site inside `torch.autocast` can get q and k in
    fp32 (rotary embeddings multiply by fp32 cos/sin) beside a bf16 v. The variant ops are custom ops,
    which autocast does not touch; the site casts for them, so they see what the original op saw."""
    device = q.device.type
    if not torch.is_autocast_enabled(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t for t in (q, k, v))


_SHARED: dict[tuple, tuple[weakref.ref, Any]] = {}
_SHARED_LOCK = threading.Lock()  # graphs may be traced on several threads


def shared(mask: torch.Tensor, what: tuple, compute: Callable[[], Any]) -> Any:
    """`compute()`, once per mask tensor being traced: the sites of a graph that read one mask node get
    one traced check, so each call of the compiled graph checks that mask once, not once per layer.

    Only while tracing (fake tensors), where a tensor object stands for one value of the graph. Eager
    calls compute every time: a real tensor can change in place, or its memory be reused, between
    calls. An entry lives as long as its mask object (weakly referenced, so a reused id misses)."""
    from torch._subclasses.fake_tensor import is_fake

    if not is_fake(mask):
        return compute()
    key = (id(mask), *what)
    with _SHARED_LOCK:
        hit = _SHARED.get(key)
        if hit is not None and hit[0]() is mask:
            return hit[1]
        for stale in [k for k, (ref, _) in _SHARED.items() if ref() is None]:
            del _SHARED[stale]
    value = compute()  # outside the lock: it traces ops (one thread traces one graph)
    with _SHARED_LOCK:
        _SHARED[key] = (weakref.ref(mask), value)
    return value


def served(site: SiteFacts, structures: tuple[str, ...], title: str) -> str | None:
    """Why a variant serving `structures` cannot take `site`, or None."""
    if len(site.q_shape) != 4 or len(site.k_shape) != 4:
        return f"{title} needs 4-D [B, H, T, D] q/k/v"
    if site.mask.structure not in structures:
        served = ", ".join(f"{s} (+padding)" for s in structures)
        return f"{title} cannot serve a '{site.mask}' mask (it serves: {served}); site left unchanged"
    tq, tk = site.q_shape[-2], site.k_shape[-2]
    if site.mask.causal and isinstance(tq, int) and isinstance(tk, int) and tq > tk:
        return f"causal {title} needs at most as many queries as keys (got {tq} and {tk})"
    return None


def same_size(a: Any, b: Any) -> bool:
    """Equal as ints, or the same symbolic expression (comparing expressions installs no guard)."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        expr = lambda x: x.node.expr if isinstance(x, torch.SymInt) else x  # noqa: E731
        return bool(expr(a) == expr(b))
    return a == b


def scaled(q: torch.Tensor, scale: float | torch.Tensor) -> tuple[torch.Tensor, float]:
    """Fold a tensor-valued scale into q, so references and kernels see a Python float."""
    if isinstance(scale, torch.Tensor):
        return q * scale.to(q.dtype), 1.0
    return q, float(scale)


_LIBRARY = torch.library.Library("attncc", "FRAGMENT")  # the reference ops' backward ops


def reference_op(op, reference: Callable, tensors: int) -> None:
    """Register fake and autograd of a variant op that runs `reference(*inputs)`, and its backward op.

    Fake: a contiguous [B, H, Tq, Dv] in q's dtype. Autograd calls `attncc::<op>_backward(grad,
    *inputs) -> (dq, dk, dv)`, an op of its own that differentiates the reference (torch.func.vjp)
    when it runs. So the backward graph holds one opaque call, not the reference traced into it: a
    training step's compile time does not grow with the sequence length. q, k and v (the first three
    inputs) get gradients; the other `tensors - 3` tensor inputs (key padding, decay rates) get none.
    """
    schema = str(op._opoverload._schema)  # attncc::<name>(<arguments>) -> Tensor
    name = schema[schema.index("::") + 2:schema.index("(")] + "_backward"
    arguments = schema[schema.index("(") + 1:schema.rindex(") ->")]
    _LIBRARY.define(f"{name}(Tensor grad, {arguments}) -> (Tensor, Tensor, Tensor)")

    def backward_impl(grad, q, k, v, *rest):
        _, vjp = torch.func.vjp(lambda q, k, v: reference(q, k, v, *rest), q, k, v)
        return tuple(g.contiguous() for g in vjp(grad.to(q.dtype)))

    def backward_fake(grad, q, k, v, *rest):
        return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))

    _LIBRARY.impl(name, backward_impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"attncc::{name}", backward_fake, lib=_LIBRARY)
    backward_op = getattr(torch.ops.attncc, name).default

    def fake(q, k, v, *rest):
        return q.new_empty((*q.shape[:-1], v.shape[-1]))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:tensors])
        ctx.constants = inputs[tensors:]

    def backward(ctx, grad):
        saved = ctx.saved_tensors
        dq, dk, dv = backward_op(grad, *saved, *ctx.constants)
        return (dq, dk, dv, *([None] * (len(saved) - 3 + len(ctx.constants))))

    op.register_fake(fake)
    op.register_autograd(backward, setup_context=setup_context)
