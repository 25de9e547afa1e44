"""End to end: a tiny Llama and a tiny GPT-2 compiled with each variant's policy equal the same model
whose attention forward is replaced by that variant's reference (through transformers' own
AttentionInterface, so the comparison does not depend on attncc's matcher)."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

import attncc
from attncc.codegen.variants.linear.reference import lightning_decay_rates, linear_attention
from attncc.codegen.variants.mala.reference import mala_attention
from attncc.codegen.variants.softplus.reference import softplus_attention
from attncc.codegen.variants.sparse.reference import sparse_attention
from models import zoo

LAYERS = 2


def linear_ref(q, k, v, *, causal, key_padding, module, scaling):
    return linear_attention(q, k, v, causal=causal, key_padding=key_padding)


def lightning_ref(q, k, v, *, causal, key_padding, module, scaling):
    rates = lightning_decay_rates(q.shape[1], module.layer_idx, LAYERS)
    return linear_attention(q, k, v, causal=causal, normalize=False, feature_map="relu", decay=rates,
                            key_padding=key_padding)


def window_ref(q, k, v, *, causal, key_padding, module, scaling):
    return sparse_attention(q, k, v, scale=scaling, pattern="sliding_window", window=4, sinks=2,
                            key_padding=key_padding)


def power_ref(q, k, v, *, causal, key_padding, module, scaling):
    return sparse_attention(q, k, v, scale=scaling, pattern="power", block=2, window_blocks=2, key_padding=key_padding)


def lssar_ref(q, k, v, *, causal, key_padding, module, scaling):
    return softplus_attention(q, k, v, causal=causal, reweight_p=3.0, key_padding=key_padding)


def lssa_ref(q, k, v, *, causal, key_padding, module, scaling):
    return softplus_attention(q, k, v, causal=causal, reweight_p=0.0, key_padding=key_padding)


def mala_ref(q, k, v, *, causal, key_padding, module, scaling):
    return mala_attention(q, k, v, causal=causal, key_padding=key_padding)


def sqa_ref(q, k, v, *, causal, key_padding, module, scaling, select=False):
    """SQA as the attention of merged heads: projecting with the mean of a group's W_Q rows is the mean
    of the group's projected q heads; summing a group's W_O columns is feeding the group's one output
    to every head of the group (select: the first head's q, and only the first head's W_O columns)."""
    from attncc.codegen.variants.softmax.reference import softmax_attention

    b, h, t, d = q.shape
    hq = 2
    grouped = q.view(b, hq, h // hq, t, d)
    q2 = grouped[:, :, 0] if select else grouped.mean(2)
    pool = lambda x: x.view(b, 2, x.shape[1] // 2, *x.shape[2:]).mean(2)  # noqa: E731
    k2, v2 = pool(k), pool(v)
    allowed = torch.ones(t, t, dtype=torch.bool).tril()
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, None, :]
    o = softmax_attention(q2, k2, v2, scale=scaling, mask=allowed)
    if select:
        out = torch.zeros(b, hq, h // hq, t, d, dtype=o.dtype)
        out[:, :, 0] = o
        return out.view(b, h, t, d)
    return o.repeat_interleave(h // hq, dim=1)


def sqa_select_ref(q, k, v, **kw):
    return sqa_ref(q, k, v, select=True, **kw)


VARIANTS = {
    "sqa": ({"variant": "sqa", "query_heads": 2, "kv_heads": 2}, sqa_ref),
    "sqa_select": ({"variant": "sqa", "query_heads": 2, "kv_heads": 2, "init": "select"}, sqa_select_ref),
    "linear": ({"variant": "linear"}, linear_ref),
    "lightning": ({"variant": "linear", "decay": "lightning", "normalize": False, "feature_map": "relu"}, lightning_ref),
    "sliding_window": ({"variant": "sparse", "pattern": "sliding_window", "window": 4, "sinks": 2}, window_ref),
    "power": ({"variant": "sparse", "pattern": "power", "block": 2, "window_blocks": 2}, power_ref),
    "lssar": ({"variant": "softplus", "reweight_p": 3}, lssar_ref),
    "lssa": ({"variant": "softplus", "reweight_p": 0}, lssa_ref),
    "mala": ({"variant": "mala"}, mala_ref),
}

_current = {}


def _attncc_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An attention forward for transformers: the variant's reference with the model's own padding."""
    fn = _current["fn"]
    padding = _current["padding"]
    key_padding = None if padding is None else padding.bool()
    out = fn(query, key, value, causal=True, key_padding=key_padding, module=module,
             scaling=scaling if scaling is not None else query.shape[-1] ** -0.5)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("attncc_reference", _attncc_reference)


