"""AttnRes parameters in the user's model: created in one public place, `attncc.prepare`, never by the backend.

    attncc.prepare(model, policy, example_args)   # create them now (an optimizer built next sees them)
    attncc.parameters(model)                      # the ones attncc registered
    compiled = attncc.compile(model, policy)      # the same, done on the first call, then torch.compile

How the backend finds them without looking at dynamo's internals:

1. prepare traces the model once (torch.compile with an eager attncc backend, inside
   `passes.residual.discovering()`): the residual pass records what the stream needs (the aggregation
   keys `sublayer_<l>` and `output`, hidden size, the norms' eps, dtype, device, the first sublayer's
   module) and rewrites nothing.
2. prepare creates `model.attncc_attnres` (zero queries, unit key-norm weights) on the model itself,
   or reuses the existing one (checking its shapes), and registers the model (passes/model.remember).
3. prepare installs a forward pre-hook (`Anchor`) on the stream's first sublayer module. Under
   torch.compile it calls the marker op `attncc::attnres_anchor(params, keys, eps)`; dynamo traces the
   parameters it reads like any other, so in every graph they are inputs (read from the model on every
   call) and the anchor node names them. The residual pass uses those nodes and erases the anchor.
   In eager calls the hook does nothing: the prepared model computes what it computed before.

A graph that would rewrite a stream without an anchor (an unprepared model) fails with an AttnccError
that says to call attncc.prepare or attncc.compile.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attncc.compiler import Backend, failing_past_recompile_limit, keeping_last_report, trace_once
from attncc import decode
from attncc.errors import AttnccError
from attncc.passes.model import remember
from attncc.passes.residual import DEFAULT_EPS, StreamNeeds, attnres_anchor, discovering
from attncc.policy import Policy, load_policy

ATTRIBUTE = "attncc_attnres"



class DepthQuery(nn.Module):
    """One AttnRes aggregation's parameters: the pseudo-query w (zeros) and the key RMSNorm (weight ones)."""

    def __init__(self, dim: int, eps: float = DEFAULT_EPS, dtype: torch.dtype | None = None,
                 device: torch.device | None = None):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device))
        self.key_norm = nn.RMSNorm(dim, eps=eps, dtype=dtype, device=device)


class AttnResParameters(nn.ModuleDict):
    """`model.attncc_attnres`: a DepthQuery per aggregation, keyed "sublayer_<l>" and "output"."""


