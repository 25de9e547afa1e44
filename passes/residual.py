"""Find the residual stream, and rewrite it into Attention Residuals (VARIANTS.md §9).

find_residual reports one site per residual add (one per attention and one per MLP sublayer), in
stream order; the stream starts at the first add's stream operand (the embedding output) and ends
where the last add's output goes (the final norm, or the output for a post-norm model).

rewrite_residual (policy `residual: {variant: attnres, block_size: S}`) replaces each sublayer's
input by an aggregation over its sources, exactly as `attncc.codegen.variants.attnres.reference.attnres_stream`
computes it: the adds become block partial sums, and an output aggregation replaces the stream that
the final norm reads.

Its parameters are never created here. `attncc.prepare(model, policy, example_args)` (attncc/attnres.py)
creates them on the model, as `model.attncc_attnres.<key>.query` and `.key_norm.weight` for the keys
`sublayer_<l>` (l >= 1; sublayer 0 has one source and is the identity) and `output`, and installs a
forward pre-hook on the stream's first sublayer module. Under torch.compile that hook calls the marker op

    attncc::attnres_anchor(Tensor[] params, str keys, float[] eps) -> ()

so dynamo traces the parameters like any other tensor the model reads: they are graph inputs
(placeholders, fetched from the model on every call), and the anchor node says which input is which
(`keys` comma-joined, two params per key: query, key-norm weight). This pass takes those nodes, uses
them in the rewrite and erases the anchor. Nothing about the model is looked up at compile time, so
there is no guard to install: another instance of the same class reuses the graph with its own
parameters, their gradients land on the model, and a recompile traces the hook again. Outside
torch.compile the hook does nothing, so eager calls compute the original model.

A graph whose stream would be rewritten but that has no anchor (the model was never prepared) fails
with an AttnccError naming the fix. Inside `discovering()` (what attncc.prepare traces with) the pass
instead records what each stream needs (`StreamNeeds`: keys, hidden size, eps, dtype, device, the
first sublayer's module) and leaves the graph as it is; its sites are reported as the rewrite would.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.fx as fx

from attncc.codegen.variants.attnres import aggregate as attnres_aggregate
from attncc.errors import AttnccError
from attncc.fx import (layer_of, meta_value, module_stack, orphaned, owning_module, read_nodes, remove_dead, shape_of,
                       static_int)
from attncc.patterns.residual import NoMatch, ResidualMatch, match_residual, norm_kind
from attncc.report import Site

from .context import Context, SiteState
from .model import registered_model

log = logging.getLogger("attncc")

DEFAULT_EPS = 1e-6
UNPREPARED = ("call attncc.prepare(model, policy, example_args) before compiling, or use "
              "attncc.compile(model, policy)")


@torch.library.custom_op("attncc::attnres_anchor", mutates_args=())
def attnres_anchor(params: list[torch.Tensor], keys: str, eps: list[float]) -> None:
    """Marks, in a traced graph, the AttnRes parameters of the stream (see the module docstring)."""


@attnres_anchor.register_fake
def _(params: list[torch.Tensor], keys: str, eps: list[float]) -> None:
    return None


ANCHOR = torch.ops.attncc.attnres_anchor.default
torch.fx.node.has_side_effect(ANCHOR)  # no output: dead-code elimination must not drop it before this pass


@dataclass(frozen=True)
class StreamNeeds:
    """What one stream's AttnRes needs, as a discovery trace (attncc.prepare) records it."""

    keys: tuple[str, ...]  # sublayer_1 ... sublayer_<n-1>, output
    dim: int
    eps: float
    dtype: torch.dtype
    device: torch.device
    module: str  # the first sublayer's module path (relative to the compiled root): where the anchor goes


_DISCOVERY = threading.local()


@contextlib.contextmanager
def discovering() -> Iterator[list[StreamNeeds]]:
    """Inside: rewrite_residual records each stream's needs into the yielded list instead of rewriting."""
    outer = getattr(_DISCOVERY, "found", None)
    _DISCOVERY.found = found = []
    try:
        yield found
    finally:
        _DISCOVERY.found = outer


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
    _number_layers([s for s in ctx.sites if s.kind == "residual"])


def _attention_nodes(ctx: Context):
    """A predicate: does a node belong to an attention site found by find_attention?"""
    anchors: set[fx.Node] = set()
    unmatched: set[str] = set()
    for state in ctx.sites:
        if state.kind != "attention":
            continue
        if state.match is None:
            unmatched.add(state.module)
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
        if state.layer is None:
            if last < 0 or not (previous == "attention" and state.match.sublayer == "mlp"):
                last += 1
            state.layer = last
        last, previous = state.layer, state.match.sublayer


