"""A compiled graph is right for every input its guards admit, not only for the example it was traced with.

Dynamo guards shapes, not values: a model compiled on one attention_mask runs every later mask of the
same shape through the same graph. The table compiles each model once, then calls it with a sequence
of masks (unpadded, left and right padding, padding that moves, a row with no real token) and compares
every call, at real tokens, with what that call must give: eager for `keep` and `softmax` (they
compute the model's own attention), and a fresh compile on that very batch for the other variants.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attncc

B, T, C, HEADS, VOCAB = 2, 10, 64, 4, 128  # head dim 16: the flash kernel serves it

# kernels='triton' on CPU tensors runs the Triton interpreter; the GPU machine runs the kernels natively
# in tests/test_ops.py::test_gpu_padded_calls_kernel_path_matches_reference instead.
interpreted = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter path (CPU tensors)")

SEQUENCES = {
    # name: the attention masks of successive calls (1 = real token)
    "unpadded_first": ("none", "left", "right", "moved", "empty_row"),
    "padded_first": ("right", "none", "left"),
}


def attention_mask(kind: str) -> torch.Tensor:
    mask = torch.ones(B, T, dtype=torch.long)
    if kind == "left":
        mask[0, :3] = 0
    elif kind == "right":
        mask[1, -4:] = 0
    elif kind == "moved":
        mask[0, -2:] = 0
        mask[1, :5] = 0
    elif kind == "empty_row":
        mask[1] = 0
        mask[0, :2] = 0
    return mask


# --- models -----------------------------------------------------------------------------------------

def _llama(impl):
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(LlamaConfig(vocab_size=VOCAB, hidden_size=C, intermediate_size=2 * C, num_hidden_layers=2,
                                  num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=64,
                                  attn_implementation=impl))


def _mistral():
    from transformers import MistralConfig, MistralModel

    return MistralModel(MistralConfig(vocab_size=VOCAB, hidden_size=C, intermediate_size=2 * C, num_hidden_layers=2,
                                      num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=64,
                                      sliding_window=4, attn_implementation="sdpa"))


def _gpt2():
    from transformers import GPT2Config, GPT2Model

    return GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=C, n_layer=2, n_head=HEADS, n_positions=64, attn_pdrop=0.0,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation="sdpa"))


def _bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=VOCAB, hidden_size=C, intermediate_size=2 * C, num_hidden_layers=2,
                                num_attention_heads=HEADS, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0, attn_implementation="sdpa"),
                     add_pooling_layer=False)


class CrossAttention(nn.Module):
    """Six learned queries read a padded sequence (a perceiver-style cross-attention), through SDPA."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, C)
        self.queries = nn.Parameter(torch.randn(1, 6, C))
        self.q, self.kv, self.o = nn.Linear(C, C), nn.Linear(C, 2 * C), nn.Linear(C, C)

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        split = lambda t: t.view(t.shape[0], t.shape[1], HEADS, -1).transpose(1, 2)  # noqa: E731
        q = split(self.q(self.queries.expand(x.shape[0], -1, -1)))
        k, v = (split(t) for t in self.kv(x).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask[:, None, None, :].bool())
        return self.o(out.transpose(1, 2).reshape(x.shape[0], -1, C))


