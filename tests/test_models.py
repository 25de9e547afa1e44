"""Every attention layer of real model code is found, and the softmax rewrite equals eager.

transformers' own code for tiny random-init configs (plus the real pretrained MiniLM), both
attn_implementation="eager" and "sdpa", with and without a padding mask, in train and eval mode.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import attncc
from models import zoo

EXPECTED_MASKS = {
    "gpt2": "causal",
    "llama": "causal",
    "qwen2": "causal",
    "mistral": "sliding_window(4)",
    "bert": "none",
    "vit": "none",
    "minilm": "none",
}


def _cases():
    for name, impl, padding, train in itertools.product(
        list(zoo.HF_MODELS) + ["minilm"], ["eager", "sdpa"], [False, True], [False, True]
    ):
        if name == "vit" and padding:
            continue
        yield pytest.param(name, impl, padding, train, id=f"{name}-{impl}-{'pad' if padding else 'nopad'}-{'train' if train else 'eval'}")


def _expected_mask(name: str, padding: bool) -> str:
    base = EXPECTED_MASKS[name]
    if not padding:
        return base
    return "padding" if base == "none" else f"{base}+padding"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("name,impl,padding,train", list(_cases()))
def test_softmax_rewrite_equals_eager(name, impl, padding, train):
    torch.manual_seed(0)
    model, args, kwargs, layers = getattr(zoo, name)(impl, padding)
    if name == "minilm":
        for module in model.modules():  # pretrained config has dropout 0.1: turn it off to compare
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    model.train(train)
    be = attncc.backend({"attention": "softmax"}, inner="aot_eager")
    compiled = torch.compile(model, backend=be)

    out = compiled(*args, **kwargs)[0]
    ref = model(*args, **kwargs)[0]
    assert _rel(out, ref) <= 1e-5

    report = be.report
    sites = report.attention()
    assert len(sites) == layers, report
    assert report.count("rewritten") == layers, report
    assert {s.mask for s in sites} == {_expected_mask(name, padding)}, report
    assert sorted(s.layer for s in sites) == list(range(layers))

    weight = torch.randn_like(ref)
    grads = torch.autograd.grad((out * weight).sum(), list(model.parameters()), allow_unused=True)
    ref_grads = torch.autograd.grad((ref * weight).sum(), list(model.parameters()), allow_unused=True)
    largest = max(r.abs().max().item() for r in ref_grads if r is not None)
    for g, r in zip(grads, ref_grads):
        if r is not None:  # parameters with ~zero gradient (a key bias under softmax) compare absolutely
            assert (g - r).abs().max().item() <= 1e-5 * max(r.abs().max().item(), 1e-3 * largest)
