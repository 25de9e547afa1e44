"""Generation: a decode step (queries at the end of a cached key sequence) computes what the same
positions compute in the whole sequence, for every variant; `attncc.compile(model, policy).generate`
reaches attncc.

The oracle of each generate test is a no-cache greedy loop that calls the same compiled variant on the
whole sequence (with the position ids generate uses for left padding: feature maps such as elu1 are
not invariant to a shift of RoPE positions, so both must see the same positions).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attncc
from attncc.codegen.masks import dense_mask, sliding_window
from attncc.codegen.runtime_mask import check
from attncc.codegen.variants.linear.reference import constant_decay_rates, lightning_decay_rates, linear_attention
from attncc.codegen.variants.mala.reference import mala_attention
from attncc.codegen.variants.softmax.reference import softmax_attention
from attncc.codegen.variants.softplus.reference import softplus_attention
from attncc.codegen.variants.sparse.reference import sparse_attention
from attncc.patterns.masks import classify

VOCAB, NEW = 64, 5

VARIANTS = {
    "softmax": "softmax",
    "linear": {"variant": "linear"},
    "lightning": {"variant": "linear", "decay": "lightning", "feature_map": "identity", "normalize": False},
    "decay_0.9": {"variant": "linear", "decay": 0.9},
    "mala": {"variant": "mala"},
    "lssa": {"variant": "softplus", "reweight_p": 0},
    "lssar": {"variant": "softplus"},
    "window": {"variant": "sparse", "pattern": "sliding_window", "window": 4, "sinks": 1},
    "power": {"variant": "sparse", "pattern": "power", "block": 2, "window_blocks": 1},
    "sqa": {"variant": "sqa"},
}


# --- the math: queries that end a longer key sequence ------------------------------------------------

def _qkv(tq_full=9, heads=4, kv_heads=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, tq_full, d, generator=g)
    k, v = (torch.randn(2, kv_heads, tq_full, d, generator=g) for _ in range(2))
    keys = torch.ones(2, tq_full, dtype=torch.bool)
    keys[1, :3] = False  # left padding
    return q, k, v, keys


REFERENCES = {
    "softmax": lambda q, k, v, keys: softmax_attention(q, k, v, scale=0.3, causal=True,
                                                        mask=keys[:, None, None, :]),
    "linear_elu1": lambda q, k, v, keys: linear_attention(q, k, v, causal=True, key_padding=keys),
    "linear_lightning": lambda q, k, v, keys: linear_attention(
        q, k, v, causal=True, feature_map="identity", normalize=False, decay=lightning_decay_rates(4, 1, 3),
        key_padding=keys),
    "linear_decay": lambda q, k, v, keys: linear_attention(q, k, v, causal=True, decay=constant_decay_rates(4, 0.8),
                                                           key_padding=keys, chunk=4),
    "mala": lambda q, k, v, keys: mala_attention(q, k, v, causal=True, key_padding=keys, chunk=4),
    "lssa": lambda q, k, v, keys: softplus_attention(q, k, v, causal=True, reweight_p=0.0, key_padding=keys),
    "lssar": lambda q, k, v, keys: softplus_attention(q, k, v, causal=True, reweight_p=15.0, key_padding=keys),
    "window": lambda q, k, v, keys: sparse_attention(q, k, v, scale=0.3, pattern="sliding_window", window=3,
                                                     sinks=1, key_padding=keys, q_offset=k.shape[-2] - q.shape[-2]),
}


@pytest.mark.parametrize("tq", [1, 3])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_queries_at_the_end_compute_the_last_rows_of_the_whole_sequence(name, tq):
    """Every causal reference, given only the last Tq queries, returns the last Tq rows of the whole
    sequence's output, and the same gradients for k and v (those rows' share)."""
    q, k, v, keys = _qkv()
    fn = REFERENCES[name]
    k1, v1 = k.clone().requires_grad_(), v.clone().requires_grad_()
    full = fn(q, k1, v1, keys)[:, :, -tq:]
    k2, v2 = k.clone().requires_grad_(), v.clone().requires_grad_()
    tail = fn(q[:, :, -tq:], k2, v2, keys)
    torch.testing.assert_close(tail, full, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(full)  # float32 rounding of sums over 9 keys: LSSAR's log-domain terms reach 2e-5
    torch.testing.assert_close(torch.autograd.grad(tail, (k2, v2), grad), torch.autograd.grad(full, (k1, v1), grad),
                               rtol=1e-4, atol=5e-5)


def test_a_causal_reference_refuses_more_queries_than_keys():
    q, k, v, _ = _qkv()
    with pytest.raises(ValueError, match="at most as many queries as keys"):
        linear_attention(q, k[:, :, :4], v[:, :, :4], causal=True)


# --- classification ----------------------------------------------------------------------------------

def _br_causal(tq, tk):
    return dense_mask(sliding_window(tk + 1), None, None, tq, tk, q_offset=tk - tq)[0, 0]


def test_classify_places_causal_queries_at_the_end_of_the_keys():
    assert str(classify(_br_causal(3, 8))) == "causal"
    keys = torch.ones(2, 8, dtype=torch.bool)
    keys[0, :2] = False
    assert str(classify((_br_causal(3, 8)[None] & keys[:, None, :])[:, None])) == "causal+padding"
    window = dense_mask(sliding_window(4), None, None, 2, 9, q_offset=7)
    assert str(classify(window)).startswith("sliding_window(4)")  # keys no query attends read as padding
    top_left = torch.ones(3, 8, dtype=torch.bool).tril()
    assert str(classify(top_left)) == "other"


def test_one_query_over_every_key_is_causal_only_for_a_decode_step():
    """One query seeing every key is both none and causal: a self-attention decode step prefers causal
    (position-dependent variants then see its position); anything else stays none."""
    everything = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    assert str(classify(everything)) == "none"
    assert str(classify(everything, decoding=True)) == "causal"
    padded = everything.clone()
    padded[0, ..., :2] = False
    assert str(classify(padded, decoding=True)) == "causal+padding"


def test_a_static_cache_layout_is_not_causal():
    """A static cache masks its unused slots after the query: the query does not end the keys, so the
    mask is none + padding (position-independent variants serve it; position-dependent ones refuse)."""
    static = torch.zeros(2, 1, 1, 8, dtype=torch.bool)
    static[..., :5] = True
    assert str(classify(static, decoding=True)) == "padding"
    _, problem = check(static, "causal", 0, 1)
    assert problem and "do not end" in problem
    dynamic = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    assert check(dynamic, "causal", 0, 1)[1] is None


def test_a_one_row_mask_is_checked_for_every_query():
    """A mask with one row is shared by every query: for 3 queries it is not causal."""
    row = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    assert check(row, "causal", 0, 1)[1] is None
    assert check(row, "causal", 0, 3)[1] is not None


class TopLeftCausal(nn.Module):
    """SDPA's is_causal with fewer queries than keys: aligned at the start, unlike a decode step."""

    def __init__(self):
        super().__init__()
        self.q, self.kv = nn.Linear(16, 16), nn.Linear(16, 32)

    def forward(self, x, memory):
        q = self.q(x).view(1, -1, 2, 8).transpose(1, 2)
        k, v = self.kv(memory).view(1, -1, 2, 16).transpose(1, 2).chunk(2, dim=-1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_sdpa_is_causal_with_fewer_queries_than_keys_is_left_unchanged():
    model = TopLeftCausal()
    x, memory = torch.randn(1, 3, 16), torch.randn(1, 7, 16)
    be = attncc.backend({"attention": {"default": {"variant": "linear", "decay": 0.9}}}, inner="aot_eager")
    torch.testing.assert_close(torch.compile(model, backend=be)(x, memory), model(x, memory))
    (site,) = be.report.attention()
    assert site.status == "unsupported" and "aligns the queries at the start" in site.reason, be.report


# --- generate ----------------------------------------------------------------------------------------

def _llama(hidden=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        attn_implementation="sdpa", pad_token_id=0))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation="sdpa",
                                      pad_token_id=0))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64, sliding_window=4,
                                            attn_implementation="sdpa", pad_token_id=0))


