"""Attention in hand-written spellings is found and rewritten exactly; softmax that is not attention is not."""

from __future__ import annotations

import warnings

import pytest
import torch

import attncc
from spellings import ATTENTION_MODULES, NOT_ATTENTION, B, C, T, ReturnsProbabilities


def _compile(model, policy="softmax"):
    be = attncc.backend({"attention": policy}, inner="aot_eager")
    return torch.compile(model, backend=be), be


@pytest.mark.parametrize("cls", ATTENTION_MODULES, ids=lambda c: c.__name__)
def test_spelling_is_matched_and_exact(cls):
    torch.manual_seed(0)
    model = cls()
    x = torch.randn(B, T, C, requires_grad=True)
    compiled, be = _compile(model)
    out = compiled(x)
    ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    sites, mask = cls.expected
    report = be.report
    assert report.count("rewritten") == sites, report
    assert {s.mask for s in report.attention()} == {mask}, report
    g, = torch.autograd.grad(out.sum(), x)
    g_ref, = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


def test_gqa_heads_are_recorded():
    from spellings import RepeatKvGqa, RepeatInterleaveMqa, SdpaEnableGqa

    for cls, kv in [(RepeatKvGqa, 2), (RepeatInterleaveMqa, 1), (SdpaEnableGqa, 2)]:
        torch._dynamo.reset()
        (site,) = attncc.explain(cls(), (torch.randn(B, T, C),), {"attention": "softmax"}).attention()
        assert (site.heads, site.kv_heads, site.head_dim) == (4, kv, 8), (cls.__name__, site)


def test_cross_attention_is_recognized():
    from spellings import CrossAttention, MatmulDiv

    (site,) = attncc.explain(CrossAttention(), (torch.randn(B, T, C),), {"attention": "softmax"}).attention()
    assert site.cross and not site.causal
    torch._dynamo.reset()
    (site,) = attncc.explain(MatmulDiv(), (torch.randn(B, T, C),), {"attention": "softmax"}).attention()
    assert not site.cross


def test_scale_is_recorded():
    from spellings import ScaleOnBoth, SdpaBoolMaskScale

    (site,) = attncc.explain(ScaleOnBoth(), (torch.randn(B, T, C),), {"attention": "softmax"}).attention()
    assert site.scale == pytest.approx(8**-0.5)
    torch._dynamo.reset()
    (site,) = attncc.explain(SdpaBoolMaskScale(), (torch.randn(B, T, C),), {"attention": "softmax"}).attention()
    assert site.scale == pytest.approx(0.2)


@pytest.mark.parametrize("cls", NOT_ATTENTION, ids=lambda c: c.__name__)
def test_softmax_that_is_not_attention_is_not_matched(cls):
    model = cls()
    x = torch.randn(B, T, C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled, be = _compile(model)
        torch.testing.assert_close(compiled(x), model(x))
    assert be.report.attention() == [], be.report
    with pytest.raises(attncc.AttnccError, match="no attention found"):
        torch._dynamo.reset()
        attncc.explain(model, (x,), {"attention": "softmax"})


def test_returned_probabilities_are_unsupported_and_unchanged():
    model = ReturnsProbabilities()
    x = torch.randn(B, T, C)
    compiled, be = _compile(model)
    out, probs = compiled(x)
    ref_out, ref_probs = model(x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(probs, ref_probs)
    (site,) = be.report.attention()
    assert site.status == "unsupported"
    assert "used by" in site.reason


def test_policy_keep_leaves_graph_alone():
    from spellings import TwoLayers

    model = TwoLayers()
    x = torch.randn(B, T, C)
    compiled, be = _compile(model, policy="keep")
    torch.testing.assert_close(compiled(x), model(x))
    assert be.report.count("kept") == 2
    assert be.report.count("rewritten") == 0


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_transformer_encoder(norm_first, grad):
    layer = torch.nn.TransformerEncoderLayer(C, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(B, T, C)
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[1, -2:] = True
    with torch.set_grad_enabled(grad):
        compiled, be = _compile(model)
        out = compiled(x, src_key_padding_mask=padding)
        ref = model(x, src_key_padding_mask=padding)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    report = be.report
    assert report.count("rewritten") == 2, report
    assert [s.module for s in report.attention()] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert {s.mask for s in report.attention()} == {"padding"}
    hit = "decompose.decompose_mha" if grad else "decompose.decompose_encoder_layer"
    assert report.pattern_hits.get(hit) == 2


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention(need_weights):
    mha = torch.nn.MultiheadAttention(C, 4, batch_first=True)
    x = torch.randn(B, T, C)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    compiled, be = _compile(mha)
    out, weights = compiled(x, x, x, attn_mask=future, need_weights=need_weights)
    ref, ref_weights = mha(x, x, x, attn_mask=future, need_weights=need_weights)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    (site,) = be.report.attention()
    if need_weights:  # the averaged probabilities are returned: refused, graph unchanged
        torch.testing.assert_close(weights, ref_weights)
        assert site.status == "unsupported"
    else:
        # attn_mask is an input: its structure is checked and its key padding read on every call
        assert site.status == "rewritten" and site.mask == "causal+padding"