class Anchor:
    """The forward pre-hook prepare installs: under torch.compile, the marker op that puts the AttnRes
    parameters into the traced graph (query and key-norm weight per key, in the container's order)."""

    def __init__(self, container: AttnResParameters):
        self.container = container

    def __call__(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            depth = list(self.container.values())
            attnres_anchor([p for d in depth for p in (d.query, d.key_norm.weight)], ",".join(self.container.keys()),
                           [float(d.key_norm.eps) for d in depth])


def parameters(model: nn.Module) -> list[nn.Parameter]:
    """The AttnRes parameters attncc registered on `model` (empty before attncc.prepare)."""
    model = getattr(model, "_orig_mod", model)
    container = model._modules.get(ATTRIBUTE)
    return list(container.parameters()) if container is not None else []


def prepare(model: nn.Module, policy: Any = None, example_args: Any = None,
            example_kwargs: dict | None = None) -> nn.Module:
    """Register `model` with attncc and, for a policy with `residual: attnres`, create its AttnRes parameters.

    `attncc.prepare(model)` only registers the model (whole-model facts such as Lightning decay's layer
    count come from it). With an AttnRes policy, `example_args` (and `example_kwargs`) are needed: one
    forward pass traced by dynamo finds the residual stream, then `model.attncc_attnres` is created (or,
    when it exists, reused after checking its shapes), so that an optimizer built afterwards and
    `model.load_state_dict` see the parameters. Call it again with the same policy: nothing changes.
    Returns `model`.
    """
    model = getattr(model, "_orig_mod", model)
    remember(model)
    if policy is None:
        return model
    policy = policy.policy if isinstance(policy, Backend) else load_policy(policy)
    if policy.residual.variant == "keep":
        return model
    if example_args is None:
        raise AttnccError("attncc.prepare(model, policy) with residual: attnres needs example inputs to find the "
                          "residual stream: attncc.prepare(model, policy, example_args[, example_kwargs])")
    needs = _discover(model, policy, example_args, example_kwargs or {})
    container = _container(model, needs)
    _install_anchor(model, needs.module, container)
    remember(model)  # again: the AttnRes parameters are the model's now too
    return model


def _discover(model: nn.Module, policy: Policy, args: Any, kwargs: dict) -> StreamNeeds:
    """Trace one forward pass (policy: this residual rewrite, attention kept) and return what the stream needs."""
    if not isinstance(args, (tuple, list)):
        args = (args,)
    be = Backend(Policy(name=policy.name, target=policy.target, residual=policy.residual, source=policy.source),
                 inner="eager")
    with keeping_last_report(), discovering() as found:
        trace_once(model, be, tuple(args), kwargs)
    distinct = list(dict.fromkeys(found))
    if not distinct:
        raise AttnccError(f"attncc.prepare found no residual stream to rewrite in {type(model).__name__}:\n"
                          f"{be.report}")
    if len(distinct) > 1:
        raise AttnccError(f"attncc.prepare found {len(distinct)} residual streams in {type(model).__name__} (one per "
                          "graph: an encoder-decoder, or graph breaks?); AttnRes rewrites a single stream")
    return distinct[0]


def _container(model: nn.Module, needs: StreamNeeds) -> AttnResParameters:
    """model.attncc_attnres with a DepthQuery per key the stream needs: the existing ones, checked, else new."""
    container = model._modules.get(ATTRIBUTE)
    if container is None:
        container = AttnResParameters()
        model.add_module(ATTRIBUTE, container)
    elif not isinstance(container, AttnResParameters):
        raise AttnccError(f"{type(model).__name__}.{ATTRIBUTE} exists and is not attncc's AttnResParameters")
    unknown = sorted(set(container) - set(needs.keys))
    if unknown:
        raise AttnccError(f"{ATTRIBUTE} has {', '.join(unknown)}, which this model's residual stream does not have "
                          f"(it needs {', '.join(needs.keys)}): it was prepared for another model or policy")
    for key in needs.keys:
        if key not in container:
            with torch.inference_mode(False), torch.no_grad():
                container[key] = DepthQuery(needs.dim, needs.eps, dtype=needs.dtype, device=needs.device)
        depth = container[key]
        for name, p in (("query", depth.query), ("key_norm.weight", depth.key_norm.weight)):
            if tuple(p.shape) != (needs.dim,):
                raise AttnccError(f"{ATTRIBUTE}.{key}.{name} has shape {tuple(p.shape)}, but the residual stream "
                                  f"has hidden size {needs.dim}")
    return container


def _install_anchor(model: nn.Module, path: str, container: AttnResParameters) -> None:
    """The Anchor hook on the stream's first sublayer module (the model itself when the path is not found there),
    replacing any earlier one: in the graph of the stream whenever the stream is whole in one graph."""
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, Anchor):
                del module._forward_pre_hooks[key]
    try:
        owner = model.get_submodule(path) if path else model
    except AttributeError:
        owner = model
    owner.register_forward_pre_hook(Anchor(container))


RECOMPILE_FIX = ("pass dynamic=True to attncc.compile (one graph for every length), call torch._dynamo.reset() "
                 "between models of one class, or raise the limit")
CACHE_ARGUMENTS = ("cache", "past_key_values")  # generate's name for the cache: transformers >= 5.24, before