MODELS = {"llama": _llama, "gpt2": _gpt2, "mistral": _mistral, "llama_d16": lambda: _llama(64)}  # d16: kernels serve it


def _prompts(device="cpu"):
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    return ids.to(device), mask.to(device)


def _no_cache_loop(compiled, ids, mask):
    """Greedy tokens and last-position logits, each step over the whole sequence without a cache."""
    logits = []
    for _ in range(NEW):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate computes them
        last = compiled(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]
        logits.append(last)
        token = last.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids, logits


def _generate_matches_the_no_cache_loop(model_name: str, variant: str, status: str = "rewritten", device="cpu",
                                        tolerance=(1e-4, 1e-5), **backend):
    torch.manual_seed(0)
    model = MODELS[model_name]().eval().to(device)
    ids, mask = _prompts(device)
    be = attncc.backend({"attention": {"default": VARIANTS[variant]}}, **(backend or {"inner": "aot_eager"}))
    compiled = attncc.compile(model, be)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compiled.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                output_logits=True, return_dict_in_generate=True)
        sites = be.report.attention()
        tokens, logits = _no_cache_loop(compiled, ids, mask)
    assert out.sequences.tolist() == tokens.tolist()
    for step, (got, want) in enumerate(zip(out.logits, logits)):
        torch.testing.assert_close(got, want, rtol=tolerance[0], atol=tolerance[1], msg=f"step {step}")
    assert sites and all(s.status == status for s in sites), be.report
    return model, be, ids, mask, out, sites


