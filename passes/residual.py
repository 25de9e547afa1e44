"""Find the residual stream, and rewrite it into Attention Residuals (VARIANTS.md §9).

find_residual reports one site per residual add (one per attention and one per MLP sublayer), in
stream order; the stream starts at the first add's stream operand (the embedding output) and ends
where the last add's output goes (the final norm, or the output for a post-norm model).

rewrite_residual (policy `residual: {variant: attnres, block_size: S}`) replaces each sublayer's
input by an aggregation over its sources, exactly as `attncc.codegen.reference.attnres.attnres_stream`
computes it: the adds become block partial sums, and an output aggregation replaces the stream that
the final norm reads. Its parameters are real nn.Parameters registered on the user's model:

    model.attncc_attnres                 AttnResParameters (an nn.ModuleDict)
        .sublayer_<l>.query              w_l, zeros(d)      for every sublayer l >= 1 (sublayer 0
        .sublayer_<l>.key_norm.weight    g_l, ones(d)        has one source and is the identity)
        .output.query / .output.key_norm.weight

so they are in model.state_dict() and model.parameters(); `attncc.parameters(model)` lists them. The
graph reads them through get_attr nodes holding the same objects, so AOT autograd lifts them as
parameters and their gradients land on the model. A recompile finds them on the model and reuses them.

The backend receives only the GraphModule, so the model is found from dynamo's record of where each
parameter came from: a parameter placeholder's `grapharg.source` (e.g. `L['self']._modules['h']...`)
is walked from its root in the frame being compiled (`InstructionTranslator.current_tx()`), and the
first nn.Module on the way that owns the parameter is the model. An ID_MATCH guard on that source
makes another instance of the same class recompile (and get its own parameters) instead of reusing
this graph (passes/model.py). Models prepared with `attncc.prepare(model)` are also found without dynamo's help.
"""

from __future__ import annotations

import logging
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn

from attncc.codegen.reference.attnres import attnres
from attncc.errors import AttnccError
from attncc.fx import (layer_of, meta_value, module_stack, orphaned, owning_module, read_nodes, remove_dead, shape_of,
                       static_int)
from attncc.patterns.residual import NoMatch, ResidualMatch, match_residual, norm_kind
from attncc.report import Site

from .context import Context, SiteState
from .model import find_model

log = logging.getLogger("attncc")

ATTRIBUTE = "attncc_attnres"
DEFAULT_EPS = 1e-6


class DepthQuery(nn.Module):
    """One AttnRes aggregation's parameters: the pseudo-query w (zeros) and the key RMSNorm (weight ones)."""

    def __init__(self, dim: int, eps: float = DEFAULT_EPS, dtype: torch.dtype | None = None,
                 device: torch.device | None = None):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device))
        self.key_norm = nn.RMSNorm(dim, eps=eps, dtype=dtype, device=device)

    def forward(self, sources: list[torch.Tensor]) -> torch.Tensor:
        return attnres(sources, self.query, self.key_norm.weight, self.key_norm.eps)


class AttnResParameters(nn.ModuleDict):
    """`model.attncc_attnres`: a DepthQuery per aggregation, keyed "sublayer_<l>" and "output"."""


def find_residual(ctx: Context) -> None:
    """Match every residual add; report one site per sublayer, in stream order."""
    order = {n: i for i, n in enumerate(ctx.gm.graph.nodes)}
    is_attention = _attention_nodes(ctx)
    matches = []
    for node in ctx.gm.graph.nodes:
        try:
            match = match_residual(node, order, is_attention)
        except NoMatch as miss:
            ctx.misses.append((node.name, str(miss)))
            continue
        if match is not None:
            matches.append(match)
    variant = ctx.policy.residual
    for stream in _streams(matches):
        for index, match in enumerate(stream.matches):
            site = Site(kind="residual", module=match.module, layer=layer_of(match.module), pattern=match.pattern,
                        mask="-", variant=variant.variant, params=variant.params(), status="kept",
                        reason=_describe(stream, index) + "; policy: keep")
            ctx.add_site(site, match)  # state.variant stays None: rewrite_attention skips the site
            ctx.count(match.pattern)
    _number_layers([s for s in ctx.sites if s.site.kind == "residual"])


