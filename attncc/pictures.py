"""Quality pictures of a converted model (issue 15): attention maps and AttnRes depth weights.

    maps = attncc.pictures.attention_maps(original, converted, policy, batch, path="attention.png")
    depth = attncc.pictures.attnres_depth_weights(converted, policy, batch, path="depth_weights.png")

**Attention maps.** For one layer (default: the middle rewritten one) and the first sequence of the
batch (its real tokens): the original model's softmax probabilities, from the model's own code (a
frozen copy run with `attn_implementation="eager"` and `output_attentions=True`), beside the
converted layer's effective weights W, computed from the q and k that the converted model (compiled
with the policy, AttnRes included) feeds that layer, with the math of the variant's reference
(codegen/variants/<variant>/reference.py): W @ v is the reference's output.

- softmax / keep: softmax(scale·q·kᵀ) over the allowed keys;
- linear: φ(q_i)·φ(k_j) (times λ^{i-j} with decay), divided by the row sum + eps when normalized;
- sparse: softmax(scale·q·kᵀ) restricted to the pattern's mask;
- mala: α_ij = β_i·c_i·φ(q_i)·φ(k_j) − γ_i over the allowed keys (rows sum to ≈ 1, entries may be < 0);
- softplus: LSSA's normalized softplus weights, LSSAR's re-weighted ones;
- sqa: no matrix of the original projections (its heads are merged from them); the picture says so.

q and k come from forward hooks on the attention module's projections (q_proj/k_proj/v_proj or
BERT's query/key/value), then the module's own q_norm/k_norm and its modeling file's
apply_rotary_pos_emb when the model has them. A fused projection (GPT-2's c_attn) is refused.

**Depth weights.** With `residual: attnres`, every sublayer reads softmax_i(w·RMSNorm(v_i)) over its
sources (codegen/variants/attnres/reference.py). The model is compiled with the policy (inner
compiler: eager) and the rewritten graph is run by an interpreter that records the inputs of each
aggregation call (`attncc.codegen.variants.attnres.aggregate`: the sources, the query and key-norm
weight the model holds in `model.attncc_attnres`), then the weights are computed with the reference's
formula (`depth_weights`) and averaged over the first sequence's real tokens: a matrix with one row
per sublayer in depth order (and the output aggregation), one column per source (0 = the embedding),
NaN where a row has no such source.
"""

from __future__ import annotations

import copy
import math
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from attncc.codegen.masks import causal_offset, dense_mask, padding, power, prepare_qkv, sliding_window
from attncc.codegen.variants.attnres import aggregate as attnres_aggregate
from attncc.codegen.variants.linear.reference import constant_decay_rates, feature_map, lightning_decay_rates
from attncc.compiler import Backend
from attncc.errors import AttnccError
from attncc.policy import load_policy

PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
DPI = 80


# --- the converted variant's weights, from the references' math ---------------------------------------