STATE_VARIANTS = ("linear", "lightning", "decay_0.9", "mala", "window")  # generate decodes them from attncc.decode's state


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_llama_generate_matches_the_no_cache_loop(variant):
    """Prefill, the first decode step and the decode steps with a symbolic cache length: every graph's
    sites are rewritten (the report lists them as causal), and the tokens and logits are the no-cache
    loop's, with left padding. Linear and MALA decode from a StateCache (recurrent state)."""
    model, be, ids, mask, out, sites = _generate_matches_the_no_cache_loop("llama", variant)
    assert be.report.graphs >= 3 and len({s.graph for s in be.report.attention()}) >= 3, be.report
    assert {s.mask for s in be.report.attention()} == {"causal+padding"}, be.report
    if variant in STATE_VARIANTS:  # generate carried a StateCache: its graphs' sites are the state ops
        held, kernel = (("(window cache)", "reference") if variant == "window" else
                        ("(recurrent state)", "reference recurrent form"))
        assert all(s.pattern.endswith(held) and s.kernel == kernel for s in sites), be.report
        assert len({s.graph for s in sites}) >= 2, be.report  # the prefill and the decode steps
        assert model.config._attn_implementation == "sdpa"  # generate put the model's implementation back
    if variant == "softmax":  # the same math as the model: eager generate's tokens
        with torch.no_grad():
            eager = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
        assert out.sequences.tolist() == eager.tolist()
        assert "forward" not in model.__dict__  # generate put the model's own forward back


@pytest.mark.parametrize("variant", ["softmax", "lightning", "lssar", "window"])
def test_gpt2_generate_matches_the_no_cache_loop(variant):
    _generate_matches_the_no_cache_loop("gpt2", variant)


@pytest.mark.parametrize("variant,status", [("softmax", "rewritten"), ("linear", "unsupported"),
                                            ("window", "unsupported")])
def test_mistral_sliding_window_generate_matches_the_no_cache_loop(variant, status):
    """Mistral's window (4): its cache keeps the window only, which the registered model's config says,
    so decode steps are sliding_window(4) like the prefill's mask; variants that cannot serve a window
    (linear; sparse, which does not narrow a model's own window) are refused in every graph alike."""
    _, be, *_ = _generate_matches_the_no_cache_loop("mistral", variant, status)
    assert {s.mask for s in be.report.attention()} == {"sliding_window(4)+padding"}, be.report


