"""AttnRes (VARIANTS.md §9): the reference, the rewritten stream, and its parameters on the user's model.

Levels: the reference aggregation against the spec's oracle (zero queries == the pre-norm residual
net); the rewritten graph against an AttnRes forward written here with explicit loops (nonzero
queries loaded through model.state_dict()); function preservation on GPT-2 and Llama's own code;
gradients, training, state_dict round trips and recompiles, which all need the parameters to be
real parameters of the model; where they come from: only attncc.prepare (or attncc.compile, which calls
it) creates them, and the backend reads them from the graph's inputs.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attncc
from attncc.codegen.variants.attnres.reference import attnres, attnres_stream
from models import zoo

D = 32


def _policy(block_size: int) -> dict:
    return {"attention": "keep", "residual": {"variant": "attnres", "block_size": block_size}}


def _compile(model, block_size: int):
    """attncc.compile: its first call prepares the model (creates the AttnRes parameters), then compiles."""
    be = attncc.backend(_policy(block_size), inner="aot_eager")
    return attncc.compile(model, be), be


def _inner_error(excinfo) -> BaseException:
    """What the backend raised: dynamo wraps backend errors in BackendCompilerFailed."""
    return getattr(excinfo.value, "inner_exception", None) or excinfo.value


def _residual(report):
    return [s for s in report.sites if s.kind == "residual"]


def _randomize_attnres(model, seed: int = 1) -> None:
    """Nonzero queries and key-norm weights, set the way a user would: through the state dict."""
    g = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for key, value in state.items():
        if key.startswith("attncc_attnres."):
            noise = torch.randn(value.shape, generator=g)
            state[key] = noise if key.endswith(".query") else 1 + 0.5 * noise
    model.load_state_dict(state)


# --- the reference ---------------------------------------------------------------------------------


def test_reference_zero_query_is_the_mean_and_one_source_is_identity():
    sources = [torch.randn(2, 5, D) for _ in range(4)]
    zero, ones = torch.zeros(D), torch.ones(D)
    torch.testing.assert_close(attnres(sources, zero, ones), torch.stack(sources).mean(0))
    assert attnres(sources[:1], zero, ones) is sources[0]


def test_reference_weights_follow_the_query():
    sources = [torch.randn(3, D) for _ in range(3)]
    query = 50 * F.normalize(sources[1], dim=-1).mean(0)  # points at source 1
    out = attnres(sources, query, torch.ones(D))
    assert (out - sources[1]).abs().mean() < (out - sources[0]).abs().mean()


@pytest.mark.parametrize("eps,tolerance", [(0.0, 1e-12), (1e-6, 1e-4)], ids=["eps0", "eps1e-6"])
@pytest.mark.parametrize("block_size", [1, 2, 4, 5, 12])
def test_reference_zero_queries_equal_the_prenorm_residual_net(block_size, eps, tolerance):
    """VARIANTS.md §10.3 oracle 1 on a toy 12-sublayer pre-norm net in float64: exact when the norms
    have no eps, and within eps effects (mean(h²)/c² against eps) otherwise."""
    torch.manual_seed(0)
    weights = [torch.randn(D, D, dtype=torch.float64) / math.sqrt(D) for _ in range(12)]
    sublayers = [lambda x, w=w: torch.tanh(F.layer_norm(x, (D,), eps=eps) @ w) for w in weights]
    embedding = torch.randn(4, 7, D, dtype=torch.float64)
    h = embedding
    for f in sublayers:
        h = h + f(h)
    expected = F.layer_norm(h, (D,), eps=eps)
    zeros = [torch.zeros(D, dtype=torch.float64)] * 13
    ones = [torch.ones(D, dtype=torch.float64)] * 13
    out = attnres_stream(embedding, sublayers, zeros, ones, block_size=block_size, eps=1e-6)
    assert (F.layer_norm(out, (D,), eps=eps) - expected).abs().max() <= tolerance


# --- an AttnRes forward written independently of attncc ----------------------------------------------


class Block(nn.Module):
    def __init__(self, d: int, norm):
        super().__init__()
        self.ln1, self.ln2 = norm(d), norm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def attn(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 4, d // 4).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))

    def mlp(self, x):
        return self.fc2(F.gelu(self.fc1(x)))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyPreNorm(nn.Module):
    def __init__(self, norm, layers: int = 3, d: int = D):
        super().__init__()
        self.embed = nn.Embedding(64, d)
        self.blocks = nn.ModuleList([Block(d, norm) for _ in range(layers)])
        self.ln_f = norm(d)
        self.head = nn.Linear(d, 64)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def depth_attention(sources, query, weight, eps):
    """Σ_i softmax_i(w · RMSNorm(v_i)) v_i, one source at a time."""
    logits = []
    for v in sources:
        key = v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight
        logits.append((key * query).sum(-1))
    alpha = torch.softmax(torch.stack(logits), dim=0)
    out = torch.zeros_like(sources[0])
    for i, v in enumerate(sources):
        out = out + alpha[i].unsqueeze(-1) * v
    return out


def attnres_forward(model: TinyPreNorm, ids, block_size: int, eps: float):
    """VARIANTS.md §9.1/§9.2 on TinyPreNorm: blocks of `block_size` sublayers, the embedding as b_0."""
    params = model.attncc_attnres
    sublayers = []
    for block in model.blocks:
        sublayers += [lambda h, b=block: b.attn(b.ln1(h)), lambda h, b=block: b.mlp(b.ln2(h))]
    completed = [model.embed(ids)]
    partial = None
    for l, f in enumerate(sublayers):
        sources = completed + ([] if partial is None else [partial])
        if len(sources) == 1:
            h = sources[0]
        else:
            p = params[f"sublayer_{l}"]
            h = depth_attention(sources, p.query, p.key_norm.weight, eps)
        out = f(h)
        partial = out if partial is None else partial + out
        if l % block_size == block_size - 1:
            completed.append(partial)
            partial = None
    sources = completed + ([] if partial is None else [partial])
    h = depth_attention(sources, params["output"].query, params["output"].key_norm.weight, eps)
    return model.head(model.ln_f(h))


NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": lambda d: nn.RMSNorm(d, eps=1e-6)}


@pytest.mark.parametrize("norm,block_size", [("layernorm", 1), ("layernorm", 2), ("rmsnorm", 3), ("layernorm", 4)])
def test_rewrite_equals_independent_attnres(norm, block_size):
    torch.manual_seed(0)
    model = TinyPreNorm(NORMS[norm])
    ids = torch.randint(0, 64, (2, 9))
    compiled, be = _compile(model, block_size)
    compiled(ids)
    _randomize_attnres(model)
    eps = model.ln_f.eps
    assert all(m.key_norm.eps == eps for m in model.attncc_attnres.values())
    assert all(m.query.abs().sum() > 0 for m in model.attncc_attnres.values())

    torch.testing.assert_close(compiled(ids), attnres_forward(model, ids, block_size, eps), rtol=1e-5, atol=1e-5)
    sites = _residual(be.report)
    assert len(sites) == 6 and all(s.status == "rewritten" for s in sites), be.report
    assert {s.params["block_size"] for s in sites} == {block_size}
    assert sorted(model.attncc_attnres) == sorted([f"sublayer_{l}" for l in range(1, 6)] + ["output"])


# --- function preservation on real model code -------------------------------------------------------


def _gpt2(eps: float):
    from transformers import GPT2Config, GPT2Model

    return GPT2Model(GPT2Config(vocab_size=128, n_embd=D, n_layer=3, n_head=4, n_positions=64, attn_pdrop=0.0,
                                resid_pdrop=0.0, embd_pdrop=0.0, layer_norm_epsilon=eps, bos_token_id=0,
                                eos_token_id=0))


def _llama(eps: float):
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(LlamaConfig(vocab_size=128, hidden_size=D, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=eps))


@pytest.mark.parametrize("block_size", [1, 2, 4])
@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_zero_queries_preserve_the_function(build, block_size):
    """With w = 0 every aggregation is a mean: Norm(h / c) = Norm(h) up to the norm's eps.

    Random-init HF models have hidden states of RMS ~0.02, where eps = 1e-5 is not small against
    mean(h²)/c², so the model's eps is set to 1e-12 here; the rewrite itself is unchanged.
    """
    torch.manual_seed(0)
    model = build(1e-12)
    ids = torch.randint(0, 128, (2, 11))
    compiled, be = _compile(model, block_size)
    out = compiled(ids)[0]
    ref = model(ids)[0]
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    sites = _residual(be.report)
    assert len(sites) == 6 and all(s.status == "rewritten" for s in sites), be.report
    assert all("function-preserving at init" in s.reason for s in sites)


@pytest.mark.parametrize("block_size", [1, 2])
def test_exact_start_computes_the_original_at_init(block_size):
    """exact_start: each aggregation scaled by its number of sources is the plain sum, the original stream.
    With the model's own eps (1e-6, where the paper's mean form is visibly off on a random-init model) the
    output equals the original's to float rounding; without it the error is larger."""
    torch.manual_seed(0)
    model = _llama(1e-6)
    ids = torch.randint(0, 128, (2, 11))
    ref = model(ids)[0]
    errors = {}
    for exact in (False, True):
        torch._dynamo.reset()
        policy = {"attention": "keep", "residual": {"variant": "attnres", "block_size": block_size,
                                                    "exact_start": exact}}
        be = attncc.backend(policy, inner="aot_eager")
        out = attncc.compile(model, be)(ids)[0]
        errors[exact] = ((out - ref).abs().max() / ref.abs().max()).item()
        sites = _residual(be.report)
        assert all(s.status == "rewritten" for s in sites), be.report
    assert errors[True] < 1e-5 < errors[False], errors
    assert all("exact at init" in s.reason for s in sites)