def variant_weights(variant: str, params: Mapping[str, Any], q: Tensor, k: Tensor, *, causal: bool,
                    scale: float | None = None, key_padding: Tensor | None = None, layer: int = 0,
                    layers: int = 1) -> tuple[Tensor | None, str]:
    """The weights W [B, H, Tq, Tk] (float32) with which `variant` (policy parameters `params`) mixes the
    values: W @ v is the variant's reference output. q [B, H, Tq, D], k [B, Hkv, Tk, D]; `scale` the site's
    softmax scale (None: D^-1/2); `layer`/`layers` place the site for Lightning decay. Returns (W, "") or
    (None, why) for a variant without a weight matrix of its own."""
    v = k.new_zeros(*k.shape[:-1], 1)
    q, k, _ = prepare_qkv(q, k, v, key_padding)
    B, H, Tq, D = q.shape
    Tk = k.shape[-2]
    first = causal_offset(Tq, Tk) if causal else 0
    allowed = torch.ones(1, 1, Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril(diagonal=first)
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, None, :].bool()
    scale = D ** -0.5 if scale is None else float(scale)
    if variant in ("softmax", "keep"):
        return _masked_softmax(q @ k.mT * scale, allowed), ""
    if variant == "sparse":
        pattern = params.get("pattern", "sliding_window")
        if pattern == "sliding_window":
            mask_mod = sliding_window(int(params.get("window", 1024)), int(params.get("sinks", 0)))
        elif pattern == "power":
            mask_mod = power(int(params.get("block", 128)), int(params.get("window_blocks", 5)))
        else:
            from attncc.codegen.variants.sparse.block_mask import loaded

            mask_mod = loaded(params["mask"])
        offset = first if causal or pattern != "block" else 0
        sparse = dense_mask(mask_mod, B, H, Tq, Tk, q.device, offset)
        if key_padding is not None:
            sparse = sparse & dense_mask(padding(key_padding.bool()), B, None, Tq, Tk, q.device)
        if causal and pattern == "block":
            sparse = sparse & allowed
        return _masked_softmax(q @ k.mT * scale, sparse), ""
    if variant == "linear":
        fq, fk = feature_map(q, params.get("feature_map", "elu1")), feature_map(k, params.get("feature_map", "elu1"))
        scores = (fq @ fk.mT) * allowed
        decay = params.get("decay", "none")
        if decay != "none":
            rates = (lightning_decay_rates(H, layer, layers) if decay == "lightning"
                     else constant_decay_rates(H, float(decay))).to(q.device).view(1, H, 1, 1)
            lag = (torch.arange(first, first + Tq, device=q.device).view(-1, 1) - torch.arange(Tk, device=q.device))
            scores = scores * torch.exp(-rates * lag.clamp(min=0))
        if params.get("normalize", True):
            scores = scores / (scores.sum(-1, keepdim=True) + float(params.get("eps", 1e-6)))
        return scores, ""
    if variant == "mala":
        s = D ** -0.5 if params.get("sim_scale") is None else float(params["sim_scale"])
        count = allowed.sum(-1, keepdim=True).float().clamp(min=1)
        c = s / count
        sim = c * (F.elu(q) + 1) @ (F.elu(k) + 1).mT * allowed
        z = sim.sum(-1, keepdim=True)
        beta, gamma = 1 + 1 / (z + 1e-6), z / count
        return (beta * sim - gamma) * allowed, ""
    if variant == "softplus":
        from attncc.codegen.variants.softplus.reference import _reweight

        n = allowed.sum(-1, keepdim=True).float()
        cosine = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).mT
        a = F.softplus(math.log(D) * torch.log(n.clamp(min=1)) * cosine) * allowed
        weights = a / (a.sum(-1, keepdim=True) + 1e-8)
        p = float(params.get("reweight_p", 15.0))
        return (_reweight(weights, n, allowed, p, first) if p > 0 else weights), ""
    if variant == "sqa":
        return None, "SQA merges heads: no weight matrix of the original projections"
    return None, f"no weight matrix defined for variant {variant!r}"


def _masked_softmax(scores: Tensor, allowed: Tensor) -> Tensor:
    scores = scores.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(-1, keepdim=True)
    return torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * has_key


# --- attention maps ---------------------------------------------------------------------------------


@dataclass
class AttentionMaps:
    """One layer's attention on the first sequence's real tokens: `original` [H, n, n] (the model's softmax
    probabilities) and `converted` [H, n, n] (None with `note` saying why), plus the converted layer's q, k, v
    [1, H(kv), T, D] over the whole first sequence and its key padding (bool [1, T] or None)."""

    module: str
    layer: int
    variant: str
    params: dict
    original: Tensor
    converted: Tensor | None
    note: str = ""
    tokens: list[int] = field(default_factory=list)  # the positions of the real tokens
    q: Tensor | None = None
    k: Tensor | None = None
    v: Tensor | None = None
    key_padding: Tensor | None = None
    causal: bool = False
    scale: float | None = None

    def draw(self, path: str | Path, head: int | None = None) -> Path:
        """Two heat maps side by side on one color scale: mean over heads (or `head`)."""
        plt = _pyplot()
        pick = (lambda w: w.mean(0)) if head is None else (lambda w: w[head])  # noqa: E731
        left = pick(self.original).numpy()
        right = pick(self.converted).numpy() if self.converted is not None else None
        values = [left] + ([right] if right is not None else [])
        vmin, vmax = min(0.0, min(float(x.min()) for x in values)), max(float(x.max()) for x in values)
        which = "mean over heads" if head is None else f"head {head}"
        fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.0), dpi=DPI)
        image = axes[0].imshow(left, vmin=vmin, vmax=vmax, cmap="viridis")
        axes[0].set_title(f"original softmax, layer {self.layer}\n{which}", fontsize=9)
        params = ", ".join(f"{k}={v}" for k, v in self.params.items() if v is not None)
        title = f"converted: {self.variant}, layer {self.layer}" + (f"\n{textwrap.fill(params, 50)}" if params else "")
        if right is not None:
            axes[1].imshow(right, vmin=vmin, vmax=vmax, cmap="viridis")
            axes[1].set_title(f"{title}\n{which}", fontsize=9)
        else:
            axes[1].axis("off")
            axes[1].set_title(f"{title}\n{textwrap.fill(self.note, 50)}", fontsize=9)
        axes[0].set(xlabel="key token", ylabel="query token")
        if right is not None:
            axes[1].set(xlabel="key token")
        fig.colorbar(image, ax=list(axes), shrink=0.8)
        return _save(fig, plt, path)