def _attention_nodes(ctx: Context):
    """A predicate: does a node belong to an attention site found by find_attention?"""
    anchors: set[fx.Node] = set()
    unmatched: set[str] = set()
    for state in ctx.sites:
        if state.site.kind != "attention":
            continue
        if state.match is None:
            unmatched.add(state.site.module)
        else:
            anchors.update((state.match.anchor, state.match.output))

    def is_attention(node: fx.Node) -> bool:
        return node in anchors or (bool(unmatched) and owning_module(node)[0] in unmatched)

    return is_attention


@dataclass
class Stream:
    matches: list[ResidualMatch]
    problem: str | None = None  # why this stream cannot be rewritten

    @property
    def start(self) -> fx.Node:
        return self.matches[0].stream

    @property
    def end(self) -> fx.Node:
        return self.matches[-1].output


def _streams(matches: list[ResidualMatch]) -> list[Stream]:
    """Chain the matches: each sublayer reads the stream value the previous one produced."""
    outputs = {m.output for m in matches}
    readers: dict[fx.Node, list[ResidualMatch]] = {}
    for m in matches:
        readers.setdefault(m.stream, []).append(m)
    streams, taken = [], set()
    for m in matches:
        if id(m) in taken or m.stream in outputs:
            continue
        stream = Stream([m])
        taken.add(id(m))
        while nxt := readers.get(stream.end):
            if len(nxt) > 1:
                stream.problem = f"{len(nxt)} sublayers read the stream value {stream.end.name}"
                break
            stream.matches.append(nxt[0])
            taken.add(id(nxt[0]))
        streams.append(stream)
    for m in matches:
        if id(m) not in taken:
            streams.append(Stream([m], f"the stream branches before {m.add.name}"))
    return streams


def _place(node: fx.Node) -> str:
    stack = module_stack(node)
    return stack[-1][0] if stack and stack[-1][0] else node.name


def _describe(stream: Stream, index: int) -> str:
    match = stream.matches[index]
    text = f"{match.sublayer} sublayer, {match.norm}"
    if index == 0:
        text += f"; stream starts at {_place(stream.start)}"
    if index == len(stream.matches) - 1:
        text += f"; stream ends at {_stream_end(stream)}"
    return text


def _stream_end(stream: Stream) -> str:
    if stream.matches[-1].pattern == "postnorm_residual":
        return f"{_place(stream.end)} ({stream.matches[-1].norm})"
    norms = [u for u in stream.end.users if norm_kind(u)]
    if norms:
        return f"{_place(norms[0])} ({norm_kind(norms[0])})"
    return "the graph output" if any(u.op == "output" for u in stream.end.users) else stream.end.name


def _number_layers(states: list[SiteState]) -> None:
    """Sites whose module path has no index: an MLP after an attention shares its block, else a new block."""
    last, previous = -1, None
    for state in states:
        if state.site.layer is None:
            if last < 0 or not (previous == "attention" and state.match.sublayer == "mlp"):
                last += 1
            state.site.layer = last
        last, previous = state.site.layer, state.match.sublayer


def rewrite_residual(ctx: Context) -> None:
    """Rewrite the residual stream into AttnRes when the policy asks for it; `keep` leaves it alone."""
    states = [s for s in ctx.sites if s.site.kind == "residual"]
    variant = ctx.policy.residual
    if not states or variant.variant == "keep":
        return
    before = read_nodes(ctx.gm.graph)
    state_of = {id(s.match): s for s in states}
    streams = _streams([s.match for s in states])
    for stream in streams:
        problem = _refusal(stream, len(streams))
        if problem:
            for m in stream.matches:
                state_of[id(m)].site.status, state_of[id(m)].site.reason = "unsupported", problem
            continue
        _rewrite_stream(ctx, stream, variant.block_size, [state_of[id(m)] for m in stream.matches])
    remove_dead(ctx.gm.graph, orphaned(ctx.gm.graph, before))  # eliminate_dead_code would drop dynamo's effect nodes
    ctx.gm.graph.lint()