def test_postnorm_rewrite_is_allowed_and_says_it_is_not_preserving():
    torch.manual_seed(0)
    model, args, kwargs, layers = zoo.bert("sdpa")
    compiled, be = _compile(model, 1)
    out = compiled(*args, **kwargs)[0]
    assert torch.isfinite(out).all()
    sites = _residual(be.report)
    assert len(sites) == 2 * layers and all(s.status == "rewritten" for s in sites)
    assert all("not function-preserving: post-norm" in s.reason for s in sites)
    (out * torch.randn_like(out)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attncc.parameters(model)[::2])


# --- the parameters: gradients, training, state dict, recompiles -------------------------------------


def test_gradients_reach_every_query_and_key_norm():
    torch.manual_seed(0)
    model, args, kwargs, layers = zoo.llama("sdpa", layers=3)
    compiled, _ = _compile(model, 2)
    weight = torch.randn(2, 11, D)
    (compiled(*args, **kwargs)[0] * weight).sum().backward()
    names = dict(model.named_parameters())
    queries = [n for n in names if n.startswith("attncc_attnres.") and n.endswith(".query")]
    assert len(queries) == 2 * layers  # sublayers 1..5 and the output
    assert all(names[n].grad.abs().sum() > 0 for n in queries)  # at w = 0 too

    model.zero_grad()
    _randomize_attnres(model)
    (compiled(*args, **kwargs)[0] * weight).sum().backward()
    attnres_names = [n for n in names if n.startswith("attncc_attnres.")]
    assert len(attnres_names) == 4 * layers
    assert all(names[n].grad is not None and names[n].grad.abs().sum() > 0 for n in attnres_names)