def test_static_cache_decode_refuses_position_dependent_variants():
    """A static cache puts the queries before unused slots: the prefill's mask is `other` and the decode
    steps' none + padding, so Lightning decay (causal only) is refused in every graph, and says why."""
    torch.manual_seed(0)
    model = _llama().eval()
    ids, mask = _prompts()
    be = attncc.backend({"attention": {"default": VARIANTS["lightning"]}}, inner="aot_eager")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attncc.compile(model, be).generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                           cache_implementation="static")
    sites = be.report.attention()
    assert all(s.status == "unsupported" for s in sites), be.report
    assert all("causal-only" in s.reason for s in sites if s.graph > 0), be.report  # the decode steps


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["softmax", "lssar", "power"])
def test_gpu_generate_with_kernels_matches_the_no_cache_loop(variant):
    """On the GPU, through Inductor, with the KV cache: the prefill and the no-cache loop run the kernels,
    the decode steps the references (their queries end the keys); the tokens agree, the logits to
    float32 rounding."""
    _, be, *_ = _generate_matches_the_no_cache_loop("llama_d16", variant, device="cuda", tolerance=(2e-3, 2e-3))
    ran = {s.kernel or "" for s in be.report.attention()}
    assert any(k and not k.startswith("reference") for k in ran), be.report
    assert any(k.startswith("reference (the causal queries end") for k in ran), be.report


def test_a_sliding_window_decode_step_reads_only_the_window_and_the_sinks():
    """The sparse reference of a decode step gets the sinks and the last window keys of a long cache,
    and computes what the whole cache gives."""
    from attncc.codegen.variants.sparse import window_keys

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, t, 8, generator=g) for h, t in ((4, 2), (2, 50), (2, 50)))
    keys = torch.ones(2, 50, dtype=torch.bool)
    keys[1, :2] = False
    k2, v2, keys2 = window_keys(q, k, v, keys, 4, 3)
    assert k2.shape[-2] == v2.shape[-2] == keys2.shape[-1] == 3 + 2 + 4 - 1
    run = lambda k, v, keys: sparse_attention(q, k, v, scale=0.3, pattern="sliding_window", window=4, sinks=3,  # noqa: E731
                                              key_padding=keys, q_offset=k.shape[-2] - 2)
    torch.testing.assert_close(run(k2, v2, keys2), run(k, v, keys))


# --- decode from a recurrent state (attncc.decode) ------------------------------------------------

def _state_cache(model, policy):
    from attncc import decode
    from attncc.policy import load_policy

    return decode.state_cache(model, load_policy(policy))


@pytest.mark.parametrize("variant", ["linear", "mala", "window"])
def test_the_state_cache_holds_the_same_numbers_after_any_prompt(variant):
    """After a prefill of 8 or of 120 tokens, each layer holds O(heads·d²) numbers, or a window's keys
    and values: the same count."""
    from attncc import decode

    torch.manual_seed(0)
    model = _llama().eval()
    model.config.max_position_embeddings = 256
    decode.classes()  # registers the attention implementation with transformers (state_cache does too)
    model.set_attn_implementation(decode.IMPLEMENTATION)
    sizes = []
    for length in (8, 120):
        cache, why = _state_cache(model, {"attention": VARIANTS[variant]})
        assert why is None
        with torch.no_grad():
            model(torch.randint(3, VOCAB, (1, length)), cache=cache, use_cache=True)
        assert cache.get_seq_length() == length
        sizes.append(cache.numel())
    model.set_attn_implementation("sdpa")
    heads, kv_heads, d = 4, 2, 8
    per_layer = heads * d * d + heads * d + (heads * d + 1 if variant == "mala" else 0)
    if variant == "window":  # keys, values and whether each slot is filled: sinks + window slots
        slots = VARIANTS["window"]["sinks"] + VARIANTS["window"]["window"]
        per_layer = 2 * kv_heads * slots * d + slots
    assert sizes == [2 * per_layer] * 2


