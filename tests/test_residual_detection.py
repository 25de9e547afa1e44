"""The residual stream is found in real model code and in hand-written blocks; `keep` changes nothing.

One site per sublayer (attention and MLP), named by the sublayer's module, numbered by its
transformer block, with the norm kind and the sublayer in the reason; pre-norm (GPT-2, Llama,
Mistral, Qwen2) and post-norm (BERT). Adds that are no residual of a normed sublayer must not match.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attncc
from attncc.patterns.residual import postnorm_residual, prenorm_residual
from models import zoo

LAYERS = 3

# name -> (pattern, norm, attention module, mlp module, stream start, stream end)
HF_EXPECTED = {
    "gpt2": ("prenorm_residual", "layernorm", "h.{}.attn", "h.{}.mlp", "drop", "ln_f"),
    "llama": ("prenorm_residual", "rmsnorm", "layers.{}.self_attn", "layers.{}.mlp", "embed_tokens", "norm"),
    "mistral": ("prenorm_residual", "rmsnorm", "layers.{}.self_attn", "layers.{}.mlp", "embed_tokens", "norm"),
    "qwen2": ("prenorm_residual", "rmsnorm", "layers.{}.self_attn", "layers.{}.mlp", "embed_tokens", "norm"),
    "bert": ("postnorm_residual", "layernorm", "encoder.layer.{}.attention", "encoder.layer.{}", "embeddings.dropout",
             "encoder.layer.2.output.LayerNorm"),
}


def _compile(model, policy=None):
    be = attncc.backend(policy or {"attention": "keep"}, inner="eager")  # finding needs no AOT trace
    return torch.compile(model, backend=be), be


def _residual(report):
    return [s for s in report.sites if s.kind == "residual"]


HF_CASES = [("gpt2", "sdpa"), ("gpt2", "eager"), ("llama", "sdpa"), ("llama", "eager"), ("mistral", "sdpa"),
            ("qwen2", "eager"), ("bert", "sdpa"), ("bert", "eager")]


@pytest.mark.parametrize("name,impl", HF_CASES, ids=[f"{n}-{i}" for n, i in HF_CASES])
def test_hf_models(name, impl):
    torch.manual_seed(0)
    model, args, kwargs, layers = getattr(zoo, name)(impl, layers=LAYERS)
    compiled, be = _compile(model)
    out = compiled(*args, **kwargs)[0]
    ref = model(*args, **kwargs)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)

    pattern, norm, attn, mlp, start, end = HF_EXPECTED[name]
    sites = _residual(be.report)
    assert len(sites) == 2 * layers, be.report
    assert [s.layer for s in sites] == [i for i in range(layers) for _ in (0, 1)]
    assert [s.module for s in sites] == [m.format(i) for i in range(layers) for m in (attn, mlp)]
    assert {s.pattern for s in sites} == {pattern}
    assert [s.reason.split(",")[0] for s in sites] == ["attention sublayer", "mlp sublayer"] * layers
    assert all(norm in s.reason for s in sites)
    assert all(s.status == "kept" and s.variant == "keep" and s.mask == "-" for s in sites)
    assert f"stream starts at {start};" in sites[0].reason
    assert f"stream ends at {end} ({norm})" in sites[-1].reason
    assert be.report.pattern_hits[pattern] == 2 * layers


class SimpleRMSNorm(nn.Module):
    """An RMSNorm written out, as many models do: it reaches the graph as pow/mean/add/rsqrt/mul."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


NORMS = {
    "layernorm": lambda d: nn.LayerNorm(d),
    "nn_rmsnorm": lambda d: nn.RMSNorm(d, eps=1e-6),
    "simple_rmsnorm": lambda d: SimpleRMSNorm(d),
}


class PatternBlock(nn.Module):
    """A transformer block written with the pattern functions themselves."""

    def __init__(self, d: int, norm: str, residual):
        super().__init__()
        self.residual = residual
        self.ln1, self.ln2 = NORMS[norm](d), NORMS[norm](d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def attn(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 4, d // 4).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))

    def mlp(self, x):
        return self.fc2(F.gelu(self.fc1(x)))

    def forward(self, x):
        x = self.residual(x, self.attn, self.ln1)
        return self.residual(x, self.mlp, self.ln2)


class PatternModel(nn.Module):
    def __init__(self, norm: str, residual, d: int = 32, layers: int = LAYERS):
        super().__init__()
        self.embed = nn.Embedding(64, d)
        self.blocks = nn.ModuleList([PatternBlock(d, norm, residual) for _ in range(layers)])
        self.ln_f = NORMS[norm](d) if residual is prenorm_residual else nn.Identity()

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("residual", [prenorm_residual, postnorm_residual], ids=lambda f: f.__name__)
def test_pattern_functions(residual, norm):
    torch.manual_seed(0)
    model = PatternModel(norm, residual)
    ids = torch.randint(0, 64, (2, 9))
    compiled, be = _compile(model)
    torch.testing.assert_close(compiled(ids), model(ids), rtol=0, atol=0)
    sites = _residual(be.report)
    assert len(sites) == 2 * LAYERS, be.report
    assert {s.pattern for s in sites} == {residual.__name__}
    assert [s.layer for s in sites] == [i for i in range(LAYERS) for _ in (0, 1)]
    assert [s.module for s in sites] == [f"blocks.{i}" for i in range(LAYERS) for _ in (0, 1)]
    kind = "layernorm" if norm == "layernorm" else "rmsnorm"
    assert all(kind in s.reason for s in sites)


class Unnumbered(nn.Module):
    """Blocks that are attributes, not a ModuleList: layers are numbered in stream order."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.embed = nn.Embedding(64, d)
        self.first = PatternBlock(d, "layernorm", prenorm_residual)
        self.second = PatternBlock(d, "layernorm", prenorm_residual)
        self.ln_f = nn.LayerNorm(d)

    def forward(self, ids):
        return self.ln_f(self.second(self.first(self.embed(ids))))


def test_unnumbered_blocks():
    compiled, be = _compile(Unnumbered())
    compiled(torch.randint(0, 64, (2, 9)))
    sites = _residual(be.report)
    assert [(s.module, s.layer) for s in sites] == [("first", 0), ("first", 0), ("second", 1), ("second", 1)]


class NoNorm(nn.Module):
    """x + attn(x) and x + mlp(x) with no norm anywhere: not a pre- or post-norm residual."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.block = PatternBlock(d, "layernorm", lambda h, f, norm: h + f(h))

    def forward(self, x):
        return self.block(x)


class NotResidual(nn.Module):
    """Adds that are not residual adds: position embeddings, a gate, a bias-like sum of two branches."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)
        self.pos = nn.Parameter(torch.randn(9, d))
        self.ln = nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.pos
        y = self.a(self.ln(x)) + self.b(self.ln(x))
        return y + torch.tanh(y)


@pytest.mark.parametrize("build", [NoNorm, NotResidual], ids=lambda b: b.__name__)
def test_not_a_residual(build):
    model = build()
    x = torch.randn(2, 9, 32)
    compiled, be = _compile(model)
    torch.testing.assert_close(compiled(x), model(x))
    assert _residual(be.report) == []


def test_no_norm_residual_in_spellings_is_not_reported():
    from spellings import TwoLayers

    model = TwoLayers()
    compiled, be = _compile(model)
    compiled(torch.randn(2, 16, 32))
    assert _residual(be.report) == []
    assert be.report.count("kept") == 2