def attention_maps(original: nn.Module, converted: nn.Module, policy: Any, batch: Mapping[str, Tensor], *,
                   layer: int | None = None, mask_modules: tuple[str, ...] = (), path: str | Path | None = None,
                   head: int | None = None) -> AttentionMaps:
    """Attention of `original` (the model before conversion, left as it is) against `converted` (the same
    model converted with `policy`, e.g. after attncc.convert; prepared by attncc.prepare when the policy has
    AttnRes: this call prepares it otherwise) at `layer` (default: the middle rewritten layer), for the
    first sequence of `batch`. Writes the picture to `path` when given. Compiles `converted` with a backend
    of its own (inner compiler eager), so a torch.compile of the same model may recompile afterwards."""
    from attncc.attnres import prepare
    from attncc.explain import explain

    converted = getattr(converted, "_orig_mod", converted)
    original = getattr(original, "_orig_mod", original)
    batch = dict(batch)
    policy = load_policy(policy)
    sites = explain(converted, (), policy, batch, mask_modules=mask_modules).attention()
    site = _pick(sites, layer)
    module = converted.get_submodule(site.module)
    names = next((n for n in PROJECTIONS if all(hasattr(module, a) for a in n)), None)
    if names is None:
        raise AttnccError(f"attention_maps captures q and k from the projections of {site.module}, but it has none of "
                          f"{', '.join('/'.join(n) for n in PROJECTIONS)} (a fused projection?); children: "
                          f"{', '.join(n for n, _ in module.named_children())}")
    caught: dict[str, Any] = {}
    handles = [getattr(module, n).register_forward_hook(lambda m, a, o, key=key: caught.__setitem__(key, o))
               for key, n in zip("qkv", names)]
    handles.append(module.register_forward_pre_hook(
        lambda m, a, kw: caught.__setitem__("rotary", kw.get("position_embeddings",
                                                               a[1] if len(a) > 1 and isinstance(a[1], tuple)
                                                               else None)), with_kwargs=True))
    training = converted.training, original.training
    try:
        converted.eval()
        backend = Backend(policy, inner="eager", mask_modules=mask_modules)
        if policy.residual.variant != "keep":
            prepare(converted, policy, (), batch)
        caught.clear()
        with torch.no_grad():
            torch.compile(converted, backend=backend)(**batch)
    finally:
        for h in handles:
            h.remove()
        converted.train(training[0])
    ran = next((s for s in backend.report.attention() if s.module == site.module), None)
    if ran is None or ran.status != site.status or not all(key in caught for key in "qkv"):
        raise AttnccError(f"attention_maps: the compiled run of {site.module} did not go as explain said "
                          f"(a graph break?); report:\n{backend.report}")
    q, k, v = (t[:1] for t in _heads(module, caught, site))  # the first sequence
    mask = batch.get("attention_mask")
    keys = mask[:1].bool() if mask is not None else None
    tokens = (keys[0].nonzero().flatten() if keys is not None else torch.arange(q.shape[-2])).tolist()
    variant = site.variant if site.status == "rewritten" else "keep"
    layers = max((s.layer for s in sites if s.layer is not None), default=0) + 1
    weights, note = variant_weights(variant, site.params, q, k, causal=bool(site.causal), scale=site.scale,
                                    key_padding=keys, layer=site.layer or 0, layers=layers)
    index = torch.tensor(tokens)
    crop = lambda w: w[0][:, index][:, :, index].float().cpu()  # noqa: E731
    if site.status != "rewritten":
        note = note or f"the site is {site.status}: the model's softmax"
    maps = AttentionMaps(site.module, site.layer, variant, dict(site.params) if variant != "keep" else {},
                         crop(_original_probs(original, batch, site.layer)), None if weights is None else crop(weights),
                         note, tokens, q, k, v, keys, bool(site.causal), site.scale)
    if path is not None:
        maps.draw(path, head)
    return maps


