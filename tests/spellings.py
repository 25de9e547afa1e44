"""Hand-written attention modules in many spellings, and softmaxes that are not attention.

Each attention module takes x [B, T, C] and has `expected` = (sites, mask kind).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

B, T, C, H = 2, 7, 32, 4
D = C // H


class Projections(nn.Module):
    def __init__(self, kv_heads: int = H):
        super().__init__()
        self.kv_heads = kv_heads
        self.q = nn.Linear(C, H * D)
        self.k = nn.Linear(C, kv_heads * D)
        self.v = nn.Linear(C, kv_heads * D)
        self.o = nn.Linear(H * D, C)

    def heads(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, H, D).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, D).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, D).transpose(1, 2)
        return q, k, v

    def merge(self, o):
        b, h, t, d = o.shape
        return self.o(o.transpose(1, 2).reshape(b, t, h * d))


def causal_bool(t, device=None):
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


class MatmulDiv(Projections):
    expected = (1, "none")

    def forward(self, x):
        q, k, v = self.heads(x)
        s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(D)
        return self.merge(torch.matmul(s.softmax(dim=-1), v))


class AtMTMulCausalFill(Projections):
    expected = (1, "causal")

    def forward(self, x):
        q, k, v = self.heads(x)
        s = (q @ k.mT) * D**-0.5
        s = s.masked_fill(~causal_bool(x.shape[1], x.device), float("-inf"))
        return self.merge(F.softmax(s, -1) @ v)


class EinsumWhereFinfo(Projections):
    expected = (1, "causal")

    def forward(self, x):
        q, k, v = self.heads(x)
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) * (1.0 / math.sqrt(D))
        s = torch.where(causal_bool(x.shape[1], x.device), s, torch.finfo(s.dtype).min)
        p = torch.softmax(s.float(), dim=-1).to(q.dtype)
        return self.merge(torch.einsum("bhqk,bhkd->bhqd", p, v))


class ScaleOnQ(Projections):
    expected = (1, "none")

    def forward(self, x):
        q, k, v = self.heads(x)
        q = q * D**-0.5
        return self.merge(torch.matmul(q, k.transpose(2, 3)).softmax(-1) @ v)


class ScaleOnBoth(Projections):
    expected = (1, "causal")

    def forward(self, x):
        q, k, v = self.heads(x)
        q, k = q / D**0.25, k / D**0.25
        tril = torch.tril(torch.ones(x.shape[1], x.shape[1], device=x.device))
        s = q.matmul(k.permute(0, 1, 3, 2)) + (1.0 - tril) * -1e9
        return self.merge(F.softmax(s, dim=3) @ v)


class BmmFlattened(Projections):
    """[B*H, T, D] tensors and bmm, as in older code."""

    expected = (1, "none")

    def forward(self, x):
        q, k, v = (t.reshape(-1, t.shape[-2], D) for t in self.heads(x))
        s = torch.bmm(q, k.transpose(1, 2)) * (D**-0.5)
        o = torch.bmm(F.dropout(torch.softmax(s, -1), 0.0, self.training), v)
        return self.merge(o.view(x.shape[0], H, x.shape[1], D))


class BmmViewedScores(Projections):
    """Older OPT/BART style: bmm on [B*H, T, D], scores viewed to [B, H, T, T] for the mask and back."""

    expected = (1, "causal")

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (y.reshape(b * H, t, D) for y in self.heads(x))
        s = torch.bmm(q * D**-0.5, k.transpose(1, 2))
        mask = torch.full((t, t), float("-inf"), device=x.device).triu(1)
        s = (s.view(b, H, t, t) + mask).view(b * H, t, t)
        o = torch.bmm(F.softmax(s, dim=-1), v)
        return self.merge(o.view(b, H, t, D))


class PrePermutedKey(Projections):
    """k arrives already transposed ([B, H, D, T]) from a permute of the projection."""

    expected = (1, "none")

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, H, D).permute(0, 2, 1, 3)
        kt = self.k(x).view(b, t, H, D).permute(0, 2, 3, 1)
        v = self.v(x).view(b, t, H, D).permute(0, 2, 1, 3)
        return self.merge((q @ kt * D**-0.5).softmax(-1) @ v)


class RepeatKvGqa(Projections):
    expected = (1, "causal")

    def __init__(self):
        super().__init__(kv_heads=2)

    def forward(self, x):
        q, k, v = self.heads(x)
        b, hk, t, d = k.shape
        k = k[:, :, None].expand(b, hk, H // hk, t, d).reshape(b, H, t, d)
        v = v[:, :, None].expand(b, hk, H // hk, t, d).reshape(b, H, t, d)
        i = torch.arange(t, device=x.device)
        mask = torch.where(i[None, :] <= i[:, None], 0.0, float("-inf"))
        s = q @ k.transpose(-1, -2) / math.sqrt(d) + mask
        return self.merge(s.softmax(-1) @ v)


class RepeatInterleaveMqa(Projections):
    expected = (1, "none")

    def __init__(self):
        super().__init__(kv_heads=1)

    def forward(self, x):
        q, k, v = self.heads(x)
        k = k.repeat_interleave(H, dim=1)
        v = torch.repeat_interleave(v, H, dim=1)
        return self.merge(torch.softmax(q @ k.transpose(-1, -2) * D**-0.5, dim=-1) @ v)


class SdpaEnableGqa(Projections):
    expected = (1, "causal")

    def __init__(self):
        super().__init__(kv_heads=2)

    def forward(self, x):
        q, k, v = self.heads(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


class SdpaBoolMaskScale(Projections):
    expected = (1, "sliding_window(3)")

    def forward(self, x):
        q, k, v = self.heads(x)
        i = torch.arange(x.shape[1], device=x.device)
        window = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 3)
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=window, scale=0.2))


class SdpaAdditiveMask(Projections):
    """An ALiBi-like bias: a mask with values, kept dense."""

    expected = (1, "other")

    def forward(self, x):
        q, k, v = self.heads(x)
        i = torch.arange(x.shape[1], device=x.device, dtype=x.dtype)
        bias = -(i[:, None] - i[None, :]).abs() * 0.5
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=bias))


class TrilTriuMask(Projections):
    expected = (1, "causal")

    def forward(self, x):
        q, k, v = self.heads(x)
        future = torch.triu(torch.ones(x.shape[1], x.shape[1], device=x.device, dtype=torch.bool), diagonal=1)
        s = (q @ k.transpose(-2, -1)).mul(D**-0.5).masked_fill(future, float("-inf"))
        return self.merge(s.softmax(-1) @ v)


class CrossAttention(Projections):
    """Queries from x, keys and values from a memory of another length: never causal."""

    expected = (1, "none")

    def __init__(self):
        super().__init__()
        self.memory = nn.Parameter(torch.randn(1, 5, C))

    def forward(self, x):
        b, t, _ = x.shape
        mem = self.memory.expand(b, -1, -1)
        q = self.q(x).view(b, t, H, D).transpose(1, 2)
        k = self.k(mem).view(b, 5, H, D).transpose(1, 2)
        v = self.v(mem).view(b, 5, H, D).transpose(1, 2)
        return self.merge(F.scaled_dot_product_attention(q, k, v))


class TwoLayers(nn.Module):
    expected = (2, "causal")

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([AtMTMulCausalFill(), AtMTMulCausalFill()])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


class GraphBreak(nn.Module):
    """Two attention layers with a graph break between them: dynamo makes two graphs."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([AtMTMulCausalFill(), MatmulDiv()])

    def forward(self, x):
        x = x + self.layers[0](x)
        torch._dynamo.graph_break()
        return x + self.layers[1](x)