class CausalMHA(nn.Module):
    """nn.MultiheadAttention with a causal mask built in the graph and the key padding as an input."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, C)
        self.mha = nn.MultiheadAttention(C, HEADS, batch_first=True)

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        t = x.shape[1]
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        out, _ = self.mha(x, x, x, attn_mask=future, key_padding_mask=attention_mask == 0, need_weights=False)
        return out


MODELS = {
    # name: (builder, causal, real query positions of a call: "tokens" or "rows with a real key")
    "llama_sdpa": (lambda: _llama("sdpa"), True, "tokens"),
    "llama_eager": (lambda: _llama("eager"), True, "tokens"),
    "gpt2": (_gpt2, True, "tokens"),
    "bert": (_bert, False, "tokens"),
    "mistral_window": (_mistral, True, "tokens"),
    "cross": (CrossAttention, False, "rows"),
    "mha": (CausalMHA, True, "tokens"),
}

VARIANTS = {
    "keep": "keep",
    "softmax": "softmax",
    "linear": {"variant": "linear"},
    "sparse": {"variant": "sparse", "pattern": "sliding_window", "window": 4, "sinks": 1},
    "softplus": {"variant": "softplus", "reweight_p": 3},
    "mala": {"variant": "mala"},
    "sqa": {"variant": "sqa", "query_heads": 2},
}
CAUSAL_ONLY = {"sparse"}
SEPARATE_QKV = {"llama_sdpa", "llama_eager", "mistral_window", "bert", "gpt2"}  # sqa needs projections it can regroup
KERNEL_VARIANTS = {"softmax", "sparse"}


def _cases():
    for model, (_, causal, _) in MODELS.items():
        for variant in VARIANTS:
            if variant in CAUSAL_ONLY and not causal or variant == "sqa" and model not in SEPARATE_QKV:
                continue
            for sequence in SEQUENCES:
                if sequence == "padded_first" and variant not in ("softmax", "linear", "sparse"):
                    continue
                yield pytest.param(model, variant, sequence, "reference", id=f"{model}-{variant}-{sequence}-ref")
            if variant in KERNEL_VARIANTS and model in ("llama_sdpa", "mistral_window", "mha", "bert"):
                yield pytest.param(model, variant, "unpadded_first", "triton",
                                   id=f"{model}-{variant}-unpadded_first-kernel", marks=interpreted)


def _output(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def _real(model_name: str, mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Boolean [B, T_out] of the output positions that carry a real result."""
    if MODELS[model_name][2] == "rows":
        return mask.bool().any(dim=1, keepdim=True).expand(out.shape[0], out.shape[1])
    return mask.bool()


def _compile(model, variant: str, kernels: str, inner: str = "aot_eager"):
    be = attncc.backend({"attention": VARIANTS[variant]}, inner=inner, kernels=kernels)
    return torch.compile(model, backend=be), be


@pytest.mark.parametrize("model_name,variant,sequence,kernels", list(_cases()))
def test_every_call_is_right(model_name, variant, sequence, kernels):
    torch.manual_seed(0)
    model = MODELS[model_name][0]().eval()
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    compiled, be = _compile(model, variant, kernels)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind in SEQUENCES[sequence]:
            mask = attention_mask(kind)
            out = _output(compiled(ids, attention_mask=mask))
            if variant in ("keep", "softmax"):
                expected = _output(model(ids, attention_mask=mask))
            else:  # what attncc computes when compiled on this very batch
                fresh, _ = _compile(model, variant, "reference", inner="eager")
                expected = _output(fresh(ids, attention_mask=mask))
            real = _real(model_name, mask, out)
            assert not out[real].isnan().any(), f"NaN at a real token after a {kind} call"
            torch.testing.assert_close(out[real], expected[real], rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"call with a {kind} mask: {m}")
    sites = be.report.attention()
    assert sites, "no attention site found"
    if variant == "keep":
        assert all(s.status == "kept" for s in sites)
    elif model_name == "mistral_window" and variant not in ("softmax", "sqa"):
        assert all(s.status == "unsupported" for s in sites), be.report  # a sliding-window mask: softmax heads only
    else:
        assert all(s.status == "rewritten" for s in sites), be.report


# --- values that change after compile --------------------------------------------------------------