def _refusal(stream: Stream, n_streams: int) -> str | None:
    """Why a stream cannot be rewritten, or None."""
    if n_streams > 1:
        return f"{n_streams} residual streams in one graph (encoder-decoder?); AttnRes rewrites a single stream"
    if stream.problem:
        return stream.problem
    whole = "AttnRes needs the whole stream in one graph"
    if stream.start.op == "placeholder":
        return f"the stream enters this graph as an input (a graph break before it?); {whole}"
    if len({m.pattern for m in stream.matches}) > 1:
        return "the stream mixes pre-norm and post-norm sublayers"
    if stream.matches[-1].pattern == "prenorm_residual" and all(u.op == "output" for u in stream.end.users):
        return f"the stream leaves this graph without a final norm (a graph break after it?); {whole}"
    shape = shape_of(stream.start)
    if not shape or static_int(shape[-1]) is None:
        return "the stream's hidden size is not static"
    return None


def _rewrite_stream(ctx: Context, stream: Stream, block_size: int, states: list[SiteState]) -> None:
    """Replace sublayer l's input by attnres(sources_l) and the stream's end by the output aggregation."""
    model, source, like = find_model(ctx, [p for m in stream.matches for p in m.params])
    dim = static_int(shape_of(stream.start)[-1])
    eps = next((m.norm_eps for m in stream.matches if m.norm_eps is not None), DEFAULT_EPS)
    keys = [f"sublayer_{l}" for l in range(1, len(stream.matches))] + ["output"]
    queries = _depth_queries(model, keys, dim, eps, like)
    reasons = [_describe(stream, l) + "; " + _conversion(stream, l, block_size) for l in range(len(stream.matches))]
    graph = ctx.gm.graph
    created: set[fx.Node] = set()
    cursor = stream.start

    def insert(op: str, target: Any, args: tuple = (), kwargs: dict | None = None) -> fx.Node:
        nonlocal cursor
        with graph.inserting_after(cursor):
            node = graph.create_node(op, target, args, kwargs or {})
        created.add(node)
        cursor = node
        return node

    def aggregate(sources: list[fx.Node], key: str, like_node: fx.Node) -> fx.Node:
        if len(sources) == 1:
            return sources[0]
        depth = queries[key]
        query = insert("get_attr", _gm_parameter(ctx.gm, source, (key, "query"), depth.query))
        weight = depth.key_norm.weight
        norm_weight = insert("get_attr", _gm_parameter(ctx.gm, source, (key, "key_norm", "weight"), weight))
        node = insert("call_function", attnres, (list(sources), query, norm_weight), {"eps": depth.key_norm.eps})
        node.meta["example_value"] = meta_value(like_node)
        node.meta["nn_module_stack"] = dict(like_node.meta.get("nn_module_stack", {}))
        return node

    def redirect(old: fx.Node, new: fx.Node) -> None:
        if new is not old:
            old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in created)

    blocks: list[fx.Node] = [stream.start]
    partial: fx.Node | None = None
    for l, (match, state) in enumerate(zip(stream.matches, states)):
        sources = blocks + ([partial] if partial is not None else [])
        if l > 0:
            redirect(match.stream, aggregate(sources, f"sublayer_{l}", match.stream))
        contribution = match.branch if match.pattern == "prenorm_residual" else match.output
        cursor = match.output
        partial = contribution if partial is None else insert("call_function", operator.add, (partial, contribution))
        if (l + 1) % block_size == 0:
            blocks.append(partial)
            partial = None
        state.site.status, state.site.reason, state.site.kernel = "rewritten", reasons[l], "reference"
    final = blocks + ([partial] if partial is not None else [])
    redirect(stream.end, aggregate(final, "output", stream.end))
    _guard_identity(source)


