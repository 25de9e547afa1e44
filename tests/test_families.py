"""Many more model families from transformers' own code: every attention layer found, softmax rewrite exact.

Expected site counts: decoder-only and encoder-only models have one site per layer; T5 and BART have
encoder self-attention, decoder self-attention and cross-attention per layer.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel

import attncc

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
FAMILIES = {
    "phi": (SMALL, 2),
    "phi3": ({**SMALL, "num_key_value_heads": 2, "pad_token_id": 0}, 2),
    "gemma": ({**SMALL, "num_key_value_heads": 1, "head_dim": 8}, 2),
    "falcon": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=128), 2),
    "gpt_neox": (SMALL, 2),
    "gptj": (dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, rotary_dim=4), 2),
    "opt": (dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                 word_embed_proj_dim=32), 2),
    "bloom": (dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=128), 2),
    "roberta": (SMALL, 2),
    "distilbert": (dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=128), 2),
    "t5": (dict(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=128), 6),
    "bart": (dict(d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2, decoder_layers=2,
                  encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=128), 6),
    "starcoder2": ({**SMALL, "num_key_value_heads": 2}, 2),
    "qwen3": ({**SMALL, "num_key_value_heads": 2, "head_dim": 8}, 2),
    "mixtral": ({**SMALL, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2}, 2),
    "clip_text_model": (SMALL, 2),
    "deit": ({k: v for k, v in SMALL.items() if k != "vocab_size"} | dict(image_size=16, patch_size=4), 2),
    "modernbert": ({**SMALL, "global_attn_every_n_layers": 2, "local_attention": 4, "pad_token_id": 0}, 2),
    "deberta-v2": (SMALL, 2),  # disentangled attention: a q-dependent bias, kept dense ("other")
    "gpt_bigcode": (dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, multi_query=True), 2),
    "mpt": (dict(d_model=32, n_layers=2, n_heads=4, vocab_size=128, expansion_ratio=2), 2),
    "electra": ({**SMALL, "embedding_size": 32}, 2),
    "cohere": ({**SMALL, "num_key_value_heads": 2}, 2),
}
ENCODER_DECODER = {"t5", "bart"}


def _build(name: str, impl: str):
    config, sites = FAMILIES[name]
    cfg = AutoConfig.for_model(name, **config)
    torch.manual_seed(0)
    try:
        model = AutoModel.from_config(cfg, attn_implementation=impl).eval()
    except ValueError as err:  # e.g. BLOOM has no sdpa path
        pytest.skip(f"{name} has no {impl} attention: {err}"[:200])
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    if name == "deit":
        return model, (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)),), {}, sites
    if name in ENCODER_DECODER:
        return model, (ids,), {"decoder_input_ids": ids[:, :5], "use_cache": False}, sites
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, -2:] = 0
    kwargs = {"attention_mask": mask}
    if "use_cache" in model.forward.__code__.co_varnames:
        kwargs["use_cache"] = False
    return model, (ids,), kwargs, sites


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family(name, impl):
    model, args, kwargs, expected = _build(name, impl)
    be = attncc.backend({"attention": "softmax"}, inner="eager")
    out = torch.compile(model, backend=be)(*args, **kwargs)[0]
    ref = model(*args, **kwargs)[0]
    if "attention_mask" in kwargs:  # pad queries with no allowed key output 0 (DeBERTa's eager path: a uniform mix)
        real = kwargs["attention_mask"].bool()
        out, ref = out[real], ref[real]
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    sites = be.report.attention()
    assert len(sites) == expected, be.report
    assert all(s.status == "rewritten" for s in sites), be.report
    if name in ENCODER_DECODER:
        assert sum(s.cross for s in sites) == 2, be.report  # one cross-attention per decoder layer


def test_softcapped_scores_are_not_standard_attention():
    """Gemma 2 soft-caps its scores with tanh: reported, left unchanged, never rewritten as plain softmax."""
    cfg = AutoConfig.for_model("gemma2", **{**SMALL, "num_key_value_heads": 2, "head_dim": 8, "sliding_window": 4})
    torch.manual_seed(0)
    model = AutoModel.from_config(cfg, attn_implementation="eager").eval()
    ids = torch.randint(0, 128, (2, 9))
    be = attncc.backend({"attention": "softmax"}, inner="eager")
    out = torch.compile(model, backend=be)(ids, use_cache=False)[0]
    torch.testing.assert_close(out, model(ids, use_cache=False)[0])
    sites = be.report.attention()
    assert len(sites) == 2 and all(s.status == "unsupported" and "soft-capping" in s.reason for s in sites)