class Compiled:
    """What attncc.compile returns: torch.compile's module, whose first call prepares the model.

    Past dynamo's recompile limit a call raises AttnccError, where torch.compile would silently run
    the model's original attention.

    Attributes other than the call and `generate` are torch.compile's (`.train()`, `.parameters()`,
    `._orig_mod`, ...).
    """

    def __init__(self, model: nn.Module, backend: Backend, torch_compile_kwargs: dict):
        self._attncc_backend = backend
        self._attncc_pending = backend.policy.residual.variant != "keep"
        self._attncc_compiled = torch.compile(model, backend=backend, **torch_compile_kwargs)
        self._attncc_kwargs = torch_compile_kwargs
        self._attncc_forward: Any = None
        self.state_decode = ""  # whether the last generate decoded from recurrent states, and why not

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._prepare(args, kwargs)
        with failing_past_recompile_limit("attncc.compile", RECOMPILE_FIX):
            return self._attncc_compiled(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The model's own `generate` (transformers), with every forward it calls compiled by attncc.

        generate calls `model.forward` directly, not the module: for the call, the model's `forward`
        is torch.compile(model.forward, backend=attncc's backend), the recipe transformers documents
        for compiled generation. The prefill and decode graphs both appear in the backend's report.

        When every attention layer gets `linear`, `mala` or a `sparse` sliding window and the caller
        passes no cache, generate carries an attncc.decode StateCache: each layer keeps O(d²) numbers per
        head (or its window's keys and values) instead of every key and value, and a decode step costs
        the same at any length; on the GPU with Inductor, a decode
        step's graph runs as a CUDA graph (backend option cudagraphs). `self.state_decode` says whether
        the last call decoded from states, and why not.
        """
        model = self._attncc_compiled._orig_mod
        ids = args[0] if args else kwargs.get("input_ids")
        self._prepare((), {"input_ids": ids, **({"attention_mask": kwargs["attention_mask"]}
                                               if kwargs.get("attention_mask") is not None else {})})
        if self._attncc_forward is None:
            self._attncc_forward = torch.compile(model.forward, backend=self._attncc_backend, **self._attncc_kwargs)
        cache = None
        chosen = any(kwargs.get(name) is not None for name in (*CACHE_ARGUMENTS, "cache_implementation")) or \
            getattr(getattr(model, "generation_config", None), "cache_implementation", None) is not None
        self.state_decode = "the caller chose the cache (cache, past_key_values, cache_implementation or use_cache)"
        if not chosen and kwargs.get("use_cache", True) is not False:
            cache, why = decode.state_cache(model, self._attncc_backend.policy, self._attncc_backend.options.kernels)
            self.state_decode = why or "every attention layer decodes from its state (recurrent or window cache)"
        own = model.__dict__.get("forward")
        model.forward = self._attncc_forward if cache is None else decode.managed_forward(self._attncc_forward, cache)
        implementation = model.config._attn_implementation
        try:
            if cache is not None:
                kwargs[decode.cache_argument(model)] = cache
                model.set_attn_implementation(decode.IMPLEMENTATION)
            with failing_past_recompile_limit("attncc.compile(...).generate", RECOMPILE_FIX):
                return model.generate(*args, **kwargs)
        finally:
            if cache is not None:
                model.set_attn_implementation(implementation)
            if own is None:
                del model.forward
            else:
                model.forward = own

    def _prepare(self, args: tuple, kwargs: dict) -> None:
        if self._attncc_pending:
            prepare(self._attncc_compiled._orig_mod, self._attncc_backend.policy, args, kwargs)
            self._attncc_pending = False

    def __getattr__(self, name: str) -> Any:
        try:
            compiled = self.__dict__["_attncc_compiled"]
        except KeyError:
            raise AttributeError(name) from None
        return getattr(compiled, name)


def compile(model: nn.Module, policy: Any = None, **torch_compile_kwargs: Any) -> Compiled:  # noqa: A001
    """`torch.compile(model, backend=attncc.backend(policy), **torch_compile_kwargs)`, with the model prepared.

    The model is registered now; when the policy uses AttnRes, the first call runs
    `attncc.prepare(model, policy, args, kwargs)` with that call's arguments (one extra traced forward
    pass), so the AttnRes parameters exist before anything is compiled. Build an optimizer after the first
    call, or call attncc.prepare yourself first. `policy` may also be a backend: `attncc.backend(policy,
    inner="aot_eager")`.
    """
    model = getattr(model, "_orig_mod", model)
    remember(model)
    backend = policy if isinstance(policy, Backend) else Backend(policy)
    return Compiled(model, backend, torch_compile_kwargs)