def _conversion(stream: Stream, l: int, block_size: int) -> str:
    """What the rewrite does at sublayer l, and whether the model computes the same at init."""
    form = "Full AttnRes" if block_size == 1 else f"Block AttnRes ({block_size} sublayers per block)"
    n_sources = 1 + l if block_size == 1 else 1 + l // block_size + (l % block_size > 0)
    how = f"{form}; identity: one source (the embedding)" if l == 0 else f"{form} over {n_sources} sources"
    if stream.matches[0].pattern == "postnorm_residual":
        return how + "; not function-preserving: post-norm (the norm follows the add), fine-tune after converting"
    raw = _raw_readers(stream)
    if raw:
        return how + f"; not function-preserving: the raw stream is also read by {', '.join(raw)}"
    return how + "; function-preserving at init (zero queries)"


def _raw_readers(stream: Stream) -> list[str]:
    """Readers of the pre-norm stream other than norms and the residual adds (they see h/c at init)."""
    adds = {m.add for m in stream.matches}
    values = [m.output for m in stream.matches]
    return sorted({u.name for v in values for u in v.users if u not in adds and not norm_kind(u)})


def _gm_parameter(gm: fx.GraphModule, model_source: Any, path: tuple[str, ...], param: nn.Parameter) -> str:
    """Register `param` on the GraphModule (for a get_attr node) and tell AOT autograd where it lives.

    AOT autograd lifts a dynamo GraphModule's own parameters as inputs and looks each one up in
    `gm._param_name_to_source`; the source is `<model>.attncc_attnres.<key>...`.
    """
    name = "_".join((ATTRIBUTE, *path))
    if getattr(gm, name, None) is not param:
        gm.register_parameter(name, param)
    sources = getattr(gm, "_param_name_to_source", None)
    if isinstance(sources, dict):
        sources[name] = _attribute_source(model_source, (ATTRIBUTE, *path), name)
    return name


def _attribute_source(base: Any, path: tuple[str, ...], name: str) -> Any:
    from torch._dynamo.source import AttrSource, ConstantSource

    if base is None:
        return ConstantSource(name)
    for member in path:
        base = AttrSource(base, member)
    return base


def _depth_queries(model: nn.Module, keys: Iterable[str], dim: int, eps: float,
                   like: torch.Tensor) -> dict[str, DepthQuery]:
    """The model's DepthQuery for each key: the existing one (a recompile), else a new zero-query one."""

    container = model._modules.get(ATTRIBUTE)
    if container is None:
        container = AttnResParameters()
        model.add_module(ATTRIBUTE, container)
    elif not isinstance(container, AttnResParameters):
        raise AttnccError(f"{type(model).__name__}.{ATTRIBUTE} exists and is not attncc's AttnResParameters")
    out = {}
    for key in keys:
        if key not in container:
            with torch.inference_mode(False), torch.no_grad():
                container[key] = DepthQuery(dim, eps, dtype=like.dtype, device=like.device)
        module = container[key]
        if module.query.shape != (dim,):
            raise AttnccError(f"{ATTRIBUTE}.{key}.query has shape {tuple(module.query.shape)}, but the stream has "
                              f"hidden size {dim}")
        out[key] = module
    return out


def _guard_identity(source: Any) -> None:
    """Guard the compiled graph on the model's identity: its get_attr parameters belong to this model."""
    if source is None:
        return
    try:
        from torch._dynamo.guards import GuardBuilder, install_guard

        install_guard(source.make_guard(GuardBuilder.ID_MATCH))
    except Exception as error:
        warnings.warn(f"attncc could not guard the compiled graph on the model's identity ({error}); another "
                      "instance of the same class compiled with this backend may reuse this model's AttnRes "
                      "parameters. Use one backend per model.", stacklevel=2)