class RelativeBias(nn.Module):
    """Attention with a learned relative-position bias table (Swin, T5): zero at initialization."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)
        self.table = nn.Parameter(torch.zeros(HEADS, 2 * T - 1))

    def forward(self, x):
        q, k, v = (t.view(x.shape[0], T, HEADS, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        i = torch.arange(T, device=x.device)
        bias = self.table[:, i[:, None] - i[None, :] + T - 1]  # [H, T, T]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None])


def test_learned_bias_zero_at_compile_time_is_kept():
    torch.manual_seed(0)
    model = RelativeBias()
    x = torch.randn(B, T, C)
    compiled, be = _compile(model, "softmax", "reference")
    torch.testing.assert_close(compiled(x), model(x))
    (site,) = be.report.attention()
    assert site.status == "rewritten" and site.mask == "other"  # its values are the table's, read at run time
    with torch.no_grad():
        model.table.copy_(torch.randn_like(model.table))  # what training does
    out = compiled(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    got = model.table.grad.clone()
    model.table.grad = None
    model(x).square().sum().backward()
    assert got.abs().max() > 0
    torch.testing.assert_close(got, model.table.grad, rtol=1e-4, atol=1e-5)


def _packed_documents() -> torch.Tensor:
    """A causal mask of two documents packed into one sequence: not causal + key padding."""
    doc = torch.arange(T) >= 6
    return (doc[:, None] == doc[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()


class MaskedMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(C, HEADS, batch_first=True)

    def forward(self, x, allowed):
        return self.mha(x, x, x, attn_mask=~allowed, need_weights=False)[0]


@pytest.mark.parametrize("kernels", ["reference", pytest.param("triton", marks=interpreted)])
def test_softmax_follows_a_mask_whose_structure_changes(kernels):
    """Compiled on a causal mask, called with packed documents: the site falls back to the dense mask."""
    torch.manual_seed(0)
    model = MaskedMHA().eval()
    x = torch.randn(B, T, C)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    compiled, be = _compile(model, "softmax", kernels)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, causal), model(x, causal), rtol=1e-5, atol=1e-5)
        (site,) = be.report.attention()
        assert site.mask == "causal+padding"
        assert site.kernel.startswith("flash_dense_causal") if kernels == "triton" else site.kernel == "reference"
        packed = _packed_documents()
        torch.testing.assert_close(compiled(x, packed), model(x, packed), rtol=1e-5, atol=1e-5)
    if kernels == "triton":  # the report says what this call ran
        assert site.kernel.startswith("reference (the mask is not causal"), site.kernel


def test_variant_refuses_a_mask_whose_structure_changes():
    torch.manual_seed(0)
    model = MaskedMHA().eval()
    x = torch.randn(B, T, C)
    compiled, _ = _compile(model, "linear", "reference")
    with torch.no_grad():
        compiled(x, torch.ones(T, T, dtype=torch.bool).tril())
        with pytest.raises(Exception, match="compiled for causal masks"):
            compiled(x, _packed_documents())


@interpreted
@pytest.mark.parametrize("variant,ran", [
    ("linear", "linear_chunked_elu1_causal_norm_d16_g1_padded_fp32"),
    ("softplus", "lssar_flash_p3_causal_d16_g1_padded_fp32"),
    ("mala", "mala on linear_chunked_elu1_causal_den_d16_g1_padded_fp32_fp32out"),
    ("sparse", "flash_sliding_window_causal_w4_s1_d16_g1_padded_fp32"),
    ("softmax", "flash_dense_causal_d16_g1_padded_fp32"),
])
def test_report_records_what_ran(variant, ran):
    """With kernels='triton' the report names what each site's op ran, not what a pass predicted."""
    torch.manual_seed(0)
    model = CausalMHA().eval()
    ids = torch.randint(0, VOCAB, (B, T))
    compiled, be = _compile(model, variant, "triton")
    with torch.no_grad():
        compiled(ids, attention_mask=attention_mask("left"))
    (site,) = be.report.attention()
    assert site.kernel == ran


# --- whole-model facts ------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(C, 3 * C), nn.Linear(C, C)

    def forward(self, x):
        q, k, v = (t.view(x.shape[0], -1, HEADS, C // HEADS).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(out.transpose(1, 2).reshape(x.shape))


class Stack(nn.Module):
    def __init__(self, graph_break: bool):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(4))
        self.graph_break = graph_break

    def forward(self, x):
        x = self.layers[0](x)
        if self.graph_break:
            torch._dynamo.graph_break()
        for layer in self.layers[1:]:
            x = layer(x)
        return x


def test_lightning_decay_reads_the_layer_count_from_the_model():
    """A graph break after layer 0 splits the model into two graphs; each layer's decay rates still
    come from the model's 4 layers, so the output is the same with and without the break."""
    policy = {"attention": {"variant": "linear", "decay": "lightning", "normalize": False, "feature_map": "relu"}}
    x = torch.randn(B, T, C)
    outs, reports = [], []
    for graph_break in (False, True):
        torch.manual_seed(0)
        model = Stack(graph_break)
        attncc.prepare(model)  # registers the model: lightning decay reads its layer count
        be = attncc.backend(policy, inner="aot_eager")
        with torch.no_grad():
            outs.append(torch.compile(model, backend=be)(x))
        reports.append(be.report)
    assert reports[0].graphs == 1 and reports[1].graphs == 2
    for report in reports:
        assert [(s.layer, s.status) for s in report.attention()] == [(i, "rewritten") for i in range(4)], report
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)