def rewrite_residual(ctx: Context) -> None:
    """Rewrite the residual stream into AttnRes when the policy asks for it; `keep` leaves it alone."""
    anchors = _take_anchors(ctx.gm.graph)  # the marker op never reaches the inner compiler
    states = [s for s in ctx.sites if s.kind == "residual"]
    variant = ctx.policy.residual
    if not states or variant.variant == "keep":
        return
    discovery = getattr(_DISCOVERY, "found", None)
    before = read_nodes(ctx.gm.graph)
    state_of = {id(s.match): s for s in states}
    streams = _streams([s.match for s in states])
    for stream in streams:
        problem = _refusal(stream, len(streams))
        stream_states = [state_of[id(m)] for m in stream.matches]
        if problem:
            for state in stream_states:
                state.site.status, state.site.reason = "unsupported", problem
            continue
        needs = _needs(stream)
        reasons = [_describe(stream, l) + "; " + _conversion(stream, l, variant.block_size, variant.exact_start)
                   for l in range(len(stream.matches))]  # before the rewrite rewires what they describe
        if discovery is not None:  # attncc.prepare's trace: record what the stream needs, rewrite nothing
            discovery.append(needs)
            for state, reason in zip(stream_states, reasons):
                state.site.status, state.site.reason = "kept", reason + "; attncc.prepare's trace: not rewritten"
            continue
        _rewrite_stream(ctx, stream, variant.block_size, _parameters(ctx, stream, anchors, needs),
                        [state.key for state in stream_states], variant.exact_start)
        for l, (state, reason) in enumerate(zip(stream_states, reasons)):
            state.site.status, state.site.reason = "rewritten", reason
            if l == 0:  # one source: no aggregation runs (the others record what they run, when they run)
                state.site.kernel = "none (one source)"
    remove_dead(ctx.gm.graph, orphaned(ctx.gm.graph, before))  # eliminate_dead_code would drop dynamo's effect nodes
    ctx.gm.graph.lint()


Parameters = dict[str, tuple[fx.Node, fx.Node, float]]  # key -> (query, key-norm weight, eps)


def _take_anchors(graph: fx.Graph) -> Parameters | None:
    """The AttnRes parameters the anchor op names (None without one); every anchor node is erased."""
    found: Parameters | None = None
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (ANCHOR, torch.ops.attncc.attnres_anchor):
            continue
        args = {**dict(zip(("params", "keys", "eps"), node.args)), **node.kwargs}
        params, keys, eps = args["params"], [k for k in args["keys"].split(",") if k], args["eps"]
        if found is None and len(params) == 2 * len(keys) == 2 * len(eps):
            found = {key: (params[2 * i], params[2 * i + 1], float(eps[i])) for i, key in enumerate(keys)}
        graph.erase_node(node)
    return found


def _needs(stream: Stream) -> StreamNeeds:
    """Keys, hidden size, eps (the model's own norms'), dtype and device (of the stream's parameters)."""
    keys = tuple(f"sublayer_{l}" for l in range(1, len(stream.matches))) + ("output",)
    eps = next((m.norm_eps for m in stream.matches if m.norm_eps is not None), DEFAULT_EPS)
    values = [meta_value(p) for m in stream.matches for p in m.params] + [meta_value(stream.start)]
    like = next(v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point())
    return StreamNeeds(keys, static_int(shape_of(stream.start)[-1]), float(eps), like.dtype, like.device,
                       stream.matches[0].module)