def test_training_a_tiny_gpt_reduces_the_loss():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=D, n_layer=2, n_head=4, n_positions=32, attn_pdrop=0.0,
                                       resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    compiled, be = _compile(model, 1)

    def next_token_loss():  # outside the model: canonicalize drops the `.contiguous()` before HF's label `.view`
        logits = compiled(ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))

    loss = next_token_loss()  # the first call registers the AttnRes parameters ...
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # ... so the optimizer sees them
    assert {id(p) for p in attncc.parameters(model)} <= {id(p) for g in optimizer.param_groups for p in g["params"]}
    first = loss.item()
    for _ in range(50):
        optimizer.zero_grad()
        loss = next_token_loss()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first
    assert all(m.query.abs().max() > 1e-3 for m in model.attncc_attnres.values())
    assert len(be.reports) == 1


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    model, args, kwargs, _ = zoo.gpt2("sdpa")
    compiled, _ = _compile(model, 2)
    compiled(*args, **kwargs)
    _randomize_attnres(model)
    expected = compiled(*args, **kwargs)[0]
    torch.save(model.state_dict(), tmp_path / "model.pt")

    torch.manual_seed(1)
    fresh, *_ = zoo.gpt2("sdpa")
    attncc.prepare(fresh, _policy(2), args, kwargs)  # creates the AttnRes parameters, so the keys match
    assert sorted(fresh.state_dict()) == sorted(model.state_dict())
    fresh.load_state_dict(torch.load(tmp_path / "model.pt"))
    compiled_fresh, _ = _compile(fresh, 2)
    torch.testing.assert_close(compiled_fresh(*args, **kwargs)[0], expected)


