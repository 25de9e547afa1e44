"""Decode from a state: a transformers `Cache` whose layers hold what each layer's attention needs of
the earlier tokens, instead of every key and value: linear attention and MALA a recurrent state
(O(d²) numbers per head), a sliding window with sinks its window cache (the sinks and the last
`window` keys and values, a ring).

    compiled = attncc.compile(model, {"attention": "linear"})
    compiled.generate(input_ids, attention_mask=mask, max_new_tokens=64)   # uses a StateCache

`Compiled.generate` builds a `StateCache` when every attention layer of the model gets `linear`,
`mala` or a `sparse` sliding window, in any mix (`state_cache` says why not, otherwise: the usual KV
cache then serves, through the graph rewrite). For that call the model's attention implementation is
attncc's (registered with transformers' AttentionInterface): the prefill writes each layer's state,
each decode step reads and advances it. Both run as one op per layer (attncc::linear_state,
attncc::mala_state, attncc::window_state), which the compile pipeline reports as a site with what it
ran.

How the state reaches the attention function: each attention module holds its layer's StateLayer as
the attribute `attncc_state` (the cache holds the same objects), and the attention function, which
transformers calls with the module, reads it there. The cache's `update` hands the new keys and values
through unchanged; `attend` folds them into the state.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from attncc.codegen.variants.linear.ops import linear_state
from attncc.codegen.variants.linear.reference import constant_decay_rates, feature_dim, lightning_decay_rates
from attncc.codegen.variants.mala.ops import mala_state
from attncc.codegen.variants.sparse.ops import window_state
from attncc.errors import AttnccError
from attncc.passes.model import cache_window
from attncc.policy import Policy

IMPLEMENTATION = "attncc_state"  # the attention implementation name registered with transformers
ATTRIBUTE = "attncc_state"  # each attention module's StateLayer
STATE_VARIANTS = ("linear", "mala", "sparse")  # sparse: the sliding_window pattern


@dataclass(frozen=True)
class Plan:
    """What one attention layer computes: its variant and the constants the state ops take."""

    module: str
    layer: int
    variant: str
    constants: dict[str, Any] = field(default_factory=dict)
    heads: int | None = None  # query heads
    head_dim: int | None = None
    kv_heads: int | None = None
    dtype: torch.dtype = torch.float32  # the model's: a window cache holds keys and values in it

    def state_buffers(self, batch: int) -> list[tuple[tuple[int, ...], torch.dtype]] | None:
        """The (shape, dtype) of each tensor of the layer's state for `batch` rows (keys and values of
        head_dim each), or None where the module does not say its head counts and head dim."""
        if self.heads is None or self.head_dim is None or (self.variant == "sparse" and self.kv_heads is None):
            return None
        b, h, d, f32 = batch, self.heads, self.head_dim, torch.float32
        if self.variant == "sparse":
            slots = self.constants["sinks"] + self.constants["window"]
            return [((b, self.kv_heads, slots, d), self.dtype)] * 2 + [((b, slots), torch.bool)]
        if self.variant == "mala":
            return [((b, h, d, d), f32), ((b, h, 1, d), f32), ((b, h, 1, d), f32), ((b, 1, 1, 1), f32)]
        f = feature_dim(self.constants["feature_map"], d)
        return [((b, h, f, d), f32), ((b, h, f, 1), f32)]


def plans(model: nn.Module, policy: Policy) -> tuple[list[Plan], str | None]:
    """One Plan per attention layer of a transformers model (modules with a `layer_idx`), in layer
    order, and None; or [] and the reason the model cannot decode from a state."""
    attention = [(path, m) for path, m in model.named_modules()
                 if isinstance(getattr(m, "layer_idx", None), int) and type(m).__name__.endswith("Attention")]
    if not attention:
        return [], "no attention module with a layer_idx (a transformers decoder) was found"
    count = len({m.layer_idx for _, m in attention})
    if count != len(attention):
        return [], "several attention modules share a layer index (cross-attention?)"
    if policy.residual.variant != "keep":
        return [], ("the AttnRes residual rewrite finds the stream through the attention sites it matches, and "
                    "a state decode step has none")
    config = getattr(model, "config", None)
    heads = getattr(getattr(config, "get_text_config", lambda: config)(), "num_attention_heads", None)
    hidden = getattr(getattr(config, "get_text_config", lambda: config)(), "hidden_size", None)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    out = []
    for path, module in sorted(attention, key=lambda item: item[1].layer_idx):
        variant, _ = policy.choose(path, module.layer_idx)
        shape = _heads_and_dim(module, heads, hidden)
        if variant.variant not in STATE_VARIANTS or getattr(variant, "pattern", "sliding_window") != "sliding_window":
            name = variant.variant + (f" {variant.pattern}" if variant.variant == "sparse" else "")
            return [], (f"{path} gets {name}, which decodes from its KV cache (state: linear, mala, "
                        "sparse sliding_window)")
        if getattr(module, "is_causal", True) is not True:
            return [], f"{path} is not causal"
        if cache_window(model, module.layer_idx) is not None:
            return [], f"{path} attends within the model's own sliding window, which {variant.variant} cannot serve"
        if variant.variant == "mala":
            out.append(Plan(path, module.layer_idx, "mala", {"sim_scale": variant.sim_scale}, *shape))
            continue
        if variant.variant == "sparse":
            out.append(Plan(path, module.layer_idx, "sparse", {"window": variant.window, "sinks": variant.sinks},
                            *shape, dtype=dtype))
            continue
        rates = None
        if variant.decay != "none":
            if heads is None:
                return [], "linear decay needs the model config's num_attention_heads"
            rates = (lightning_decay_rates(heads, module.layer_idx, count) if variant.decay == "lightning"
                     else constant_decay_rates(heads, float(variant.decay)))
        out.append(Plan(path, module.layer_idx, "linear", {
            "feature_map": variant.feature_map, "normalize": variant.normalize, "eps": variant.eps,
            "decay": None if rates is None else tuple(float(r) for r in rates)}, *shape))
    return out, None


def _heads_and_dim(module: nn.Module, heads: int | None, hidden: int | None) -> tuple[int | None, ...]:
    """(query heads, head dim, key/value heads) of an attention module: its own attributes, else the config's."""
    h = getattr(module, "num_heads", None) or heads
    d = getattr(module, "head_dim", None) or (hidden // h if hidden and h else None)
    if not (isinstance(h, int) and isinstance(d, int)):
        return None, None, None
    groups = getattr(module, "num_key_value_groups", 1)
    return h, d, h // groups if isinstance(groups, int) and groups > 0 else None


def _cache_classes():
    from transformers.cache_utils import Cache, CacheLayerMixin

    class StateLayer(CacheLayerMixin):
        """One attention layer's state (None before the prefill) and how many tokens it has seen: a
        recurrent state (linear, MALA), or a window cache (sparse sliding window: keys, values and which
        slots are filled; slot of position p: p for a sink, else sinks + (p - sinks) mod window)."""

        is_sliding = False
        is_compileable = False
        is_croppable = False

        def __init__(self, plan: Plan, kernels: str):
            super().__init__()
            self.plan, self.kernels = plan, kernels
            self.state: tuple[torch.Tensor, ...] | None = None
            self.seen = 0
            self.buffers: tuple[torch.Tensor, ...] | None = None  # kept across generate calls (allocate)
            self.managed = False  # Compiled.generate's forward trims the mask to the new tokens and counts them
            self.position: torch.Tensor | None = None  # a window cache's next position, on the device

        def lazy_initialization(self, key_states, value_states) -> None:
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            """The new keys and values go to the attention function as they are: it folds them into the
            state (`attend`)."""
            self.is_initialized = True
            return key_states, value_states

        def allocate(self, batch: int, device: torch.device) -> None:
            """Persistent state tensors for `batch` rows: the prefill writes its state into them and each
            step updates them in place, so a decode step's graph reads the same tensors every step and
            every generate (static addresses, which a CUDA graph needs)."""
            specs = self.plan.state_buffers(batch)
            if specs is None:  # the state is whatever the ops return; a window still needs its position here
                if self.position is None or self.position.device != torch.device(device):
                    self.position = torch.zeros(1, dtype=torch.long, device=device)
                return
            if self.buffers is None or [(tuple(t.shape), t.dtype) for t in self.buffers] != specs or \
                    self.buffers[0].device != torch.device(device):
                self.buffers = tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in specs)
                self.position = torch.zeros(1, dtype=torch.long, device=device)
                if self.buffers[0].is_cuda:
                    for t in (*self.buffers, self.position):
                        torch._dynamo.mark_static_address(t)

        def attend(self, q, k, v, key_padding, scale):
            """The variant's output for q over k, v and every earlier token; advances the state."""
            p, c = self.plan, self.plan.constants
            if p.variant == "sparse":
                return self._window(q, k, v, key_padding, scale)
            if p.variant == "linear":
                decay = None if c["decay"] is None else torch.tensor(c["decay"], dtype=torch.float32, device=q.device)
                s, z = self.state if self.state is not None else (None, None)
                o, *state = linear_state(q, k, v, key_padding, decay, s, z, c["feature_map"], c["normalize"], c["eps"],
                                         self.kernels, p.module)
            else:
                state = self.state if self.state is not None else (None,) * 4
                o, *state = mala_state(q, k, v, key_padding, *state, c["sim_scale"], self.kernels, p.module)
            self._keep(state)
            if not self.managed:
                self.seen = self.seen + q.shape[-2]
            return o

        def _window(self, q, k, v, key_padding, scale):
            """A sliding window with sinks: the prefill attends the prompt's window and keeps its sinks and
            last `window` keys; a decode step writes its key into its slot and attends the filled slots."""
            p, c = self.plan, self.plan.constants
            sinks, window = c["sinks"], c["window"]
            if self.state is None:
                o = window_state(q, k, v, key_padding, scale, window, sinks, False, self.kernels, p.module)
                self._keep(_window_cache(k, v, key_padding, sinks, window))
                if not self.managed:
                    self.position = torch.full((1,), k.shape[-2], dtype=torch.long, device=k.device)
                    self.seen = self.seen + q.shape[-2]
                return o
            if q.shape[-2] != 1 or k.shape[-2] != 1:
                raise AttnccError(f"{p.module}: a window cache decodes one new token per call, got {q.shape[-2]} "
                                  "(generate feeds one; for longer chunks, keep the KV cache: pass a cache to generate)")
            keys, values, valid = self.state
            slot = _slot(self.position, sinks, window)
            keys.index_copy_(2, slot, k)
            values.index_copy_(2, slot, v)
            new = key_padding[:, -1:] if key_padding is not None else torch.ones_like(valid[:, :1])
            valid.index_copy_(1, slot, new)
            o = window_state(q, keys, values, valid, scale, window, sinks, True, self.kernels, p.module)
            if not self.managed:
                self.position = self.position + 1
                self.seen = self.seen + 1
            return o

        def _keep(self, state: list[torch.Tensor]) -> None:
            """The new state, written into the current state's tensors (or the buffers) where the shapes
            agree, so that the tensors stay the same objects."""
            target = self.state if self.state is not None else self.buffers
            if target is not None and all(t.shape == n.shape and t.dtype == n.dtype for t, n in zip(target, state)):
                for t, n in zip(target, state):
                    t.copy_(n)
                self.state = target
            else:
                self.state = tuple(state)

        def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
            """The mask covers the new tokens only (earlier ones are in the state): from the seen-th column
            of the caller's mask, or from its first where Compiled.generate's forward passed only the new
            tokens' columns. transformers before 5.x passes the cache positions instead of their count."""
            if isinstance(query_length, torch.Tensor):
                query_length = query_length.shape[0]
            return query_length, 0 if self.managed else self.seen

        def get_seq_length(self) -> int:
            return self.seen

        def get_max_length(self) -> int:
            return -1

        def numel(self) -> int:
            return sum(t.numel() for t in self.state or ())

        def reset(self) -> None:
            self.state, self.seen, self.managed = None, 0, False

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            for t in self.state or ():
                t.copy_(t.index_select(0, beam_idx.to(t.device)))

    class StateCache(Cache):
        """A transformers Cache of recurrent states, one StateLayer per attention layer (attncc.decode)."""

        def __init__(self, layers: list[StateLayer]):
            super().__init__(layers=layers)

        def numel(self) -> int:
            """How many numbers the cache holds: O(layers·heads·d²), whatever the length."""
            return sum(layer.numel() for layer in self.layers)

        def manage(self, batch: int, device: torch.device) -> None:
            """For `managed_forward`: persistent state tensors, and the count and mask kept outside the graph."""
            for layer in self.layers:
                layer.allocate(batch, device)
                layer.managed = True

        def get_query_offset(self, layer_idx: int = 0) -> int:
            """Where the mask's queries start: 0 where the mask covers only the new tokens (managed_forward),
            else the cache's length (transformers' default)."""
            layer = self.layers[layer_idx]
            return 0 if layer.managed else layer.seen

        def advance(self, tokens: int) -> None:
            for layer in self.layers:
                layer.seen += tokens
                if layer.position is not None:
                    layer.position.fill_(layer.seen)  # outside the graph, into its static tensor

    return StateLayer, StateCache