def _parameters(ctx: Context, stream: Stream, anchors: Parameters | None, needs: StreamNeeds) -> Parameters:
    """The anchor's parameters for this stream, checked against what it needs."""
    model = registered_model(ctx, [p for m in stream.matches for p in m.params])
    if anchors is None and model is not None:  # registered with attncc: prepared, or prepare is missing
        raise AttnccError(
            f"this graph holds {len(stream.matches)} residual sublayers of {type(model).__name__} but not its "
            "AttnRes parameters, which attncc.prepare's hook brings into the graph of the stream's first "
            "sublayer. If the model was prepared, the stream was cut into several graphs (a graph break, FSDP2 "
            "units, or DDP's split at gradient buckets: set torch._dynamo.config.optimize_ddp = False): AttnRes "
            f"needs the whole stream in one graph. If it was not, {UNPREPARED}."
        )
    if anchors is None:
        raise AttnccError(
            f"policy residual: attnres needs AttnRes parameters on the model (one query and one key norm per "
            f"aggregation, {len(needs.keys)} here), and attncc creates them only in attncc.prepare; this graph "
            f"has none (the model was not prepared): {UNPREPARED}."
        )
    missing = [key for key in needs.keys if key not in anchors]
    if missing:
        raise AttnccError(
            f"the model's attncc_attnres has no {', '.join(missing)}: it was prepared for another residual stream "
            f"(this one needs {', '.join(needs.keys)}); {UNPREPARED}."
        )
    for key in needs.keys:
        for node, what in zip(anchors[key][:2], ("query", "key_norm.weight")):
            shape = shape_of(node)
            if shape is None or tuple(static_int(n) for n in shape) != (needs.dim,):
                raise AttnccError(f"attncc_attnres.{key}.{what} has shape {shape}, but the stream has hidden size "
                                  f"{needs.dim}; {UNPREPARED}.")
    return {key: anchors[key] for key in needs.keys}


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


def _rewrite_stream(ctx: Context, stream: Stream, block_size: int, params: Parameters, keys: list[str],
                    exact_start: bool = False) -> None:
    """Replace sublayer l's input by attnres(sources_l) and the stream's end by the output aggregation.

    Each aggregation is `attnres.aggregate` (the fused kernel or the reference, as `kernels` says); it records
    what it runs into sublayer l's report row (`keys[l]`; the output aggregation has no row of its own).
    With `exact_start` each aggregation is multiplied by its number of sources (AttnRes.exact_start)."""
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

    def aggregate(sources: list[fx.Node], key: str, like_node: fx.Node, site: str = "") -> fx.Node:
        if len(sources) == 1:
            return sources[0]
        query, norm_weight, eps = params[key]
        node = insert("call_function", attnres_aggregate, (list(sources), query, norm_weight),
                      {"eps": eps, "kernels": ctx.options.kernels, "site": site})
        node.meta["example_value"] = meta_value(like_node)
        node.meta["nn_module_stack"] = dict(like_node.meta.get("nn_module_stack", {}))
        if exact_start:
            scaled = insert("call_function", operator.mul, (node, float(len(sources))))
            scaled.meta.update(example_value=node.meta["example_value"], nn_module_stack=node.meta["nn_module_stack"])
            return scaled
        return node

    def redirect(old: fx.Node, new: fx.Node) -> None:
        if new is not old:
            old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in created)

    blocks: list[fx.Node] = [stream.start]
    partial: fx.Node | None = None
    for l, match in enumerate(stream.matches):
        sources = blocks + ([partial] if partial is not None else [])
        if l > 0:
            redirect(match.stream, aggregate(sources, f"sublayer_{l}", match.stream, keys[l]))
        contribution = match.branch if match.pattern == "prenorm_residual" else match.output
        cursor = match.output
        partial = contribution if partial is None else insert("call_function", operator.add, (partial, contribution))
        if (l + 1) % block_size == 0:
            blocks.append(partial)
            partial = None
    final = blocks + ([partial] if partial is not None else [])
    redirect(stream.end, aggregate(final, "output", stream.end))


def _conversion(stream: Stream, l: int, block_size: int, exact_start: bool = False) -> str:
    """What the rewrite does at sublayer l, and whether the model computes the same at init."""
    form = "Full AttnRes" if block_size == 1 else f"Block AttnRes ({block_size} sublayers per block)"
    n_sources = 1 + l if block_size == 1 else 1 + l // block_size + (l % block_size > 0)
    how = f"{form}; identity: one source (the embedding)" if l == 0 else f"{form} over {n_sources} sources"
    if stream.matches[0].pattern == "postnorm_residual":
        return how + "; not function-preserving: post-norm (the norm follows the add), fine-tune after converting"
    if exact_start:
        return how + "; exact at init (zero queries; exact_start scales each aggregation by its sources)"
    raw = _raw_readers(stream)
    if raw:
        return how + f"; not function-preserving: the raw stream is also read by {', '.join(raw)}"
    return how + "; function-preserving at init (zero queries)"


def _raw_readers(stream: Stream) -> list[str]:
    """Readers of the pre-norm stream other than norms and the residual adds (they see h/c at init)."""
    adds = {m.add for m in stream.matches}
    values = [m.output for m in stream.matches]
    return sorted({u.name for v in values for u in v.users if u not in adds and not norm_kind(u)})
