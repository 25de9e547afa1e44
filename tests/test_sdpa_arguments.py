"""scaled_dot_product_attention with every combination of its arguments is matched and rewritten exactly."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import attncc

B, H, T, D = 2, 4, 7, 8


def _mask(kind: str, gqa: bool):
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    keep = torch.ones(B, 1, 1, T, dtype=torch.bool)
    keep[1, ..., -2:] = False
    bias = torch.randn(1, H, T, T, generator=torch.Generator().manual_seed(3))
    return {
        "none": (None, "none"),
        "bool_causal": (causal, "causal"),
        "float_causal": (torch.zeros(T, T).masked_fill(~causal, float("-inf")), "causal"),
        "finfo_causal": (torch.zeros(T, T).masked_fill(~causal, torch.finfo(torch.float32).min), "causal"),
        "bool_padding": (keep, "padding"),
        "bool_causal_padding": (causal & keep, "causal+padding"),
        "float_bias": (bias, "other"),
    }[kind]


class Sdpa(torch.nn.Module):
    def __init__(self, mask, is_causal, scale, gqa):
        super().__init__()
        self.mask, self.is_causal, self.scale, self.gqa = mask, is_causal, scale, gqa
        self.kv = torch.nn.Linear(D, 2 * D)

    def forward(self, q, x):
        kv_heads = 2 if self.gqa else H
        k, v = self.kv(x[:, :kv_heads]).chunk(2, dim=-1)
        kwargs = {"enable_gqa": True} if self.gqa else {}
        if self.scale is not None:
            kwargs["scale"] = self.scale
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.is_causal, **kwargs)


CASES = [
    pytest.param(mask, is_causal, scale, gqa, id=f"{mask}-{'is_causal' if is_causal else 'no_flag'}-scale{scale}-{'gqa' if gqa else 'mha'}")
    for mask, is_causal, scale, gqa in itertools.product(
        ["none", "bool_causal", "float_causal", "finfo_causal", "bool_padding", "bool_causal_padding", "float_bias"],
        [False, True], [None, 0.3], [False, True])
    if not (is_causal and mask != "none")  # SDPA rejects attn_mask together with is_causal
]


@pytest.mark.parametrize("mask,is_causal,scale,gqa", CASES)
def test_sdpa_arguments(mask, is_causal, scale, gqa):
    attn_mask, kind = _mask(mask, gqa)
    model = Sdpa(attn_mask, is_causal, scale, gqa)
    g = torch.Generator().manual_seed(0)
    q, x = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    be = attncc.backend({"attention": "softmax"}, inner="aot_eager")
    out = torch.compile(model, backend=be)(q, x)
    torch.testing.assert_close(out, model(q, x), rtol=1e-5, atol=1e-6)
    (site,) = be.report.attention()
    assert site.status == "rewritten"
    # a mask held in a tensor attribute is an input value: its key padding is read on every call
    read_at_run_time = {"none": "padding", "causal": "causal+padding"}
    expected = "none" if attn_mask is None else read_at_run_time.get(kind, kind)
    assert site.mask == ("causal" if is_causal else expected)
    assert site.kv_heads == (2 if gqa else H)
    assert site.scale == pytest.approx(scale if scale is not None else D**-0.5)


def test_sdpa_dropout_is_recorded_and_kept():
    model = Sdpa(None, True, None, False)
    q = x = torch.randn(B, H, T, D)

    class WithDropout(torch.nn.Module):
        def forward(self, q, x):
            k, v = model.kv(x).chunk(2, dim=-1)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=True)

    be = attncc.backend({"attention": "softmax"}, inner="aot_eager")
    out = torch.compile(WithDropout(), backend=be)(q, x)
    (site,) = be.report.attention()
    assert site.status == "rewritten" and site.dropout == 0.25
    assert out.shape == (B, H, T, D) and out.isfinite().all()