def test_lightning_decay_refuses_a_site_whose_layer_is_unknown():
    """A graph break inside a layer compiles the layer's own frame: its module paths say nothing of the
    layer's index, so a layer-dependent decay is refused, not guessed."""
    from transformers import LlamaConfig, LlamaModel

    model = LlamaModel(LlamaConfig(vocab_size=VOCAB, hidden_size=C, intermediate_size=2 * C, num_hidden_layers=2,
                                   num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="sdpa")).eval()
    model.layers[0].register_forward_hook(lambda *_: torch._dynamo.graph_break())
    attncc.prepare(model)  # registered: what is unknown here is the layer, not the model
    be = attncc.backend({"attention": {"variant": "linear", "decay": "lightning"}}, inner="aot_eager")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.compile(model, backend=be)(torch.randint(0, VOCAB, (B, T)))
    sites = be.report.attention()
    assert sites and all(s.status == "unsupported" and "no layer index" in s.reason
                         and "needs the layer index" in s.reason for s in sites), be.report


def test_lightning_decay_refuses_a_model_that_was_not_registered():
    """The layer count comes from the model registered by attncc.prepare / attncc.compile, never from dynamo's
    frame: a plain torch.compile of an unregistered model refuses the site (and says how to register it)."""
    policy = {"attention": {"variant": "linear", "decay": "lightning", "normalize": False, "feature_map": "relu"}}
    model = Stack(graph_break=False)
    be = attncc.backend(policy, inner="aot_eager")
    with torch.no_grad():
        torch.compile(model, backend=be)(torch.randn(B, T, C))
    sites = be.report.attention()
    assert sites and all(s.status == "unsupported" and "number of layers" in s.reason for s in sites), be.report
    be = attncc.backend(policy, inner="aot_eager")
    with torch.no_grad():
        attncc.compile(model, be)(torch.randn(B, T, C))  # registers the model
    assert [(s.layer, s.status) for s in be.report.attention()] == [(i, "rewritten") for i in range(4)], be.report


# --- never a silent no-op ---------------------------------------------------------------------------

def test_a_refused_attention_op_is_reported_with_its_reason():
    mha = nn.MultiheadAttention(C, HEADS, add_bias_kv=True, batch_first=True)
    x = torch.randn(B, T, C)
    report = attncc.explain(mha, (x, x, x), {"attention": "softmax"}, {"need_weights": False})
    (site,) = report.attention()
    assert site.status == "unsupported" and "bias_k/bias_v" in site.reason


@interpreted
@pytest.mark.parametrize("variant,policy", [("linear", {"variant": "linear", "feature_map": "taylor2"})])  # no kernel
def test_triton_kernels_asked_for_a_variant_without_one_warns(variant, policy):
    model = CausalMHA().eval()
    compiled = torch.compile(model, backend=attncc.backend({"attention": policy}, inner="aot_eager", kernels="triton"))
    with pytest.warns(UserWarning, match=f"kernels='triton': the {variant} site .* runs the reference"):
        compiled(torch.randint(0, VOCAB, (B, T)), attention_mask=attention_mask("none"))


def test_a_model_dynamo_never_hands_to_attncc_is_explained():
    """nn.Transformer checks its tgt_mask with a data-dependent bool(): dynamo breaks the graph inside
    torch.nn and never compiles the attention. explain says so, with dynamo's reason; with
    tgt_is_causal=True (no check), every site is found."""
    model = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64,
                           dropout=0.0, batch_first=True).eval()
    src, tgt = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    with pytest.raises(attncc.AttnccError, match="attncc never saw it. dynamo broke the graph"):
        attncc.explain(model, (src, tgt), {"attention": "softmax"}, {"tgt_mask": mask})
    report = attncc.explain(model, (src, tgt), {"attention": "softmax"}, {"tgt_mask": mask, "tgt_is_causal": True})
    assert [s.status for s in report.attention()] == ["rewritten"] * 3


