"""The torch.compile backend.

    torch.compile(model, backend=attncc.backend("policy.yaml"))
    torch.compile(model, backend="attncc", options={"policy": "policy.yaml", "inner": "aot_eager"})
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import os
import types
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Callable

import torch
import torch.fx as fx

from attncc.errors import AttnccError, PolicyError, VerificationError
from attncc.codegen.variants import KERNEL_CHOICES, variant_for
from attncc.passes.context import Context, Options
from attncc.passes.pipeline import run_pipeline
from attncc.policy import Policy, load_policy
from attncc.report import Report

log = logging.getLogger("attncc")

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
OPTION_KEYS = ("policy", "inner", "kernels", "verify", "debug", "mask_modules", "cudagraphs")
CUDAGRAPH_CHOICES = ("decode", "never")
FUNCTION_PRESERVING = {"softmax"}  # variants whose rewrite computes what the original graph computes


class Backend:
    """A torch.compile backend that rewrites attention sites by a policy, then runs an inner compiler.

    `reports` holds one Report per compiled graph; `report` merges them.
    """

    def __init__(self, policy: Policy | dict | str | None = None, *, inner: str = "inductor",
                 kernels: str = "auto", verify: bool = False, debug: bool = False,
                 mask_modules: Iterable[str] = (), cudagraphs: str = "decode"):
        self.policy = load_policy(policy if policy is not None else {"attention": "keep"})
        if isinstance(mask_modules, str) or not all(isinstance(m, str) for m in mask_modules):
            raise ValueError(f"mask_modules={mask_modules!r}: expected a list of module names, e.g. ['my_pkg.masks']")
        mask_modules = tuple(mask_modules)
        for path, config in self.policy.attention_configs():  # code a policy names loads now, or fails now
            try:
                variant_for(config).load(config, mask_modules=mask_modules)
            except PolicyError as error:
                raise error.within(path).with_source(self.policy.source) from None
        if inner not in INNER_COMPILERS:
            raise ValueError(f"inner={inner!r} is not an inner compiler; valid: {', '.join(INNER_COMPILERS)}")
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels={kernels!r}; valid: {', '.join(KERNEL_CHOICES)}")
        if kernels == "triton":
            _check_triton_can_run()
        if cudagraphs not in CUDAGRAPH_CHOICES:
            raise ValueError(f"cudagraphs={cudagraphs!r}; valid: {', '.join(CUDAGRAPH_CHOICES)}")
        for name, value in (("verify", verify), ("debug", debug)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r}: expected a bool (True or False), got {type(value).__name__}")
        self.options = Options(inner=inner, kernels=kernels, verify=verify, debug=debug, mask_modules=mask_modules,
                               cudagraphs=cudagraphs)
        self.reports: list[Report] = []  # one per compiled graph, recompiles included

    @property
    def report(self) -> Report:
        """The sites of every graph that has run, and of each frame's newest graph. A recompile (a new
        shape, a decode step) adds a graph; the earlier graphs of the frame still run for the inputs
        they were compiled for, so their sites stay listed. A graph dynamo compiled and dropped before
        it ever ran (with dynamic=True, the first trace of a float attribute) is not listed."""
        newest = {r.frame: r for r in self.reports}
        graphs = [r for r in self.reports if r.ran or newest[r.frame] is r]
        merged = Report(policy=self.policy.name, graphs=len(graphs))
        for r in graphs:
            merged.sites.extend(r.sites)
            for key, n in r.pattern_hits.items():
                merged.pattern_hits[key] = merged.pattern_hits.get(key, 0) + n
            for key, t in r.pass_seconds.items():
                merged.pass_seconds[key] = merged.pass_seconds.get(key, 0.0) + t
        return merged

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        original = copy.deepcopy(gm)  # the pipeline edits gm in place, canonicalizing even where it rewrites nothing
        ctx = Context(gm=gm, example_inputs=list(example_inputs), policy=self.policy, options=self.options,
                      graph_index=len(self.reports))
        ctx.report.policy = self.policy.name
        ctx.report.graphs = 1
        ctx.report.frame = _frame_of_current_compile(len(self.reports))
        gm = run_pipeline(ctx)
        self.reports.append(ctx.report)
        global _LAST
        _LAST = self
        _warn_if_nothing_found(ctx, self.policy)
        for problem in ctx.policy_warnings:
            warnings.warn(f"{problem} (in this graph; attncc.explain checks the whole model)", stacklevel=2)
        if not ctx.report.count("rewritten"):
            # nothing rewritten: the inner compiler gets dynamo's graph, so `keep` is plain torch.compile
            return _marking_run(_inner_compile(self.options.inner, original, example_inputs), ctx.report)
        cudagraphs = (self.options.cudagraphs == "decode" and ctx.decode_step and self.options.inner == "inductor"
                      and any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs))
        if cudagraphs:
            compiled, note = _cudagraph_compile(gm, example_inputs)
            for site in ctx.report.attention():
                site.reason += f"; {note}"
        else:
            compiled = _inner_compile(self.options.inner, gm, example_inputs)
        if self.options.verify:
            changed = sorted({s.variant for s in ctx.report.sites if s.status == "rewritten"} - FUNCTION_PRESERVING)
            if not changed:
                return _marking_run(_verifying(compiled, original, ctx.report), ctx.report)
            warnings.warn(f"verify compares against the original graph, so it only checks function-preserving "
                          f"rewrites; this graph also has {', '.join(changed)} sites and is not checked", stacklevel=2)
        return _marking_run(compiled, ctx.report)

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self.options, f.name)!r}" for f in dataclasses.fields(self.options))
        return f"attncc.backend({self.policy.name!r}, {fields})"


def backend(policy: Policy | dict | str | None = None, **options: Any) -> Backend:
    """Build the backend. Options: inner (inductor | aot_eager | eager), kernels (auto | triton |
    reference), verify (check rewritten sites against the original graph on the first call), debug,
    mask_modules (the modules a policy's block masks may be imported from; none by default), cudagraphs
    (decode: the graph of a StateCache decode step runs as a CUDA graph, with Inductor on the GPU; never)."""
    _check_option_keys(options, allow_policy=False)
    return Backend(policy, **options)


_LAST: Backend | None = None


def last_report() -> Report | None:
    """The report of the attncc backend that compiled last, e.g. after `torch.compile(m, backend="attncc")`."""
    return None if _LAST is None else _LAST.report


@contextmanager
def keeping_last_report() -> Iterator[None]:
    """Compiles inside (attncc.explain's) leave last_report() as it was."""
    global _LAST
    last = _LAST
    try:
        yield
    finally:
        _LAST = last


@contextmanager
def failing_past_recompile_limit(who: str, fix: str) -> Iterator[None]:
    """Past dynamo's recompile limit, torch.compile runs the frame without its backend: the original
    attention, silently. Inside, that is an AttnccError naming `who` and `fix` instead."""
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            yield
    except torch._dynamo.exc.FailOnRecompileLimitHit as e:
        limit = getattr(torch._dynamo.config, "recompile_limit", None)
        raise AttnccError(f"{who}: dynamo reached its recompile limit (torch._dynamo.config.recompile_limit = "
                          f"{limit}) and would have run the model without attncc, that is with its original "
                          f"attention; {fix}") from e


def registered_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None):
    """Entry point for `torch.compile(model, backend="attncc", options={"policy": ..., ...})`."""
    options = dict(options or {})
    _check_option_keys(options, allow_policy=True)
    policy = options.pop("policy", None)
    return Backend(policy, **options)(gm, example_inputs)


# torch >= 2.13: a trace's recompiles get their own count, so they never use up another compile's limit
ISOLATED = {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {}


def trace_once(model: torch.nn.Module, be: Backend, args: tuple, kwargs: dict) -> Any:
    """`model(*args, **kwargs)` through torch.compile with `be`, from an entry function of its own; what
    the backend raises (a PolicyError, an AttnccError) surfaces as itself, not wrapped by dynamo.

    Dynamo keeps compiled entries on the code object it traces, so the entries of this trace touch no
    other compiled function and are freed with it. The entry's globals are those of the model's forward,
    as when dynamo traces the model itself (dynamo imports the module of an inlined function whose
    globals differ from the traced frame's, and a model's module need not be importable). Static shapes
    (dynamic=False), as on a first compile, whatever shapes earlier traces saw."""
    scope = getattr(type(model).forward, "__globals__", _call.__globals__)
    entry = types.FunctionType(_call.__code__.replace(), scope, "_call")
    try:
        return torch.compile(entry, backend=be, fullgraph=False, dynamic=False, **ISOLATED)(model, args, kwargs)
    except torch._dynamo.exc.BackendCompilerFailed as err:
        inner = getattr(err, "inner_exception", None)
        if isinstance(inner, (PolicyError, AttnccError)):
            raise inner from err
        raise


def _call(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    return model(*args, **kwargs)


def _check_option_keys(options: dict, allow_policy: bool) -> None:
    valid = OPTION_KEYS if allow_policy else OPTION_KEYS[1:]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown attncc option(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(valid)}")


def _check_triton_can_run() -> None:
    """Without a GPU, Triton runs kernels only in its interpreter; otherwise it fails with "0 active drivers"."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ValueError(
        "kernels='triton' but there is no CUDA GPU and TRITON_INTERPRET is not '1'. Set TRITON_INTERPRET=1 "
        "before importing attncc (Triton reads it when a kernel is defined) to run the kernels in Triton's "
        "interpreter, use a GPU, or use kernels='auto' / 'reference'."
    )


def _inner_compile(inner: str, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
    """The inner compiler's callable."""
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def _cudagraph_compile(gm: fx.GraphModule, example_inputs: list[Any]) -> tuple[Callable, str]:
    """Inductor with its CUDA graph trees, and what Inductor did: compiled the graph for CUDA graphs, or
    skipped them (it counts each skip as it compiles)."""
    from torch._dynamo.utils import counters
    from torch._inductor.compile_fx import compile_fx

    skips = counters["inductor"]["cudagraph_skips"]
    compiled = compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": True})
    if counters["inductor"]["cudagraph_skips"] > skips:
        return compiled, "Inductor skipped CUDA graphs for this graph (TORCH_LOGS=perf_hints says why)"
    return compiled, "Inductor compiled the graph for its CUDA graph trees"


def _frame_of_current_compile(fallback: int) -> Any:
    """The Python frame dynamo is compiling (stable across its recompiles), or a unique key."""
    compile_id = torch._guards.CompileContext.current_compile_id()
    frame = getattr(compile_id, "frame_id", None)
    return ("frame", frame) if frame is not None else ("graph", fallback)


def _marking_run(compiled: Callable, report: Report) -> Callable:
    """The compiled graph, marking its report as run on its first call."""

    def run(*args, **kwargs):  # a pass-through: boxed (one list) or not, as the compiled graph was called
        report.ran = True
        return compiled(*args, **kwargs)

    if hasattr(compiled, "_boxed_call"):
        run._boxed_call = compiled._boxed_call
    return run


def _warn_if_nothing_found(ctx: Context, policy: Policy) -> None:
    if ctx.report.attention() or ctx.graph_index > 0:
        return
    wants = policy.attention.default.variant != "keep" or any(r.use.variant != "keep" for r in policy.attention.rules)
    if wants:
        warnings.warn(
            "attncc found no attention in this graph; nothing was rewritten. "
            "Run attncc.explain(model, args, policy) to see what the matcher saw.",
            stacklevel=3,
        )


def _verifying(compiled: Callable, original: fx.GraphModule, report: Report) -> Callable:
    state = {"checked": False}

    def run(*args):
        if state["checked"]:
            return compiled(*args)
        state["checked"] = True
        with torch.no_grad():
            expected = original(*[a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args])
        out = compiled(*args)
        _compare(out, expected, report)
        return out

    return run


TOLERANCE = {torch.float64: 1e-4, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
ABSOLUTE_FLOOR = 1e-6  # below this an output is zero for verify's purposes


def _tolerance(*dtypes: torch.dtype) -> float:
    """Relative tolerance for outputs of these dtypes: the loosest one's (unknown dtypes: half precision's)."""
    return max(TOLERANCE.get(dtype, TOLERANCE[torch.float16]) for dtype in dtypes)


def _compare(out: Any, expected: Any, report: Report) -> None:
    outs = torch.utils._pytree.tree_leaves(out)
    exps = torch.utils._pytree.tree_leaves(expected)
    for i, (a, b) in enumerate(zip(outs, exps)):
        if not isinstance(a, torch.Tensor) or not a.is_floating_point():
            continue
        tol = _tolerance(a.dtype, b.dtype)
        a, b = a.detach().double(), b.detach().double()
        err = (a - b).abs().max().item() if a.numel() else 0.0
        scale = b.abs().max().item() if b.numel() else 0.0
        bound = max(tol * scale, ABSOLUTE_FLOOR)
        if not err <= bound:
            rewritten = [f"{s.module} ({s.variant})" for s in report.sites if s.status == "rewritten"]
            raise VerificationError(
                f"verify: output {i} of the rewritten graph differs from the original graph by {err:.3g} "
                f"(tolerance {bound:.3g}: {tol:g} of the output's largest magnitude {scale:.3g}). "
                f"Rewritten sites: {', '.join(rewritten)}. "
                "Rerun with kernels='reference' to tell a kernel bug from a rewrite bug."
            )
