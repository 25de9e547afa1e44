"""Graphs with symbolic sizes: the mask kind must hold at every length, and a new length must not recompile."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import MistralConfig, MistralModel

import attncc
from models import zoo


def _run(model, padding: bool, lengths=(11, 17, 29)):
    be = attncc.backend({"attention": "softmax"}, inner="aot_eager")
    compiled = torch.compile(model, backend=be, dynamic=True)
    graphs = []
    for length in lengths:
        kwargs = {"use_cache": False} if not isinstance(model, zoo_bert_type()) else {}
        if padding:
            kwargs["attention_mask"] = zoo.padding_mask(2, length)
        ids = zoo._ids(2, length, seed=length)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = compiled(ids, **kwargs)[0]
        torch.testing.assert_close(out, model(ids, **kwargs)[0], rtol=1e-5, atol=1e-5)
        graphs.append(len(be.reports))
    return be, graphs


def zoo_bert_type():
    from transformers import BertModel

    return BertModel


@pytest.mark.parametrize("name,expected", [("llama", "causal"), ("gpt2", "causal"), ("mistral", "sliding_window(4)"),
                                           ("bert", "none")])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
def test_symbolic_sizes_keep_the_mask_kind(name, expected, padding):
    torch.manual_seed(0)
    model, _, _, layers = getattr(zoo, name)("sdpa", padding)
    be, graphs = _run(model, padding)
    assert graphs[-1] == graphs[0], f"a new length recompiled: {graphs}"
    sites = [s for s in be.reports[-1].sites if s.kind == "attention"]
    assert len(sites) == layers and all(s.status == "rewritten" for s in sites)
    want = expected if not padding else ("padding" if expected == "none" else f"{expected}+padding")
    assert {s.mask for s in sites} == {want}


def test_window_longer_than_the_example_is_found():
    """A sliding window of 32 is invisible at 11 tokens; the symbolic graph is checked past 32 too."""
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=zoo.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        sliding_window=32, attn_implementation="sdpa")
    model = MistralModel(cfg)
    be, _ = _run(model, padding=False, lengths=(11, 45))
    (site,) = [s for s in be.reports[-1].sites if s.kind == "attention"]
    assert site.mask == "sliding_window(32)"