def test_left_padded_batched_generate_matches_eager():
    """Decoder models batch prompts by left padding: pad queries have no allowed key. The prefill graph
    and the decode graphs (one query, a growing cache) must generate eager's tokens for every row."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=C, intermediate_size=2 * C, num_hidden_layers=2,
                      num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="sdpa", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        be = attncc.backend({"attention": "softmax"}, inner="aot_eager")
        model.forward = torch.compile(model.forward, backend=be)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert out.tolist() == expected.tolist()
    assert be.report.graphs >= 2 and all(s.status == "rewritten" for s in be.report.attention()), be.report


def test_report_lists_the_graphs_that_run():
    """With dynamic=True dynamo first traces a float attribute as a tensor, compiles that graph, drops it
    and recompiles; the report lists the graph that runs, once."""
    from test_soundness_passes import DropoutAttribute

    be = attncc.backend({"attention": "softmax"}, inner="aot_eager")
    compiled = torch.compile(DropoutAttribute(0.0), backend=be, dynamic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for length in (7, 13):
            x = torch.randn(2, 4, length, 8)
            compiled(x, x, x)
    assert len(be.reports) == 2 and [r.ran for r in be.reports] == [False, True]
    assert be.report.graphs == 1 and len(be.report.attention()) == 1


@pytest.mark.parametrize("kernels", ["reference", pytest.param("triton", marks=interpreted)])
def test_a_mask_the_caller_differentiates_gets_its_gradient(kernels):
    """A float mask that requires grad (a bias the caller learns outside the model) is kept dense: the
    site's kernels and checks give no gradient to a mask."""
    model = MaskedBias()
    q = torch.randn(B, HEADS, T, 16)
    bias = torch.zeros(1, 1, T, T, requires_grad=True)
    compiled, be = _compile(model, "softmax", kernels)
    compiled(q, bias).square().sum().backward()
    got, bias.grad = bias.grad, None
    model(q, bias).square().sum().backward()
    assert be.report.attention()[0].mask == "other"
    torch.testing.assert_close(got, bias.grad, rtol=1e-4, atol=1e-6)


class MaskedBias(nn.Module):
    def forward(self, q, bias):
        return F.scaled_dot_product_attention(q, q, q, attn_mask=bias)


# --- a graph of one layer runs for every layer ------------------------------------------------------------

def _per_layer_llama(policy):
    from models import zoo

    model, args, kwargs, _ = zoo.llama("sdpa", layers=3)
    model.eval()
    be = attncc.backend(policy, inner="aot_eager")
    for layer in model.layers:  # one graph per layer: dynamo compiles the class's forward once for all three
        layer.compile(backend=be)
    with torch.no_grad():
        out = model(*args, **kwargs)[0]
    torch._dynamo.reset()
    return model, args, kwargs, out, be


def test_a_policy_by_layer_leaves_a_per_layer_graph_unchanged():
    """Each decoder layer compiled on its own gives one graph, reused for every layer (the parameters are
    inputs, not guarded). Its module path has no layer index: a policy that picks by layer cannot be
    honoured, so the site is left unchanged, never rewritten as layer 0 for every layer."""
    policy = {"attention": {"default": "linear", "rules": [{"where": {"layers": "0"}, "use": "softmax"}]}}
    model, args, kwargs, out, be = _per_layer_llama(policy)
    sites = be.report.attention()
    assert sites and all(s.status == "unsupported" and "no layer index" in s.reason and "rules[0]" in s.reason
                         for s in sites)
    for layer in model.layers:
        layer._compiled_call_impl = None  # back to eager
    with torch.no_grad():
        torch.testing.assert_close(out, model(*args, **kwargs)[0])


def test_a_policy_the_same_for_every_layer_rewrites_a_per_layer_graph():
    model, args, kwargs, out, be = _per_layer_llama({"attention": "linear"})
    assert [s.status for s in be.report.attention()] == ["rewritten"]
    for layer in model.layers:
        layer._compiled_call_impl = None
    whole = torch.compile(model, backend=attncc.backend({"attention": "linear"}, inner="aot_eager"))
    with torch.no_grad():
        torch.testing.assert_close(out, whole(*args, **kwargs)[0])