ATTENTION_MODULES = [
    MatmulDiv, AtMTMulCausalFill, EinsumWhereFinfo, ScaleOnQ, ScaleOnBoth, BmmFlattened, BmmViewedScores, PrePermutedKey,
    RepeatKvGqa, RepeatInterleaveMqa, SdpaEnableGqa, SdpaBoolMaskScale, SdpaAdditiveMask, TrilTriuMask,
    CrossAttention, TwoLayers,
]


class MoeRouter(nn.Module):
    """Softmax over experts, then a weighted sum of expert outputs: not attention."""

    def __init__(self, experts: int = 4):
        super().__init__()
        self.router = nn.Linear(C, experts)
        self.experts = nn.ModuleList([nn.Linear(C, C) for _ in range(experts)])

    def forward(self, x):
        gates = F.softmax(self.router(x), dim=-1)  # [B, T, E]
        outs = torch.stack([e(x) for e in self.experts], dim=-2)  # [B, T, E, C]
        return torch.matmul(gates.unsqueeze(-2), outs).squeeze(-2)


class ClassifierHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(C, 10)

    def forward(self, x):
        return self.head(x.mean(1)).softmax(-1)


class VocabSoftmax(nn.Module):
    """Logits against a tied embedding (x @ Eᵀ), softmax over the vocabulary."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(50, C))

    def forward(self, x):
        return torch.softmax(x @ self.embedding.t(), dim=-1)


class ReturnsProbabilities(Projections):
    """output_attentions-style: the probabilities are returned too."""

    def forward(self, x):
        q, k, v = self.heads(x)
        p = (q @ k.transpose(-2, -1) * D**-0.5).softmax(-1)
        return self.merge(p @ v), p


NOT_ATTENTION = [MoeRouter, ClassifierHead, VocabSoftmax]
