"""SQA: the rewritten model equals a model built with fewer query heads from surgically merged weights."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

import attncc
from models import zoo

H, HKV, D = 4, 2, 8


def _llama(heads: int, kv_heads: int, layers: int = 2):
    cfg = LlamaConfig(vocab_size=zoo.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=D,
                      max_position_embeddings=64, attn_implementation="sdpa")
    return LlamaModel(cfg)


def _surgery(state: dict, hq: int, hkv: int, init: str) -> dict:
    """Independent weight surgery (VARIANTS.md §7.4) on a Llama state dict."""
    out = {}
    for name, w in state.items():
        if name.endswith("q_proj.weight"):
            g = w.reshape(hq, H // hq, D, -1)
            w = (g.mean(1) if init == "mean" else g[:, 0]).reshape(hq * D, -1)
        elif name.endswith(("k_proj.weight", "v_proj.weight")) and hkv != HKV:
            w = w.reshape(hkv, HKV // hkv, D, -1).mean(1).reshape(hkv * D, -1)
        elif name.endswith("o_proj.weight"):
            g = w.reshape(w.shape[0], hq, H // hq, D)
            w = (g.sum(2) if init == "mean" else g[:, :, 0]).reshape(w.shape[0], -1)
        out[name] = w
    return out


@pytest.mark.parametrize("hq,hkv,init", [(2, 2, "mean"), (2, 1, "mean"), (2, 2, "select"), (4, 2, "mean"), (2, 1, "select")])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
def test_sqa_equals_model_with_merged_heads(hq, hkv, init, padding):
    torch.manual_seed(0)
    model = _llama(H, HKV).eval()
    args = (zoo._ids(2, 11),)
    kwargs = {"use_cache": False}
    if padding:
        kwargs["attention_mask"] = zoo.padding_mask(2, 11)
    policy = {"attention": {"variant": "sqa", "query_heads": hq, "kv_heads": hkv, "init": init}}
    be = attncc.backend(policy, inner="aot_eager")
    out = torch.compile(model, backend=be)(*args, **kwargs)[0]
    assert be.report.count("rewritten") == 2, be.report

    reference = _llama(hq, hkv).eval()
    reference.load_state_dict(_surgery(model.state_dict(), hq, hkv, init))
    ref = reference(*args, **kwargs)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_sqa_gradients_reach_the_original_parameters():
    torch.manual_seed(0)
    model = _llama(H, HKV)
    be = attncc.backend({"attention": {"variant": "sqa", "query_heads": 2}}, inner="aot_eager")
    out = torch.compile(model, backend=be)(zoo._ids(2, 11), use_cache=False)[0]
    out.square().mean().backward()
    q = model.layers[0].self_attn.q_proj.weight.grad
    o = model.layers[0].self_attn.o_proj.weight.grad
    assert q is not None and q.abs().sum() > 0 and o is not None and o.abs().sum() > 0


def test_sqa_on_a_fused_qkv_projection_is_exact_at_full_heads():
    """GPT-2's Conv1D c_attn computes q, k, v in one addmm; SQA takes q's columns from it."""
    torch.manual_seed(0)
    model, args, kwargs, _ = zoo.gpt2("sdpa", padding=True)
    be = attncc.backend({"attention": {"variant": "sqa", "query_heads": 4, "kv_heads": 4}}, inner="aot_eager")
    out = torch.compile(model, backend=be)(*args, **kwargs)[0]
    torch.testing.assert_close(out, model(*args, **kwargs)[0], rtol=1e-5, atol=1e-5)
    assert {s.status for s in be.report.attention()} == {"rewritten"}


def test_sqa_refuses_a_per_head_op_it_cannot_regroup():
    """A learned per-head offset on q has H rows; with fewer heads it cannot apply: refused, unchanged."""
    from spellings import B, C, T, Projections

    class PerHeadOffset(Projections):
        def __init__(self):
            super().__init__()
            self.offset = torch.nn.Parameter(torch.randn(4, 1, 8))

        def forward(self, x):
            q, k, v = self.heads(x)
            return self.merge(torch.nn.functional.scaled_dot_product_attention(q + self.offset, k, v))

    model = PerHeadOffset()
    x = torch.randn(B, T, C)
    be = attncc.backend({"attention": {"variant": "sqa", "query_heads": 2}}, inner="aot_eager")
    torch.testing.assert_close(torch.compile(model, backend=be)(x), model(x))
    (site,) = be.report.attention()
    assert site.status == "unsupported" and "differs per head" in site.reason, site.reason


@pytest.mark.parametrize("name", ["bert", "vit", "qwen2"])
def test_sqa_default_on_other_models(name):
    """Default query_heads = H/2; MHA checkpoints pool their kv heads down to the query heads."""
    torch.manual_seed(0)
    model, args, kwargs, layers = getattr(zoo, name)("sdpa")
    be = attncc.backend({"attention": "sqa"}, inner="aot_eager")
    out = torch.compile(model, backend=be)(*args, **kwargs)[0]
    assert out.isfinite().all()
    sites = be.report.attention()
    assert [s.status for s in sites] == ["rewritten"] * layers, be.report
    assert sites[0].params["query_heads"] == 2