def test_a_window_cache_refuses_a_chunk_after_the_prefill():
    """A window cache continues one token per call (the queries of a longer chunk would each see a
    different window of the ring): a chunk of two is an error that says what to do."""
    from attncc import decode
    from attncc.errors import AttnccError

    model = _llama().eval()
    decode.classes()
    model.set_attn_implementation(decode.IMPLEMENTATION)
    cache, why = _state_cache(model, {"attention": VARIANTS["window"]})
    with torch.no_grad():
        model(torch.randint(3, VOCAB, (1, 6)), **{decode.cache_argument(model): cache}, use_cache=True)
        model(torch.randint(3, VOCAB, (1, 1)), **{decode.cache_argument(model): cache}, use_cache=True)
        with pytest.raises(AttnccError, match="one new token per call.*pass a cache to generate"):
            model(torch.randint(3, VOCAB, (1, 2)), **{decode.cache_argument(model): cache}, use_cache=True)
    model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("policy,reason", [
    ({"attention": "softmax"}, "gets softmax, which decodes from its KV cache"),
    ({"attention": VARIANTS["power"]}, "gets sparse power, which decodes from its KV cache"),
    ({"attention": "linear", "residual": "attnres"}, "AttnRes residual rewrite"),
    ({"attention": {"default": "linear", "rules": [{"where": {"layers": 1}, "use": "softmax"}]}},
     "model.layers.1.self_attn gets softmax"),
])
def test_generate_says_why_it_keeps_the_kv_cache(policy, reason):
    """A policy that is not linear or MALA on every layer (or adds AttnRes) decodes from the KV cache
    through the graph rewrite, and says why; so does a caller who chooses the cache."""
    torch.manual_seed(0)
    model = _llama().eval()
    ids, mask = _prompts()
    compiled = attncc.compile(model, attncc.backend(policy, inner="aot_eager"))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
        assert reason in compiled.state_decode
        if policy["attention"] == "softmax":
            from transformers import DynamicCache

            from attncc.decode import cache_argument

            compiled.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                              **{cache_argument(model): DynamicCache()})
            assert "the caller chose the cache" in compiled.state_decode


def test_a_hybrid_of_linear_and_window_layers_decodes_from_one_state_cache():
    """Layer 0 linear, layer 1 a sliding window with a sink: one StateCache holds a recurrent state and a
    window cache; the tokens and logits are the no-cache loop's (left padding; the ring wraps: a
    7-token prompt, window 4)."""
    torch.manual_seed(0)
    model = _llama().eval()
    ids, mask = _prompts()
    policy = {"attention": {"default": "linear", "rules": [{"where": {"layers": 1}, "use": VARIANTS["window"]}]}}
    be = attncc.backend(policy, inner="aot_eager")
    compiled = attncc.compile(model, be)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compiled.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                output_logits=True, return_dict_in_generate=True)
        held = {s.module: s.pattern for s in be.report.attention()}
        tokens, logits = _no_cache_loop(compiled, ids, mask)
    assert "decodes from its state" in compiled.state_decode
    assert held == {"model.layers.0.self_attn": "linear_state (recurrent state)",
                    "model.layers.1.self_attn": "window_state (window cache)"}, held
    assert out.sequences.tolist() == tokens.tolist()
    for got, want in zip(out.logits, logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_model_with_its_own_window_keeps_the_kv_cache():
    cache, why = _state_cache(_mistral(), {"attention": "linear"})
    assert cache is None and "sliding window" in why


@pytest.mark.parametrize("variant", ["linear", "lightning", "mala"])
def test_state_ops_on_the_kernels_continue_the_reference(variant, monkeypatch):
    """The state ops on the Triton kernels (interpreted): a prefill with left padding, then single
    tokens, equal the reference recurrent form step by step, states included."""
    from attncc.codegen.variants.linear.ops import linear_state
    from attncc.codegen.variants.mala.ops import mala_state

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 70, 16, generator=g) for h in (4, 2, 2))
    keys = torch.ones(2, 70, dtype=torch.bool)
    keys[1, :5] = False
    decay = lightning_decay_rates(4, 0, 2) * 8 if variant == "lightning" else None

    def run(kernels):
        state, outs = None, []
        for start, end in ((0, 67), (67, 68), (68, 69), (69, 70)):
            args = (q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], keys[:, start:end])
            if variant == "mala":
                o, *state = mala_state(*args, *(state or (None,) * 4), None, kernels, "")
            else:
                o, *state = linear_state(*args, decay, *(state or (None, None)), "elu1", True, 1e-6, kernels, "")
            outs.append(o)
        return torch.cat(outs, dim=2), state

    (got, got_state), (want, want_state) = run("triton"), run("reference")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(got_state, want_state):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["linear", "lightning", "mala", "window"])
