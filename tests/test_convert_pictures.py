"""attncc.pictures: the attention maps and AttnRes depth weights of a converted model (issue 15).

Tiny random-init models from transformers' own code (tests/models/zoo.py); the converted weights are checked
against the variants' references and against what the compiled model computes."""

from __future__ import annotations

import copy

import pytest
import torch

from attncc import pictures
from attncc.codegen.variants.attnres.reference import attnres
from attncc.codegen.variants.linear.reference import linear_attention
from attncc.codegen.variants.mala.reference import mala_attention
from attncc.codegen.variants.softplus.reference import softplus_attention
from attncc.codegen.variants.sparse.reference import sparse_attention
from attncc.codegen.masks import sliding_window
from models.zoo import bert, llama

PNG = b"\x89PNG\r\n\x1a\n"


def _bert_batch(layers: int = 3):
    model, args, kwargs, _ = bert("sdpa", padding=True, layers=layers)
    batch = dict(input_ids=args[0], attention_mask=kwargs["attention_mask"].flip(0))  # the first sequence is padded
    return model.eval(), batch


def _rows(maps) -> torch.Tensor:
    return torch.tensor(maps.tokens)


@pytest.mark.parametrize("params", [{}, {"feature_map": "taylor2", "eps": 1.0}])
def test_linear_weights_times_v_are_the_reference_output(tmp_path, params):
    model, batch = _bert_batch()
    original = copy.deepcopy(model)
    policy = {"attention": {"default": {"variant": "linear", **params}}}
    path = tmp_path / "attention.png"
    maps = pictures.attention_maps(original, model, policy, batch, path=path)
    assert maps.layer == 1 and maps.variant == "linear" and maps.converted is not None
    rows = _rows(maps)
    assert len(rows) == 8 and maps.converted.shape == maps.original.shape == (4, 8, 8)
    reference = linear_attention(maps.q, maps.k, maps.v, causal=False, key_padding=maps.key_padding, **params)
    torch.testing.assert_close(maps.converted @ maps.v[0][:, rows], reference[0][:, rows], atol=1e-5, rtol=0)
    if "eps" in params:  # rows sum to Σ/(Σ + eps): the picture keeps the eps the variant divides by
        assert (maps.converted.sum(-1) < 1 - 1e-3).all()
    else:
        assert torch.allclose(maps.converted.sum(-1), torch.ones(4, 8), atol=1e-4)  # Σ/(Σ + 1e-6)
    assert torch.allclose(maps.original.sum(-1), torch.ones(4, 8), atol=1e-5)
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


def test_the_pictures_weights_are_what_the_compiled_model_computes():
    """Weights @ v equal the attention output of the compiled converted model (a hook on the attention module,
    the graph rewritten by the policy); with a `softmax` policy the weights are the original's probabilities."""
    model, batch = _bert_batch()
    original = copy.deepcopy(model)  # without the hook: outputs[-1] is then the compiled model's
    with torch.no_grad():  # the converted model differs from the original, as after a transfer
        for name in ("query", "key", "value"):
            getattr(model.encoder.layer[1].attention.self, name).weight.mul_(3.0)
    outputs = []
    handle = model.encoder.layer[1].attention.self.register_forward_hook(lambda m, a, o: outputs.append(o[0]))
    try:
        maps = pictures.attention_maps(original, model, {"attention": "mala"}, batch)
    finally:
        handle.remove()
    rows = _rows(maps)
    context = outputs[-1][0][rows].view(len(rows), 4, 8).transpose(0, 1)  # [H, n, D]
    torch.testing.assert_close(maps.converted @ maps.v[0][:, rows], context, atol=1e-5, rtol=0)
    assert (maps.converted - maps.original).abs().max() > 0.05
    torch._dynamo.reset()
    same = pictures.attention_maps(copy.deepcopy(model), model, {"attention": "softmax"}, batch, layer=1)
    assert same.layer == 1 and same.variant == "softmax"
    torch.testing.assert_close(same.converted, same.original, atol=1e-5, rtol=0)


def test_variant_weights_follow_each_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # grouped-query attention
    keys = torch.ones(2, 9, dtype=torch.bool)
    keys[0, 6:] = False
    cases = [
        ("linear", {"decay": 0.9}, True, linear_attention(q, k, v, causal=True, key_padding=keys,
                                                          decay=torch.full((4,), -torch.log(torch.tensor(0.9))))),
        ("mala", {}, True, mala_attention(q, k, v, causal=True, key_padding=keys)),
        ("mala", {"sim_scale": 0.5}, False, mala_attention(q, k, v, causal=False, key_padding=keys, sim_scale=0.5)),
        ("softplus", {"reweight_p": 4.0}, True, softplus_attention(q, k, v, causal=True, key_padding=keys,
                                                                   reweight_p=4.0)),
        ("sparse", {"pattern": "sliding_window", "window": 3, "sinks": 1}, True,
         sparse_attention(q, k, v, scale=0.3, pattern="sliding_window", window=3, sinks=1, key_padding=keys)),
    ]
    for variant, params, causal, expected in cases:
        weights, note = pictures.variant_weights(variant, params, q, k, causal=causal, scale=0.3, key_padding=keys)
        assert note == "" and weights.shape == (2, 4, 9, 9)
        torch.testing.assert_close(weights @ v.repeat_interleave(2, dim=1), expected, atol=1e-5, rtol=0,
                                   msg=lambda m: f"{variant} {params}: {m}")
        real = torch.tensor([True] * 6 + [False] * 3)
        assert torch.allclose(weights[0][:, real].sum(-1), torch.ones(4, 6), atol=1e-4), variant
    allowed = sliding_window(3, 1)(0, 0, torch.arange(9).view(-1, 1), torch.arange(9))
    weights, _ = pictures.variant_weights("sparse", {"pattern": "sliding_window", "window": 3, "sinks": 1}, q, k,
                                          causal=True, scale=0.3)
    assert (weights[..., ~allowed] == 0).all() and (weights[..., allowed] > 0).all()
    weights, note = pictures.variant_weights("sqa", {}, q, k, causal=True)
    assert weights is None and "SQA" in note