_CLASSES: tuple[type, type] | None = None


def classes() -> tuple[type, type]:
    """(StateLayer, StateCache), built on first use: transformers is imported only when needed."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _cache_classes()
        _register()
    return _CLASSES


def state_cache(model: nn.Module, policy: Policy, kernels: str = "auto") -> tuple[Any, str | None]:
    """(a StateCache for `model` under `policy`, None), or (None, why the model cannot decode from one).

    Each attention module keeps its StateLayer (attribute `attncc_state`), which the attention function
    reads: the layer objects stay the same from one generate to the next, so compiled graphs are reused
    (dynamo guards on the objects a graph reads), and a new cache resets them. One generate at a time
    per model: a new StateCache for the model empties the previous one."""
    layer_plans, why = plans(model, policy)
    if why:
        return None, why
    state_layer, cache = classes()
    layers = []
    for plan in layer_plans:
        module = model.get_submodule(plan.module)
        layer = module.__dict__.get(ATTRIBUTE)
        if not isinstance(layer, state_layer) or layer.plan != plan or layer.kernels != kernels:
            layer = state_layer(plan, kernels)
            object.__setattr__(module, ATTRIBUTE, layer)  # not a submodule or a parameter: a plain attribute
        layer.reset()
        layers.append(layer)
    return cache(layers), None


def cache_argument(model: nn.Module) -> str:
    """generate's keyword for the cache: `cache` where the model's forward takes it (transformers >= 5.24),
    else `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def managed_forward(forward: Any, cache: Any) -> Any:
    """`forward` (the model's, compiled) for a generate that carries `cache`, a StateCache: each call gets
    only the new tokens' columns of the 2-D attention mask (the earlier tokens are in the state), and the
    cache counts the tokens after the call; positions, where the caller gives none, are computed here as
    the model would (arange from the cache's length). So a decode step's graph has the same shapes at
    every step and reads no growing length: one graph, which can run as a CUDA graph."""
    accepts_positions = "position_ids" in inspect.signature(forward).parameters

    @functools.wraps(forward)  # generate reads the forward's signature to choose the arguments it passes
    def run(*args: Any, **kwargs: Any) -> Any:
        new = args[0] if args else kwargs.get("input_ids")
        new = new if new is not None else kwargs["inputs_embeds"]
        batch, tokens = new.shape[:2]
        cache.manage(batch, new.device)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            kwargs["attention_mask"] = mask[:, -tokens:]
        if accepts_positions and kwargs.get("position_ids") is None:
            # what transformers' decoders compute when given none (arange + the cache's length), here
            # outside the graph: read inside, the growing length would be a symbolic input of it
            kwargs["position_ids"] = (torch.arange(tokens, device=new.device) + cache.get_seq_length())[None]
        # generate slices the new tokens' ids and positions out of longer tensors: fresh contiguous copies
        # keep a growing stride or offset from becoming a symbolic input of the graph (a CUDA graph per step)
        args = tuple(a.clone(memory_format=torch.contiguous_format) if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v.clone(memory_format=torch.contiguous_format) if isinstance(v, torch.Tensor) else v
                  for k, v in kwargs.items()}
        out = forward(*args, **kwargs)
        cache.advance(tokens)
        return out

    return run


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: the layer's state op over the new tokens."""
    state = module.__dict__.get(ATTRIBUTE)
    if state is None:
        raise AttnccError(f"attention implementation {IMPLEMENTATION!r} needs attncc's StateCache as the cache "
                          "(attncc.compile(model, policy).generate builds it; or attncc.decode.state_cache)")
    key_padding = None
    if attention_mask is not None:  # [B, 1, Tq, Tk]: the last query row sees every earlier valid key
        last = attention_mask[:, 0, -1, :]
        key_padding = last if last.dtype == torch.bool else last == 0
        key_padding = key_padding.expand(query.shape[0], -1).contiguous()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = state.attend(query, key, value, key_padding, float(scale))
    return out.transpose(1, 2).contiguous(), None


def _slot(positions: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """The window cache's slot of each position: a sink keeps its own, the others share a ring of `window`."""
    return torch.where(positions < sinks, positions, sinks + (positions - sinks) % window)


def _window_cache(k, v, key_padding, sinks: int, window: int) -> list[torch.Tensor]:
    """(keys, values, filled) of a window cache after a prompt: its sinks and its last `window` keys."""
    every = torch.arange(k.shape[-2], device=k.device)  # slices, not min/max of sizes: nothing for dynamo to break on
    positions = torch.cat([every[:sinks], every[sinks:][-window:]])
    slots = _slot(positions, sinks, window)
    b, h, _, d = k.shape
    keys = k.new_zeros((b, h, sinks + window, d)).index_copy_(2, slots, k.index_select(2, positions))
    values = v.new_zeros((b, h, sinks + window, v.shape[-1])).index_copy_(2, slots, v.index_select(2, positions))
    filled = (key_padding.index_select(1, positions) if key_padding is not None
              else torch.ones((b, positions.shape[0]), dtype=torch.bool, device=k.device))
    valid = torch.zeros((b, sinks + window), dtype=torch.bool, device=k.device).index_copy_(1, slots, filled)
    return [keys, values, valid]


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