def test_recompile_reuses_the_parameters():
    torch.manual_seed(0)
    model, args, kwargs, _ = zoo.llama("sdpa")
    compiled, be = _compile(model, 1)
    compiled(*args, **kwargs)
    before = attncc.parameters(model)
    out = compiled(torch.randint(0, 128, (2, 7)), **kwargs)[0]  # a new length: dynamo recompiles
    assert len(be.reports) == 2
    assert all(s.status == "rewritten" for s in _residual(be.reports[1]))
    after = attncc.parameters(model)
    assert len(after) == len(before) and all(a is b for a, b in zip(after, before))
    assert attncc.parameters(compiled) == after
    out.sum().backward()
    assert all(p.grad is not None for p in before[::2])


def test_two_instances_with_one_backend_each_use_their_own_parameters():
    """The parameters are graph inputs, not constants of a graph: a second instance of the class may reuse the
    first one's graph (no guard on the model), and it computes with its own parameters."""
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 9))
    first, second = TinyPreNorm(nn.LayerNorm), TinyPreNorm(nn.LayerNorm)
    for seed, model in enumerate((first, second)):
        attncc.prepare(model, _policy(2), (ids,))
        _randomize_attnres(model, seed=seed + 1)
    be = attncc.backend(_policy(2), inner="aot_eager")
    outs = [torch.compile(model, backend=be)(ids) for model in (first, second)]
    assert not {id(p) for p in attncc.parameters(first)} & {id(p) for p in attncc.parameters(second)}
    for model, out in zip((first, second), outs):
        torch.testing.assert_close(out, attnres_forward(model, ids, 2, model.ln_f.eps), rtol=1e-5, atol=1e-5)
    (outs[1] * torch.randn_like(outs[1])).sum().backward()
    assert all(p.grad is None for p in attncc.parameters(first))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attncc.parameters(second))


def test_a_deep_copy_of_a_prepared_model_uses_its_own_parameters():
    import copy

    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 9))
    model = TinyPreNorm(nn.LayerNorm)
    attncc.prepare(model, _policy(1), (ids,))
    clone = copy.deepcopy(model)
    _randomize_attnres(clone)
    out = torch.compile(clone, backend=attncc.backend(_policy(1), inner="aot_eager"))(ids)
    torch.testing.assert_close(out, attnres_forward(clone, ids, 1, clone.ln_f.eps), rtol=1e-5, atol=1e-5)


def test_compile_without_prepare_says_what_to_do():
    model = TinyPreNorm(nn.LayerNorm, layers=1)
    ids = torch.randint(0, 64, (2, 5))
    be = attncc.backend(_policy(1), inner="aot_eager")
    with pytest.raises(Exception) as excinfo:
        torch.compile(model, backend=be)(ids)
    error = _inner_error(excinfo)
    assert isinstance(error, attncc.AttnccError)
    assert "call attncc.prepare(model, policy, example_args) before compiling, or use attncc.compile(model, policy)" \
        in str(error)
    assert attncc.parameters(model) == [] and not hasattr(model, "attncc_attnres")

    torch._dynamo.reset()
    attncc.prepare(model)  # without a policy: only registers the model, creates nothing
    assert attncc.parameters(model) == []
    with pytest.raises(Exception, match=r"attncc\.prepare"):
        torch.compile(model, backend=attncc.backend(_policy(1), inner="aot_eager"))(ids)
    with pytest.raises(attncc.AttnccError, match="example inputs"):
        attncc.prepare(model, _policy(1))


def test_attncc_compile_end_to_end():
    """attncc.compile prepares on its first call: the output equals eager at init (pre-norm, zero queries), the
    AttnRes parameters get gradients, and an optimizer built after the first call trains them."""
    torch.manual_seed(0)
    model = _llama(1e-12)
    ids = torch.randint(0, 128, (2, 11))
    ref = model(ids)[0]
    be = attncc.backend(_policy(2), inner="aot_eager")
    compiled = attncc.compile(model, be)
    assert attncc.parameters(model) == []  # nothing happens before the first call
    out = compiled(ids)[0]
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert len(attncc.parameters(model)) == 2 * 6 and attncc.parameters(compiled) == attncc.parameters(model)
    assert all(s.status == "rewritten" for s in _residual(be.report)), be.report
    (out * torch.randn_like(out)).sum().backward()
    queries = [m.query for m in model.attncc_attnres.values()]
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in queries)
    assert len(be.reports) == 1  # prepare's trace is not the backend's
    compiled.eval()  # other attributes are torch.compile's module's
    assert not model.training