def test_attention_maps_apply_the_models_rotary():
    """Llama: q/k from the projections, then the model's apply_rotary_pos_emb: a softmax policy's weights are
    the original's probabilities (eager, output_attentions) only with the rotary applied."""
    model, args, kwargs, _ = llama("sdpa", layers=2)
    model.eval()
    maps = pictures.attention_maps(copy.deepcopy(model), model, {"attention": "softmax"}, {"input_ids": args[0]},
                                   layer=1)
    assert maps.causal and maps.converted.shape == (4, 11, 11)
    torch.testing.assert_close(maps.converted, maps.original, atol=1e-5, rtol=0)
    assert (maps.converted.triu(1) == 0).all()


def test_depth_weights_rows_are_a_softmax_over_the_available_sources(tmp_path):
    g = torch.Generator().manual_seed(0)
    sources = [torch.randn(2, 5, 16, generator=g) for _ in range(4)]
    query, norm = torch.randn(16, generator=g), 1 + 0.1 * torch.randn(16, generator=g)
    alpha = pictures.depth_weights(sources, query, norm)
    torch.testing.assert_close((alpha[..., None] * torch.stack(sources)).sum(0), attnres(sources, query, norm))

    model, batch = _bert_batch(layers=2)
    policy = {"attention": "linear", "residual": {"variant": "attnres", "block_size": 1}}
    import attncc

    attncc.prepare(model, policy, (), batch)
    with torch.no_grad():  # trained-looking queries: the weights are not uniform
        for depth in model.attncc_attnres.values():
            depth.query.normal_(0.0, 10.0, generator=g)
    path = tmp_path / "depth_weights.png"
    result = pictures.attnres_depth_weights(model, policy, batch, path=path)
    assert len(result.rows) == 5 and result.rows[-1] == "output"  # 4 sublayers and the output aggregation
    matrix = result.matrix
    assert matrix.shape == (5, 5)
    for r in range(5):
        available = r + 1  # Full AttnRes: sublayer r reads the embedding and the r earlier outputs
        assert torch.isnan(matrix[r, available:]).all() and not torch.isnan(matrix[r, :available]).any()
        assert abs(float(matrix[r, :available].sum()) - 1) < 1e-5
    assert max(float((matrix[r, :r + 1] - 1 / (r + 1)).abs().max()) for r in range(1, 5)) > 0.05  # not uniform
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000

    torch._dynamo.reset()
    blocks = {"attention": "linear", "residual": {"variant": "attnres", "block_size": 2}}
    fresh, _ = _bert_batch(layers=2)
    result = pictures.attnres_depth_weights(fresh, blocks, batch)
    available = [1, 2, 2, 3, 3]  # [b0], [b0, partial], [b0, b1], [b0, b1, partial], output [b0, b1, b2]
    assert [int((~torch.isnan(row)).sum()) for row in result.matrix] == available
    assert torch.allclose(result.matrix.nan_to_num(0).sum(-1), torch.ones(5), atol=1e-5)


def test_attention_maps_of_an_attnres_model_read_the_rewritten_stream():
    """With AttnRes the layer's input is an aggregation over depth: q, k, v come from the compiled model's
    stream (weights @ v is what the compiled attention fed o_proj), not from an eager pass."""
    import attncc

    model, args, kwargs, _ = llama("sdpa", layers=2)
    model.eval()
    batch = {"input_ids": args[0]}
    original = copy.deepcopy(model)
    policy = {"attention": "linear", "residual": "attnres"}
    attncc.prepare(model, policy, (), batch)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for depth in model.attncc_attnres.values():
            depth.query.normal_(0.0, 3.0, generator=g)
    fed = []
    handle = model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: fed.append(a[0]))
    try:
        maps = pictures.attention_maps(original, model, policy, batch, layer=1)
    finally:
        handle.remove()
    context = fed[-1][0].view(11, 4, 8).transpose(0, 1)  # [H, T, D]
    torch.testing.assert_close(maps.converted @ maps.v[0].repeat_interleave(2, dim=0), context, atol=1e-5, rtol=0)
    plain = pictures.attention_maps(original, model, {"attention": "linear"}, batch, layer=1)  # no AttnRes
    assert (plain.converted - maps.converted).abs().max() > 1e-3


def test_convert_measures_an_attnres_model_from_its_first_call():
    """The first call of attncc.compile's module also traces the model to prepare it (AttnRes): convert's
    `before` must be the rewritten model's error, as `after` is (lr 0: nothing changes in between)."""
    import attncc

    model, args, _, _ = llama("sdpa", layers=2)
    result = attncc.convert(model, {"residual": "attnres"}, [{"input_ids": args[0]}], steps=1, lr=0.0, progress=False)
    assert min(result.before) > 1e-3
    assert result.before == pytest.approx(result.after, rel=1e-5)
