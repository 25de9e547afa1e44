"""Find attention sites, classify their masks, choose variants, rewrite."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.fx as fx

from attncc.codegen.variants import SiteCall, same_size, variant_for
from attncc.errors import PolicyError
from attncc.facts import CAUSAL, NONE, OTHER, MaskKind, SiteFacts
from attncc.policy import check_sites
from attncc.patterns.attention import (
    AttentionMatch,
    NoMatch,
    TransposeOf,
    is_activation_matmul,
    is_sdpa,
    is_softmax_last_dim,
    match_sdpa,
    match_softmax_chain,
)
from attncc.patterns.masks import allowed_from_bias, classify
from attncc.fx import (ancestors, evaluate, layer_of, meta_value, orphaned, owning_module,
                       read_nodes, remove_dead, shape_of)
from attncc.report import Site

from .context import Context, SiteState
from .model import cache_window, layer_count, registered_model
from .site import mask_node, new_node, scale_node, site_values
from .sqa import rewrite_sqa


def find_attention(ctx: Context) -> None:
    """Match every SDPA call and every softmax over the last dim; record a site for each, and one for
    every attention op that decomposition refused (with its reason)."""
    for node, reason in ctx.refused_ops:
        module, _ = owning_module(node)
        name = getattr(node.target, "__name__", str(node.target))
        ctx.add_site(Site(kind="attention", module=module, layer=layer_of(module), pattern=name, status="unsupported",
                          reason=f"{reason}; left unchanged", mask="?"), None)
    for node in list(ctx.gm.graph.nodes):
        if is_sdpa(node):
            matcher = match_sdpa
        elif is_softmax_last_dim(node):
            matcher = match_softmax_chain
        else:
            continue
        try:
            match = matcher(node)
        except NoMatch as miss:
            if matcher is match_sdpa or _looks_like_attention(node):
                ctx.add_site(_unsupported_site(node, matcher, str(miss)), None)
            ctx.misses.append((node.name, str(miss)))
            continue
        ctx.add_site(_site_from_match(match), match)
        ctx.count(match.pattern)
    _number_layers(ctx)


def _looks_like_attention(softmax: fx.Node, depth: int = 8) -> bool:
    """A softmax whose input comes, through any ops, from a product of two activations: worth reporting."""
    frontier = [softmax.args[0]]
    for _ in range(depth):
        frontier = [n for n in frontier if isinstance(n, fx.Node)]
        if any(is_activation_matmul(n) for n in frontier):
            return True
        frontier = [i for n in frontier for i in n.all_input_nodes]
    return False


def _unsupported_site(node: fx.Node, matcher, reason: str) -> Site:
    module, _ = owning_module(node)
    pattern = "sdpa_attention" if matcher is match_sdpa else "softmax_attention"
    return Site(kind="attention", module=module, layer=layer_of(module), pattern=pattern,
                status="unsupported", reason=reason, mask="?")


def _site_from_match(match: AttentionMatch) -> Site:
    module, _ = owning_module(match.anchor)
    q_src, k_src = _projection_input(match.q), _projection_input(match.k)
    cross = (match.q_len is not None and match.kv_len is not None and match.q_len != match.kv_len) or (
        q_src is not None and k_src is not None and q_src is not k_src
    )
    scale = match.scale
    if scale is None and match.head_dim:
        scale = 1.0 / math.sqrt(match.head_dim)
    return Site(
        kind="attention",
        module=module,
        layer=layer_of(module),
        pattern=match.pattern,
        heads=match.heads,
        kv_heads=match.kv_heads,
        head_dim=match.head_dim,
        scale=scale if isinstance(scale, float) else None,
        dropout=match.dropout_p if isinstance(match.dropout_p, float) else None,
        cross=cross,
    )


def _projection_input(node: Any, depth: int = 24) -> fx.Node | None:
    """The activation a q/k tensor was projected from (the input of its nearest linear or addmm)."""
    if isinstance(node, TransposeOf):
        node = node.node
    seen = 0
    todo = [node]
    while todo and seen < depth:
        n = todo.pop(0)
        seen += 1
        if not isinstance(n, fx.Node):
            continue
        if n.op == "call_function" and n.target is torch._C._nn.linear:
            return n.args[0]
        if n.op == "call_function" and n.target is torch.addmm:  # GPT-2's Conv1D: addmm(bias, x, weight)
            return n.args[1]
        todo.extend(n.all_input_nodes)
    return None


def _number_layers(ctx: Context) -> None:
    """Sites whose module path has no index are numbered in graph order, after the indexed ones."""
    states = [s for s in ctx.sites if s.kind == "attention"]
    if all(s.layer is not None for s in states):
        return
    taken = {s.layer for s in states if s.layer is not None}
    nxt = max(taken, default=-1) + 1
    for state in states:
        if state.layer is None:
            state.layer = nxt
            nxt += 1


def classify_masks(ctx: Context) -> None:
    """Decide each site's mask structure; what depends on values is left to run time.

    A mask built from sizes and constants alone cannot change with input values: its structure is
    decided here (at the example's sizes, and for symbolic sizes at more lengths, see
    `_classify_by_example`). A mask that reads input values (an attention_mask, a buffer) is
    classified from the example as a hypothesis: the site's op gets the mask, reads the key padding
    off it and checks the structure on every call. A mask that reads parameters (a learned bias) is
    kept dense, so its values and gradients flow at run time.
    """
    for state in ctx.sites:
        match = state.match
        if match is None or state.kind != "attention":
            continue
        q_shape, k_shape, _ = match.shapes()
        if match.is_causal and not (q_shape and k_shape and same_size(q_shape[-2], k_shape[-2])):
            state.site.status, state.site.reason = "unsupported", TOP_LEFT
            continue
        decoding = _decoding(match)
        model = registered_model(ctx, ancestors([match.q])) if decoding else None
        kind = _classify(ctx, match, decoding=model is not None)
        window = cache_window(model, state.layer) if model is not None else None
        if window is not None and kind.structure == "causal":  # the cache holds the window only
            kind = MaskKind("sliding_window", window, padding=kind.padding, checked=kind.checked)
        if match.is_causal:
            kind = CAUSAL if kind in (NONE, CAUSAL) else OTHER
        state.mask = kind
        state.site.mask = str(kind)
        state.site.causal = kind.causal
        if state.cross and kind.causal:
            state.cross = False


TOP_LEFT = ("SDPA's is_causal with queries and keys of sizes that may differ aligns the queries at the start of "
            "the keys; attncc's causal variants align them at the end (a decode step), so the site is left unchanged")


def _decoding(match: AttentionMatch) -> bool:
    """A single query projected from the same activation as its keys: a decode step of self-attention
    (the keys are a cache plus the query's own token). Its query ends the key sequence, so a mask that
    allows every key is causal there (masks.classify), when the model is registered: only the model
    tells whether its cache keeps every token or a window (`model.cache_window`). In a model attncc
    does not know, the step stays `none` (position-dependent variants refuse it)."""
    q_src, k_src = _projection_input(match.q), _projection_input(match.k)
    return match.q_len == 1 and q_src is not None and q_src is k_src


def _mask_target(match: AttentionMatch) -> fx.Node | None:
    """The node holding the site's mask (SDPA's attn_mask, or the chain's masked logits), or None."""
    if match.pattern == "sdpa_attention":
        return match.attn_mask
    return match.logits if match.has_mask_ops else None


def _mask_inputs(ctx: Context, match: AttentionMatch, target: fx.Node) -> tuple[bool, bool]:
    """(reads values that want gradients, reads other input values) of the mask sub-graph, the scores
    excluded. A mask that wants gradients is kept dense: the site's ops give no gradient to a mask."""
    stop = {match.scores} if match.scores is not None else set()
    values = ctx.input_values()
    params = reads = False
    for node in ancestors([target], stop=stop) - stop:
        if node.op != "placeholder":
            continue
        value = values.get(node, meta_value(node))
        if not isinstance(value, torch.Tensor):
            continue
        if value.requires_grad:  # a parameter (a learned bias), or an input the caller differentiates
            params = True
        else:
            reads = True
    return params, reads


def _classify(ctx: Context, match: AttentionMatch, decoding: bool) -> MaskKind:
    """The site's mask kind: a compile-time fact, or a hypothesis its op checks on every call."""
    target = _mask_target(match)
    if target is None:
        return CAUSAL if decoding else NONE
    if not isinstance(target, fx.Node):
        return OTHER
    params, reads = _mask_inputs(ctx, match, target)
    if params:
        return OTHER
    kind = _classify_by_example(ctx, match, target, decoding)
    if not kind.structural:
        return kind
    if reads:
        return MaskKind(kind.structure, kind.window, padding=True, checked=True)
    return kind


def _classify_by_example(ctx: Context, match: AttentionMatch, target: fx.Node, decoding: bool) -> MaskKind:
    """The mask kind on the example inputs; for a graph with symbolic sizes, also at other lengths.

    A graph with static sizes only ever runs at its example's sizes (dynamo guards them), so one
    evaluation is the whole answer. A graph with symbolic sizes is evaluated again with its size
    symbols rebound: one length past the example, and one past every integer constant of the mask
    sub-graph (a window of 4096 only shows beyond 4096 tokens). Every length must give the same
    structure (padding aside), else the mask is `other`.
    """
    kind = _classify_at(ctx, match, target, ctx.placeholder_values(), {}, decoding)
    seen = [(match.kv_len, kind)]
    for values, bindings in ctx.alternative_lengths(_int_constants(target, match)):
        length = ctx.concrete(meta_value(match.k).shape[-2], bindings) if shape_of(match.k) else None
        seen.append((length, _classify_at(ctx, match, target, values, bindings, decoding)))
    windows = {k.window for _, k in seen if k.window is not None}
    if len(windows) > 1:
        return OTHER
    window = next(iter(windows), None)
    final = ("sliding_window", window) if window is not None else _structure(kind)
    for length, other in seen:
        # a window of w looks causal at w tokens or fewer
        hidden = final[0] == "sliding_window" and _structure(other)[0] == "causal" and length is not None and length <= window
        if _structure(other) != final and not hidden:
            return OTHER
    if window is not None and kind.window is None:
        return MaskKind("sliding_window", window, padding=kind.padding)
    return kind


def _structure(kind: MaskKind) -> tuple[str, int | None]:
    """A mask kind without its padding (padding comes from the inputs' values, not the structure)."""
    return kind.structure, kind.window


def _classify_at(ctx: Context, match: AttentionMatch, target: fx.Node, values: dict, bindings: dict,
                 decoding: bool) -> MaskKind:
    seed = {}
    if match.pattern != "sdpa_attention":
        value = meta_value(match.scores)
        shape = [ctx.concrete(d, bindings) for d in value.shape]
        if any(d is None for d in shape):
            return OTHER
        seed = {match.scores: torch.zeros(shape, dtype=value.dtype, device=value.device)}
    bias = evaluate_mask(ctx, target, seed, values)
    if bias is None:
        return OTHER
    allowed, pure = allowed_from_bias(bias)
    return classify(allowed, pure, decoding=decoding)


def _int_constants(target: fx.Node, match: AttentionMatch) -> set[int]:
    """Integer literals in the mask sub-graph (candidate window sizes)."""
    stop = {match.scores} if match.scores is not None else set()
    found: set[int] = set()
    for node in ancestors([target], stop=stop) - stop:
        for arg in torch.utils._pytree.tree_leaves((node.args, node.kwargs)):
            if isinstance(arg, int) and not isinstance(arg, bool) and 1 < abs(arg) <= 1 << 16:
                found.add(abs(arg))
    return found


def choose_variants(ctx: Context) -> None:
    """Apply the policy: each site gets the variant of the first matching rule, else the default.

    Whether every rule matches a site and every layer range lies inside the model is a question about
    the whole model, which may span several graphs: explain() answers it (and raises); one graph
    only warns when its sites alone would fail the check.
    """
    attention = [s for s in ctx.sites if s.kind == "attention"]
    layers = [s.layer for s in attention if s.layer is not None]
    if attention:
        try:
            check_sites(ctx.policy, [(s.module, s.layer) for s in attention], max(layers, default=0) + 1)
        except PolicyError as problem:
            ctx.policy_warnings.append(str(problem))
    by_layer = _depends_on_layer(ctx.policy)
    for state in attention:
        if state.site.status == "unsupported":  # refused while classifying its mask
            continue
        if by_layer and layer_of(state.module) is None:
            state.site.status, state.site.reason = "unsupported", UNINDEXED.format(by_layer=by_layer)
            continue
        variant, _ = ctx.policy.choose(state.module, state.layer)
        state.variant = variant
        state.site.variant = variant.variant
        state.site.params = variant.params()


UNINDEXED = ("the site's module path has no layer index (this graph compiles a part of the model, such as one "
             "decoder layer, and dynamo reuses it for every module of the same class), but the policy treats "
             "layers differently ({by_layer}): attncc cannot tell which layer runs this graph, so the site is left "
             "unchanged. Compile the whole model, or use a policy that is the same for every layer")


def _depends_on_layer(policy) -> str:
    """What in the policy depends on a site's layer index ('' when nothing does)."""
    reasons = [f"rules[{i}] selects layers" for i, rule in enumerate(policy.attention.rules)
               if rule.where.layers is not None]
    reasons += [f"{path} needs the layer index" for path, config in policy.attention_configs()
                if variant_for(config).needs_layers(config)]
    return "; ".join(reasons)


def rewrite_attention(ctx: Context) -> None:
    """Replace each chosen site by its variant's call; sites kept or refused stay as they are."""
    before = read_nodes(ctx.gm.graph)
    warn: dict[str, list[str]] = {}
    for state in ctx.sites:
        if state.match is None or state.variant is None or state.kind != "attention":
            continue
        variant = variant_for(state.variant)
        if not variant.rewrites:
            state.site.status, state.site.reason = "kept", "policy: keep"
            continue
        facts = site_facts(ctx, state, layers=variant.needs_layers(state.variant))
        refusal = variant.check(facts, state.variant)
        if not refusal:
            call = variant.call(facts, state.variant, kernels=ctx.options.kernels, key=state.key)
            refusal = rewrite_sqa(ctx, state, call) if variant.rewrites_projections else _replace_site(ctx, state, call)
        if refusal:
            state.site.status, state.site.reason = "unsupported", refusal
            if variant.warns_on_refusal:
                warn.setdefault(variant.name, []).append(f"{state.module or '<root>'} (layer {state.layer}): {refusal}")
        else:
            state.site.status = "rewritten"
    for name, problems in warn.items():
        warnings.warn(f"attncc: {len(problems)} {name} site(s) left unchanged: " + "; ".join(problems), stacklevel=2)
    remove_dead(ctx.gm.graph, orphaned(ctx.gm.graph, before))  # not eliminate_dead_code: it drops dynamo's effectful nodes
    ctx.gm.graph.lint()


def site_facts(ctx: Context, state: SiteState, layers: bool = False) -> SiteFacts:
    """What a variant may decide from; `layers`: also read the model's layer count (costs a walk to the model)."""
    match = state.match
    q, k, _ = site_values(match)
    shape = lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else ()  # noqa: E731
    dropout = match.dropout_p if isinstance(match.dropout_p, float) else None
    return SiteFacts(mask=state.mask, q_shape=shape(q), k_shape=shape(k), heads=match.heads, kv_heads=match.kv_heads,
                     head_dim=match.head_dim, layer=state.layer,
                     layers=layer_count(ctx, state.module, match.q) if layers else None, dropout=dropout)


def _replace_site(ctx: Context, state: SiteState, call: SiteCall) -> None:
    """Replace the matched site by `call(q, k, v, mask | None, scale, dropout_p)`.

    q, k, v go in as [.., H, T, D]; a site whose scores were viewed to other leading dims (bmm on
    [B·H, T, D] viewed to [B, H, T, T]) is run in the scores' view and its output viewed back.
    """
    match, variant = state.match, call.variant
    graph = ctx.gm.graph
    with graph.inserting_before(match.output):
        k = match.k
        if isinstance(k, TransposeOf):
            k = new_node(graph, torch.transpose, (k.node, -2, -1), like=k.node)
        q, v = match.q, match.v
        if match.view_lead is not None:
            q, k, v = (new_node(graph, torch.reshape, (x, (*match.view_lead, *value.shape[-2:])))
                       for x, value in zip((q, k, v), site_values(match)))
        mask = mask_node(graph, match) if state.mask.needs_tensor else None
        scale = scale_node(graph, match) if variant.scaled else 1.0
        dropout_p = match.dropout_p if variant.takes_dropout else 0.0
        new = graph.call_function(call, (q, k, v, mask, scale, dropout_p))
        if match.view_lead is not None:
            new = new_node(graph, torch.reshape, (new, tuple(shape_of(match.output))))
    new.meta.update({key: match.output.meta[key] for key in ("example_value", "nn_module_stack", "stack_trace")
                     if key in match.output.meta})
    match.output.replace_all_uses_with(new)
    if match.dropout_p and not variant.takes_dropout:
        p = match.dropout_p if isinstance(match.dropout_p, float) else "(a run-time value)"
        state.site.reason = f"attention dropout p={p} is not part of {variant.name}"


def evaluate_mask(ctx: Context, target: fx.Node, seed: dict, values: dict | None = None) -> torch.Tensor | None:
    """Evaluate a mask sub-graph on the example inputs (or `values`); None when impossible or too costly."""
    needed = ancestors([target], stop=set(seed)) - set(seed)
    for node in needed:
        if node.op == "call_function" and node.target in _HEAVY:
            return None
        if _mutates_input(node):
            return None
    try:
        (value,) = evaluate([target], ctx.placeholder_values() if values is None else values, seed)
    except Exception:
        return None
    return value if isinstance(value, torch.Tensor) else None


def _mutates_input(node: fx.Node) -> bool:
    """An in-place method on a graph input (evaluating it would change the user's tensor)."""
    name = str(node.target)
    if node.op != "call_method" or not name.endswith("_") or name.startswith("__"):
        return False
    owner = node.args[0]
    return not isinstance(owner, fx.Node) or owner.op == "placeholder"


_HEAVY = {torch._C._nn.linear, torch.matmul, torch.conv1d, torch.conv2d, torch.nn.functional.embedding}