def test_prepare_creates_parameters_before_the_first_compile():
    model = TinyPreNorm(nn.LayerNorm, layers=2)
    ids = torch.randint(0, 64, (2, 5))
    assert attncc.prepare(model, {"attention": "keep"}, (ids,)) is model
    assert attncc.parameters(model) == []  # residual keep: nothing to create
    attncc.prepare(model, _policy(2), (ids,))
    created = attncc.parameters(model)
    assert len(created) == 2 * 4 and all(p.requires_grad for p in created)
    assert all(m.query.abs().sum() == 0 for m in model.attncc_attnres.values())
    compiled, _ = _compile(model, 2)
    compiled(ids)
    assert all(a is b for a, b in zip(attncc.parameters(model), created))


def test_prepare_is_idempotent():
    torch.manual_seed(0)
    model = TinyPreNorm(nn.LayerNorm, layers=2)
    ids = torch.randint(0, 64, (2, 5))
    attncc.prepare(model, _policy(1), (ids,))
    _randomize_attnres(model)
    created = attncc.parameters(model)
    values = [p.detach().clone() for p in created]
    attncc.prepare(model, _policy(1), (torch.randint(0, 64, (3, 7)),))
    assert all(a is b for a, b in zip(attncc.parameters(model), created)) and len(attncc.parameters(model)) == 8
    assert all(torch.equal(p, v) for p, v in zip(created, values))
    hooks = [h for m in model.modules() for h in m._forward_pre_hooks.values()]
    assert len(hooks) == 1  # the anchor is replaced, not added again

    with torch.no_grad():  # parameters of the wrong shape: a clear error, not a silent new set
        model.attncc_attnres["output"].query = nn.Parameter(torch.zeros(D + 1))
    with pytest.raises(attncc.AttnccError, match=r"attncc_attnres\.output\.query has shape \(33,\)"):
        attncc.prepare(model, _policy(1), (ids,))


def test_eager_calls_of_a_prepared_model_compute_the_original_model():
    torch.manual_seed(0)
    model = TinyPreNorm(nn.LayerNorm, layers=2)
    ids = torch.randint(0, 64, (2, 5))
    before = model(ids)
    attncc.prepare(model, _policy(1), (ids,))
    _randomize_attnres(model)
    assert torch.equal(model(ids), before)


def test_recompiles_for_a_new_length_reuse_the_parameters_with_dynamic_shapes():
    torch.manual_seed(0)
    model = TinyPreNorm(nn.LayerNorm, layers=2)
    compiled, be = _compile(model, 1)
    compiled(torch.randint(0, 64, (2, 5)))
    _randomize_attnres(model)
    created = attncc.parameters(model)
    for length in (7, 9):  # 7: dynamo recompiles with a symbolic length; 9 runs that graph
        ids = torch.randint(0, 64, (2, length))
        torch.testing.assert_close(compiled(ids), attnres_forward(model, ids, 1, model.ln_f.eps), rtol=1e-5,
                                   atol=1e-5)
    assert len(be.reports) == 2 and all(s.status == "rewritten" for s in _residual(be.reports[1]))
    assert all(a is b for a, b in zip(attncc.parameters(model), created))


class GraphBreak(TinyPreNorm):
    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
            torch._dynamo.graph_break()
        return self.head(self.ln_f(x))


def test_a_stream_split_by_a_graph_break_is_left_alone():
    torch.manual_seed(0)
    model = GraphBreak(nn.LayerNorm, layers=2)
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(attncc.AttnccError, match="found no residual stream to rewrite"):
        attncc.prepare(model, _policy(1), (ids,))
    be = attncc.backend(_policy(1), inner="aot_eager")
    compiled = torch.compile(model, backend=be)  # unprepared, and no error: no stream would be rewritten
    torch.testing.assert_close(compiled(ids), model(ids))
    sites = _residual(be.report)
    assert sites and all(s.status == "unsupported" and "graph break" in s.reason for s in sites), be.report
    assert attncc.parameters(model) == []


def test_generate_through_attncc_compile_prepares_and_rewrites_every_graph():
    """attncc.compile(...).generate prepares the AttnRes parameters from generate's inputs and compiles
    the forward that generate calls: prefill and decode graphs both rewrite the residual stream."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    be = attncc.backend({"attention": "softmax", "residual": "attnres"}, inner="aot_eager")
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = attncc.compile(model, be).generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 9) and attncc.parameters(model)
    residual = _residual(be.report)
    assert len({s.graph for s in residual}) >= 2 and all(s.status == "rewritten" for s in residual), be.report