def _pick(sites, layer):
    rewritten = sorted((s for s in sites if s.status == "rewritten" and s.layer is not None), key=lambda s: s.layer)
    if layer is None:
        if not rewritten:
            raise AttnccError("attention_maps: the policy rewrites no attention site of a numbered layer; pass layer=")
        return rewritten[(len(rewritten) - 1) // 2]
    chosen = [s for s in sites if s.layer == layer]
    if len(chosen) != 1:
        raise AttnccError(f"attention_maps: layer {layer} has {len(chosen)} attention sites (layers: "
                          f"{sorted({s.layer for s in sites if s.layer is not None})})")
    return chosen[0]


def _heads(module: nn.Module, caught: dict, site) -> tuple[Tensor, Tensor, Tensor]:
    """[B, T, H·D] projection outputs -> [B, H, T, D], with the module's q/k norms and rotary."""
    D = site.head_dim or module.head_dim
    q, k, v = (caught[key].detach().float() for key in "qkv")
    q, k, v = (t.view(*t.shape[:-1], -1, D) for t in (q, k, v))
    if hasattr(module, "q_norm") and hasattr(module, "k_norm"):
        with torch.no_grad():
            q, k = module.q_norm(q).float(), module.k_norm(k).float()
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    rotary = caught.get("rotary")
    if rotary is not None:
        apply = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
        if apply is None:
            raise AttnccError(f"{site.module} gets position embeddings, but its modeling file has no "
                              "apply_rotary_pos_emb to apply them with")
        cos, sin = rotary
        q, k = apply(q, k, cos.float(), sin.float())
    return q, k, v


def _original_probs(original: nn.Module, batch: Mapping[str, Tensor], layer: int) -> Tensor:
    """The softmax probabilities [B, H, T, T] of `layer`, from a frozen eager copy of the original model."""
    teacher = copy.deepcopy(original).eval().requires_grad_(False)
    if hasattr(teacher, "set_attn_implementation"):
        teacher.set_attn_implementation("eager")
    else:
        teacher.config._attn_implementation = "eager"
    with torch.no_grad():
        out = teacher(**batch, output_attentions=True)
    attentions = getattr(out, "attentions", None)
    if not attentions or attentions[layer] is None:
        raise AttnccError(f"{type(original).__name__} returned no attention probabilities with output_attentions=True")
    return attentions[layer].float()


# --- AttnRes depth weights --------------------------------------------------------------------------


def depth_weights(sources: Sequence[Tensor], query: Tensor, norm_weight: Tensor, eps: float = 1e-6) -> Tensor:
    """α [S, ...] of one AttnRes aggregation, reference.attnres's formula: softmax over the sources of
    w · RMSNorm_g(v_i); Σ_i α_i v_i is reference.attnres(sources, query, norm_weight, eps)."""
    if len(sources) == 1:
        return torch.ones(1, *sources[0].shape[:-1], dtype=torch.float32, device=sources[0].device)
    dtype = torch.promote_types(sources[0].dtype, torch.float32)
    values = torch.stack([s.to(dtype) for s in sources])
    keys = values * torch.rsqrt(values.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(dtype)
    return torch.softmax((keys * query.to(dtype)).sum(-1), dim=0)


@dataclass
class DepthWeights:
    """`matrix` [rows, sources]: row r = the mean weight sublayer r (last row: the output aggregation) gives
    each source over the first sequence's real tokens; NaN where the row has no such source. `rows` names
    them (the residual sites' modules); `block_size` as the policy says (1: every sublayer is a source)."""

    rows: list[str]
    matrix: Tensor
    block_size: int = 1

    def draw(self, path: str | Path) -> Path:
        plt = _pyplot()
        import numpy as np

        data = np.ma.masked_invalid(self.matrix.numpy())
        fig, ax = plt.subplots(figsize=(1.6 + 0.32 * self.matrix.shape[1], 1.2 + 0.26 * len(self.rows)), dpi=DPI)
        cmap = plt.get_cmap("magma").with_extremes(bad="#dddddd")
        image = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=max(float(np.nanmax(self.matrix.numpy())), 1e-6),
                          aspect="auto")
        ax.set_yticks(range(len(self.rows)), self.rows, fontsize=7)
        ax.set_xticks(range(self.matrix.shape[1]))
        ax.tick_params(axis="x", labelsize=7)
        what = "sublayer outputs" if self.block_size == 1 else f"blocks of {self.block_size} (+ partial)"
        ax.set(xlabel=f"source (0 = embedding; then {what})",
               title="AttnRes depth weights (mean over tokens)")
        ax.title.set_fontsize(9)
        fig.colorbar(image, ax=ax, shrink=0.8)
        return _save(fig, plt, path)


class _RecordingBackend:
    """attncc's backend (inner compiler eager), whose rewritten graph runs in an fx.Interpreter that keeps the
    arguments of every AttnRes aggregation call."""

    def __init__(self, backend: Backend):
        self.backend, self.calls = backend, []

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Any:
        self.backend(gm, example_inputs)  # the pipeline rewrites gm in place (passes.pipeline.run_pipeline)
        calls = self.calls

        class Recorder(fx.Interpreter):
            def call_function(self, target, args, kwargs):
                if target is attnres_aggregate:
                    calls.append((args, kwargs))
                return super().call_function(target, args, kwargs)

        return lambda *args: Recorder(gm).run(*args)


def attnres_depth_weights(model: nn.Module, policy: Any, batch: Mapping[str, Tensor], *,
                          mask_modules: tuple[str, ...] = (), path: str | Path | None = None) -> DepthWeights:
    """The AttnRes depth weights of `model` (converted or only prepared with `policy`, whose `residual` is
    attnres; prepared here when it is not yet) on the first sequence of `batch`. Writes the picture to `path`
    when given."""
    from attncc.attnres import prepare

    model = getattr(model, "_orig_mod", model)
    policy = load_policy(policy)
    if policy.residual.variant != "attnres":
        raise AttnccError("attnres_depth_weights needs a policy with residual: attnres")
    batch = dict(batch)
    prepare(model, policy, (), batch)
    recording = _RecordingBackend(Backend(policy, inner="eager", mask_modules=mask_modules))
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            torch.compile(model, backend=recording)(**batch)
    finally:
        model.train(training)
    residual = [s for s in recording.backend.report.sites if s.kind == "residual" and s.status == "rewritten"]
    if not recording.calls or len(recording.calls) != len(residual):
        raise AttnccError(f"attnres_depth_weights: expected one aggregation per rewritten residual site after the "
                          f"first, plus the output ({len(residual)}), and saw {len(recording.calls)}; report:\n"
                          f"{recording.backend.report}")
    mask = batch.get("attention_mask")
    real = mask[0].bool() if mask is not None else None
    rows = [torch.ones(1)]  # sublayer 0 reads its one source, the embedding, as it is
    for args, kwargs in recording.calls:
        sources, query, norm_weight = args[0], args[1], args[2]
        alpha = depth_weights([s[0] for s in sources], query.detach(), norm_weight.detach(), kwargs.get("eps", 1e-6))
        rows.append((alpha[:, real] if real is not None else alpha.reshape(alpha.shape[0], -1)).mean(-1).float())
    width = max(len(r) for r in rows)
    matrix = torch.full((len(rows), width), float("nan"))
    for i, r in enumerate(rows):
        matrix[i, :len(r)] = r
    names = [f"{s.module} ({'attn' if 'attention' in s.reason.split(';')[0] else 'mlp'})" for s in residual]
    result = DepthWeights(names + ["output"], matrix, int(policy.residual.params().get("block_size", 1)))
    if path is not None:
        result.draw(path)
    return result


# --- matplotlib -------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path



def report_pictures(result, folder: Path, name: str) -> str:
    """A conversion's pictures for a recipe's Markdown report: `result.save_plots` into `folder`/`name`,
    and the Markdown lines that show them with the attention and depth-weight pictures already drawn
    there, linked relative to the report (which sits beside `folder`)."""
    here = f"{folder.name}/{name}"
    result.save_plots(folder / name)
    text = f"\n{name}: ![per-layer error]({here}/layers.png) ![training]({here}/losses.png)\n"
    for picture in sorted(p.name for p in (folder / name).glob("*.png") if p.name in ("attention.png",
                                                                                       "depth_weights.png")):
        text += f"![{picture[:-4].replace('_', ' ')}]({here}/{picture})\n"
    return text