def _cases():
    for name in ("llama", "gpt2"):
        for variant in VARIANTS:
            for padding in (False, True):
                yield pytest.param(name, variant, padding, id=f"{name}-{variant}-{'pad' if padding else 'nopad'}")


@pytest.mark.parametrize("name,variant,padding", list(_cases()))
def test_variant_equals_reference_model(name, variant, padding):
    policy, fn = VARIANTS[variant]
    torch.manual_seed(0)
    model, args, kwargs, layers = getattr(zoo, name)("sdpa", padding, layers=LAYERS)
    model.eval()
    if variant == "lightning":
        attncc.prepare(model)  # lightning decay reads the layer count from the registered model
    be = attncc.backend({"attention": {"default": policy}}, inner="aot_eager")
    out = torch.compile(model, backend=be)(*args, **kwargs)[0]
    report = be.report
    assert report.count("rewritten") == layers, report

    model.config._attn_implementation = "attncc_reference"
    model.set_attn_implementation("attncc_reference") if hasattr(model, "set_attn_implementation") else None
    _current.update(fn=fn, padding=kwargs.get("attention_mask"))
    ref = model(*args, **kwargs)[0]
    err = (out - ref).abs().max() / ref.abs().max()
    assert err <= 1e-5, f"relative error {err:.3g}"

    params = [p for p in model.parameters() if p.requires_grad]
    weight = torch.randn_like(ref)
    grads = torch.autograd.grad((out * weight).sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad((ref * weight).sum(), params, allow_unused=True)
    largest = max(r.abs().max().item() for r in ref_grads if r is not None)
    for g, r in zip(grads, ref_grads):
        if r is not None:
            assert (g - r).abs().max().item() <= 1e-5 * max(r.abs().max().item(), 1e-3 * largest)


def test_mixed_policy_by_layer_range():
    torch.manual_seed(0)
    model, args, kwargs, _ = zoo.llama("sdpa", layers=4)
    policy = {"attention": {"default": "keep", "rules": [
        {"where": {"layers": "0"}, "use": "softmax"},
        {"where": {"layers": "1-2"}, "use": {"variant": "linear", "feature_map": "relu"}},
        {"where": {"layers": "3-"}, "use": {"variant": "sparse", "window": 4}},
    ]}}
    be = attncc.backend(policy, inner="aot_eager")
    out = torch.compile(model, backend=be)(*args, **kwargs)[0]
    sites = sorted(be.report.attention(), key=lambda s: s.layer)
    assert [s.variant for s in sites] == ["softmax", "linear", "linear", "sparse"]
    assert all(s.status == "rewritten" for s in sites)
    assert sites[1].params["feature_map"] == "relu"
    assert out.isfinite().all()


def test_causal_only_form_refuses_cross_and_bidirectional_sites():
    from spellings import B, C, T, CrossAttention

    be = attncc.backend({"attention": {"variant": "sparse", "window": 4}}, inner="aot_eager")
    model = CrossAttention()
    x = torch.randn(B, T, C)
    torch.testing.assert_close(torch.compile(model, backend=be)(x), model(x))
    (site,) = be.report.attention()
    assert site.status == "unsupported" and "causal pattern" in site.reason


def test_sparse_refuses_a_mask_it_cannot_combine_with():
    from spellings import B, C, T, SdpaAdditiveMask

    be = attncc.backend({"attention": {"variant": "sparse", "window": 4}}, inner="aot_eager")
    model = SdpaAdditiveMask()
    x = torch.randn(B, T, C)
    torch.testing.assert_close(torch.compile(model, backend=be)(x), model(x))
    (site,) = be.report.attention()
    assert site.status == "unsupported" and "'other' mask" in site.reason


def test_decay_refuses_bidirectional_site():
    torch.manual_seed(0)
    model, args, kwargs, _ = zoo.bert("sdpa")
    be = attncc.backend({"attention": {"variant": "linear", "decay": "lightning"}}, inner="aot_eager")
    out = torch.compile(model, backend=be)(*args, **kwargs)[0]
    torch.testing.assert_close(out, model(*args, **kwargs)[0])
    assert {s.status for s in be.report.attention()} == {"unsupported"}
