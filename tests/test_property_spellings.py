"""Property: attention written in random spellings is either rewritten and numerically equal, or
reported as not rewritten and left unchanged. Never wrongly rewritten."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import attncc

B, T, C, H = 2, 6, 16, 4
D = C // H


@dataclass(frozen=True)
class Spelling:
    product: str  # matmul | at | einsum | bmm
    key_t: str  # transpose | transpose23 | mT | permute
    scale_at: str  # scores_mul | scores_div | q | both
    mask: str  # none | causal_fill | causal_where | additive | random_bool
    softmax: str  # functional | method | torch | upcast
    dropout: bool
    kv: str  # mha | repeat_kv | repeat_interleave
    returns_probs: bool

    @property
    def rewritable(self) -> bool:
        return not self.returns_probs


spellings = st.builds(
    Spelling,
    product=st.sampled_from(["matmul", "at", "einsum", "bmm"]),
    key_t=st.sampled_from(["transpose", "transpose23", "mT", "permute"]),
    scale_at=st.sampled_from(["scores_mul", "scores_div", "q", "both"]),
    mask=st.sampled_from(["none", "causal_fill", "causal_where", "additive", "random_bool"]),
    softmax=st.sampled_from(["functional", "method", "torch", "upcast"]),
    dropout=st.booleans(),
    kv=st.sampled_from(["mha", "repeat_kv", "repeat_interleave"]),
    returns_probs=st.booleans(),
)


class Generated(nn.Module):
    def __init__(self, s: Spelling):
        super().__init__()
        self.s = s
        kv_heads = H if s.kv == "mha" else 2
        self.kv_heads = kv_heads
        self.q = nn.Linear(C, C)
        self.kv = nn.Linear(C, 2 * kv_heads * D)
        self.register_buffer("random_mask", torch.rand(T, T, generator=torch.Generator().manual_seed(1)) > 0.3)
        self.random_mask[:, 0] = True

    def forward(self, x):
        s = self.s
        b, t, _ = x.shape
        q = self.q(x).view(b, t, H, D).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, D).permute(2, 0, 3, 1, 4)
        if s.kv == "repeat_kv":
            g = H // self.kv_heads
            k = k[:, :, None].expand(b, self.kv_heads, g, t, D).reshape(b, H, t, D)
            v = v[:, :, None].expand(b, self.kv_heads, g, t, D).reshape(b, H, t, D)
        elif s.kv == "repeat_interleave":
            k = k.repeat_interleave(H // self.kv_heads, dim=1)
            v = v.repeat_interleave(H // self.kv_heads, dim=1)
        if s.scale_at == "q":
            q = q * (1 / math.sqrt(D))
        elif s.scale_at == "both":
            q, k = q * D**-0.25, k * D**-0.25
        kt = {"transpose": lambda: k.transpose(-2, -1), "transpose23": lambda: k.transpose(2, 3),
              "mT": lambda: k.mT, "permute": lambda: k.permute(0, 1, 3, 2)}[s.key_t]()
        if s.product == "matmul":
            scores = torch.matmul(q, kt)
        elif s.product == "at":
            scores = q @ kt
        elif s.product == "einsum":
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k)
        else:
            scores = torch.bmm(q.flatten(0, 1), kt.flatten(0, 1)).view(b, H, t, t)
        if s.scale_at == "scores_mul":
            scores = scores * D**-0.5
        elif s.scale_at == "scores_div":
            scores = scores / math.sqrt(D)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        if s.mask == "causal_fill":
            scores = scores.masked_fill(~causal, float("-inf"))
        elif s.mask == "causal_where":
            scores = torch.where(causal, scores, torch.finfo(scores.dtype).min)
        elif s.mask == "additive":
            scores = scores + (~causal).float() * -1e9
        elif s.mask == "random_bool":
            scores = scores.masked_fill(~self.random_mask, float("-inf"))
        if s.softmax == "functional":
            p = F.softmax(scores, dim=-1)
        elif s.softmax == "method":
            p = scores.softmax(-1)
        elif s.softmax == "torch":
            p = torch.softmax(scores, dim=3)
        else:
            p = F.softmax(scores.float(), dim=-1).to(q.dtype)
        if s.dropout:
            p = F.dropout(p, p=0.0, training=self.training)
        out = (p @ v).transpose(1, 2).reshape(b, t, C)
        return (out, p) if s.returns_probs else out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spellings)
@example(Spelling(product="einsum", key_t="transpose", scale_at="both", mask="none", softmax="functional",
                  dropout=False, kv="repeat_kv", returns_probs=False))  # an unread k.mT beside the einsum
def test_random_spelling_is_rewritten_exactly_or_left_alone(s):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Generated(s)
    x = torch.randn(B, T, C)
    be = attncc.backend({"attention": "softmax"}, inner="eager")
    out = torch.compile(model, backend=be)(x)
    ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    report = be.report
    (site,) = report.attention()
    if s.rewritable:
        assert site.status == "rewritten", (s, report)
        # GQA is recovered from repeat_kv/repeat_interleave, not through a flatten into the batch (bmm)
        assert site.kv_heads == (H if s.kv == "mha" or s.product == "bmm" else 2), (s, report)
        expected_mask = {"none": "none", "causal_fill": "causal", "causal_where": "causal",
                         "additive": "causal", "random_bool": "other"}[s.mask]
        assert site.mask == expected_mask, (s, report)
    else:
        assert site.status == "unsupported", (s, report)