def test_gpu_state_decode_runs_the_kernels(variant, monkeypatch):
    """On the GPU through Inductor, the prefill runs the state ops on the kernels, and each decode step's
    graph (one query per layer) runs as a CUDA graph: the same tokens and logits as the no-cache loop,
    over decode steps that replay the graph. The graph is recorded once, not once per step (a step whose
    inputs change size or address would record again)."""
    from torch._inductor import cudagraph_trees

    recorded = []
    record = cudagraph_trees.CUDAGraphTreeManager.record_function

    def counting(self, *args, **kwargs):
        recorded.append(1)
        return record(self, *args, **kwargs)

    monkeypatch.setattr(cudagraph_trees.CUDAGraphTreeManager, "record_function", counting)
    *_, sites = _generate_matches_the_no_cache_loop("llama_d16", variant, device="cuda", tolerance=(2e-3, 2e-3),
                                                    inner="inductor")
    assert 1 <= len(recorded) < NEW - 2, f"{len(recorded)} CUDA graph recordings over {NEW} new tokens"
    prefill = [s for s in sites if s.graph == min(t.graph for t in sites)]
    steps = [s for s in sites if s not in prefill]
    kernel = "flash" if variant == "window" else "linear_chunked"
    assert prefill and all(kernel in (s.kernel or "") for s in prefill), prefill
    assert steps and all("Inductor compiled the graph for its CUDA graph trees" in s.reason for s in steps), steps
    assert all("CUDA graph" not in s.reason for s in prefill), prefill


@pytest.mark.parametrize("variant", ["linear", "window"])
def test_every_decode_step_runs_one_graph_on_the_same_state_tensors(variant):
    """The decode steps of a state generate are one graph (the mask is trimmed to the new tokens, the
    positions and the count kept outside the graph, so nothing grows): two graphs for 8 tokens, the
    prefill's and the steps', even with every size static. The state tensors are the layer's buffers, updated in place: the same objects before and
    after a generate, holding the final state (what a CUDA graph needs: static addresses)."""
    from attncc import decode

    torch.manual_seed(0)
    model = _llama().eval()
    ids, mask = _prompts()
    be = attncc.backend({"attention": VARIANTS[variant]}, inner="aot_eager")
    compiled = attncc.compile(model, be)
    # without automatic dynamic shapes, a length read inside the graph would recompile it at every step
    with torch.no_grad(), warnings.catch_warnings(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        warnings.simplefilter("ignore")
        compiled.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        layers = [m.__dict__[decode.ATTRIBUTE] for m in model.modules() if decode.ATTRIBUTE in m.__dict__]
        buffers = [layer.buffers for layer in layers]
        assert all(b is not None and layer.state is b for b, layer in zip(buffers, layers))
        assert all(layer.seen == ids.shape[1] + 7 for layer in layers)  # the last token is not fed back
        compiled.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert len(be.reports) == 2, be.report
    assert all(layer.buffers is b and layer.state is b for b, layer in zip(buffers, layers))
    assert all(s.pattern.endswith("(window cache)" if variant == "window" else "(recurrent state)")
               for s in be.reports[1].attention())


def test_a_second_generate_starts_from_an_empty_state_and_reuses_the_graphs():
    """Each generate resets the model's state layers: the same prompt gives the same tokens, and no new
    graph is compiled (the layers the graphs read are the same objects)."""
    torch.manual_seed(0)
    model = _llama().eval()
    ids, mask = _prompts()
    be = attncc.backend({"attention": "linear"}, inner="aot_eager")
    compiled = attncc.compile(model, be)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = compiled.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        graphs = len(be.reports)
        second = compiled.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert second.tolist() == first.tolist()
    assert len(be.reports) == graphs, be.report


def test_compiled_calls_past_the_recompile_limit_raise_instead_of_running_the_original_attention():
    """torch.compile runs a frame past its recompile limit without the backend, that is with softmax
    attention: attncc.compile's call and generate raise AttnccError instead, saying how to fix it."""
    torch.manual_seed(0)
    model = _llama().eval()
    compiled = attncc.compile(model, attncc.backend({"attention": "linear"}, inner="aot_eager"), dynamic=False)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):
        compiled(torch.randint(3, VOCAB, (1, 5)))
        with pytest.raises(attncc.AttnccError, match="recompile limit.*dynamic=True"):
            compiled(torch.randint(3, VOCAB, (1, 6)))  # a new length, static shapes: a recompile
        ids, mask = _prompts()
        with warnings.catch_warnings(), pytest.raises(attncc.AttnccError, match="generate: dynamo reached"):
            warnings.simplefilter("ignore")
            compiled.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
