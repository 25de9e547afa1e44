"""No silent wrong answer (issue 9): the passes keep a model's semantics exactly, NaN and inf included,
never break what they do not touch, and never turn a size coincidence or a symbolic constant into a
different decision."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import attncc
from attncc.passes.canonicalize import canonicalize
from models import zoo


def _softmax_backend():
    return attncc.backend({"attention": "softmax"}, inner="aot_eager")


def _captured(model, *inputs) -> tuple[fx.GraphModule, list]:
    """The dynamo graph of `model(*inputs)` and its example inputs, untouched by attncc."""
    captured = []

    def capture(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm

    torch.compile(model, backend=capture, fullgraph=True)(*inputs)
    return captured[0]


def _canonicalized_output(model, *inputs):
    """Run only the canonicalize pass on the model's graph, then the graph itself."""
    gm, example_inputs = _captured(model, *inputs)
    canonicalize(gm)
    gm.recompile()
    return gm(*example_inputs)


# --- canonicalization keeps semantics, not just values up to rounding ------------------------------


class BaddbmmIgnoredInput(torch.nn.Module):
    """beta=0: torch ignores the input, NaN included."""

    def forward(self, q, k, v):
        bias = torch.full((q.shape[0], q.shape[1], k.shape[1]), float("nan"))
        scores = torch.baddbmm(bias, q, k.transpose(-2, -1), beta=0, alpha=0.5)
        return torch.matmul(scores.softmax(-1), v)


def test_baddbmm_with_beta_zero_does_not_read_its_input():
    torch.manual_seed(0)
    model = BaddbmmIgnoredInput()
    q, k, v = (torch.randn(4, 7, 8) for _ in range(3))
    be = _softmax_backend()
    out = torch.compile(model, backend=be)(q, k, v)
    assert out.isfinite().all()
    torch.testing.assert_close(out, model(q, k, v))
    (site,) = be.report.attention()
    assert site.status == "rewritten" and site.mask == "none", be.report


@pytest.fixture
def poisoned_empty():
    """torch.empty filled with NaN (as FLA's conftest does), so reading it shows instead of passing by luck."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0])
    torch.utils.deterministic.fill_uninitialized_memory = previous[1]


def test_gpt2_reorder_and_upcast_attn_report_does_not_read_uninitialized_memory(poisoned_empty):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=zoo.VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation="eager", reorder_and_upcast_attn=True,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2Model(cfg).eval()
    ids = zoo._ids(2, 11)
    reports = [[(s.mask, s.status) for s in attncc.explain(model, (ids,), {"attention": "softmax"},
                                                         {"use_cache": False}).attention()] for _ in range(3)]
    assert reports == [[("causal", "rewritten")] * 2] * 3
    torch._dynamo.reset()
    out = torch.compile(model, backend=_softmax_backend())(ids, use_cache=False)[0]
    torch.testing.assert_close(out, model(ids, use_cache=False)[0], rtol=1e-5, atol=1e-5)


class InPlaceOnView(torch.nn.Module):
    """`v *= 3` writes through the view into `base`, which is read afterwards."""

    def forward(self, x):
        base = x * 2
        view = base[:, :2]
        view *= 3
        return base + 0


class InPlaceAddKeepsDtype(torch.nn.Module):
    """`s += m` keeps s's bfloat16 where `s + m` would promote to float32."""

    def forward(self, x, m):
        s = x.to(torch.bfloat16) * 1
        s += m
        return s


class DivideByTiny(torch.nn.Module):
    """1 / 1e-40 is inf in float32: x * inf is NaN at x = 0 where x / 1e-40 is 0."""

    def forward(self, x):
        return (x * 1) / 1e-40


class CopyThenMutate(torch.nn.Module):
    """`.to(copy=True)` of the same dtype is a copy, not the identity: the mutation must not reach h."""

    def forward(self, x):
        h = x * 1.0
        y = h.to(h.dtype, copy=True)
        y.mul_(2.0)
        return h + y


def _row(cls, *inputs):
    return pytest.param(cls, inputs, id=cls.__name__)


@pytest.mark.parametrize("cls,inputs", [
    _row(InPlaceOnView, torch.randn(3, 4)),
    _row(InPlaceAddKeepsDtype, torch.randn(3, 4), torch.randn(3, 4)),
    _row(DivideByTiny, torch.tensor([0.0, 1e-30, -2e-31])),
    _row(CopyThenMutate, torch.randn(3, 4)),
])
def test_canonicalize_keeps_semantics(cls, inputs):
    model = cls()
    out, ref = _canonicalized_output(model, *inputs), model(*inputs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, equal_nan=False)


def test_tuple_concatenation_is_not_commuted():
    """`(1,) + x.shape` is an operator.add node under fx tracing; swapping its operands changes the shape."""

    def prepend_axis(x):
        return x.reshape((1,) + x.shape)

    gm = fx.symbolic_trace(prepend_axis)
    canonicalize(gm)
    gm.recompile()
    x = torch.randn(2, 3)
    assert gm(x).shape == (1, 2, 3)


# --- a pass never breaks what it does not touch -----------------------------------------------------


class VmapThenAttention(torch.nn.Module):
    """dynamo brackets the vmap with `_vmap_increment_nesting`/`_vmap_decrement_nesting`, whose values
    nothing reads: a dead-code sweep over the whole graph removes them and breaks the model."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, q, k, v):
        scaled = torch.vmap(lambda x: self.proj(x) * 2.0)(q)
        return F.scaled_dot_product_attention(scaled, k, v)


class VmapThenMultiheadAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32, 32)
        self.mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        h = torch.vmap(self.proj)(x)
        return self.mha(h, h, h, need_weights=False)[0]


def test_decompose_keeps_effectful_nodes_it_did_not_touch():
    from attncc.passes.decompose import decompose

    torch.manual_seed(0)
    model = VmapThenMultiheadAttention().eval()
    x = torch.randn(2, 7, 32)
    gm, example_inputs = _captured(model, x)
    hits, _ = decompose(gm)
    gm.recompile()
    assert hits == {"decompose_mha": 1}
    torch.testing.assert_close(gm(*example_inputs)[0], model(x), rtol=1e-5, atol=1e-6)


def test_remove_dead_erases_only_dead_pure_candidates():
    from attncc.fx import orphaned, read_nodes, remove_dead

    def program(x):
        y = x * 2
        y.add_(1)  # read by nothing, but mutates y
        unused = x + 3
        return y

    gm = fx.symbolic_trace(program)
    graph = gm.graph
    before = read_nodes(graph)
    (add_,) = [n for n in graph.nodes if n.target == "add_"]
    (unused,) = [n for n in graph.nodes if n.op == "call_function" and n.args[1:] == (3,)]
    assert add_ not in orphaned(graph, before) and unused not in orphaned(graph, before)
    assert remove_dead(graph, [add_, unused]) == 1  # the pure one goes, the mutation stays
    gm.recompile()
    torch.testing.assert_close(gm(torch.ones(2)), torch.full((2,), 3.0))


@pytest.mark.parametrize("policy", ["keep", "softmax"])
def test_vmap_in_forward_compiles_under_every_policy(policy):
    torch.manual_seed(0)
    model = VmapThenAttention()
    q, k, v = (torch.randn(2, 4, 7, 8) for _ in range(3))
    be = attncc.backend({"attention": policy}, inner="aot_eager")
    out = torch.compile(model, backend=be)(q, k, v)
    torch.testing.assert_close(out, model(q, k, v), rtol=1e-5, atol=1e-6)
    (site,) = be.report.attention()
    assert site.status == ("kept" if policy == "keep" else "rewritten")


def test_unread_in_place_op_survives_the_pipeline():
    model = CopyThenMutate()
    x = torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no attention in this model
        out = torch.compile(model, backend=attncc.backend({"attention": "keep"}, inner="aot_eager"))(x)
    torch.testing.assert_close(out, model(x))


# --- size coincidences do not change decisions; a policy that cannot apply says so -----------------


@pytest.mark.parametrize("length", [32, 4, 8], ids=["T=hidden", "T=heads", "T=head_dim"])
def test_sqa_when_the_length_equals_a_model_size(length):
    """Tiny Llama has hidden 32, 4 heads of 8: a length equal to any of them must not be taken for them."""
    from test_sqa import _llama, _surgery

    torch.manual_seed(0)
    model = _llama(4, 2).eval()
    ids = zoo._ids(2, length)
    policy = {"attention": {"variant": "sqa", "query_heads": 2, "kv_heads": 1, "init": "mean"}}
    be = attncc.backend(policy, inner="aot_eager")
    out = torch.compile(model, backend=be)(ids, use_cache=False)[0]
    assert [s.status for s in be.report.attention()] == ["rewritten"] * 2, be.report
    reference = _llama(2, 1).eval()
    reference.load_state_dict(_surgery(model.state_dict(), 2, 1, "mean"))
    torch.testing.assert_close(out, reference(ids, use_cache=False)[0], rtol=1e-5, atol=1e-5)


def test_sqa_query_heads_that_do_not_divide_warn_once_per_graph():
    from test_sqa import _llama

    torch.manual_seed(0)
    model = _llama(4, 2).eval()
    ids = zoo._ids(2, 11)
    be = attncc.backend({"attention": {"variant": "sqa", "query_heads": 3}}, inner="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(model, backend=be)(ids, use_cache=False)[0]
    torch.testing.assert_close(out, model(ids, use_cache=False)[0])
    sites = be.report.attention()
    assert {s.status for s in sites} == {"unsupported"} and all("query_heads=3" in s.reason for s in sites)
    ours = [str(w.message) for w in caught if "sqa" in str(w.message)]
    assert len(ours) == 1, ours
    assert all(s.module in ours[0] for s in sites) and "must divide" in ours[0]


# --- a probability dynamo lifted to an input is not a reason to refuse -----------------------------


class NanoGptSdpa(torch.nn.Module):
    """nanoGPT's CausalSelfAttention with flash attention."""

    def __init__(self, c: int = 32, heads: int = 4, p: float = 0.1):
        super().__init__()
        self.c_attn, self.c_proj = torch.nn.Linear(c, 3 * c), torch.nn.Linear(c, c)
        self.heads, self.attn_dropout = heads, p

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.c_attn(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0,
                                           is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class NanoGptChain(NanoGptSdpa):
    """nanoGPT's CausalSelfAttention without flash attention: `F.dropout(att, p=self.p, training=...)`."""

    def __init__(self, c: int = 32, heads: int = 4, p: float = 0.1):
        super().__init__(c, heads, p)
        self.p = p

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.c_attn(x).split(c, dim=2))
        att = (q @ k.transpose(-2, -1)) * (1.0 / (k.size(-1) ** 0.5))
        att = F.dropout(F.softmax(att, dim=-1), p=self.p, training=self.training)
        return self.c_proj((att @ v).transpose(1, 2).contiguous().view(b, t, c))


class DropoutAttribute(torch.nn.Module):
    """SDPA applies `dropout_p` whatever the mode: a float attribute is a run-time probability."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.p)


def _compiled_dynamic(model, inner: str):
    be = attncc.backend({"attention": "softmax"}, inner=inner)
    return torch.compile(model, backend=be, dynamic=True), be


@pytest.mark.parametrize("inner", ["aot_eager", "eager"])
@pytest.mark.parametrize("cls", [NanoGptSdpa, NanoGptChain], ids=lambda c: c.__name__)
def test_symbolic_dropout_in_eval_mode_is_rewritten(cls, inner):
    torch.manual_seed(0)
    model = cls().eval()
    compiled, be = _compiled_dynamic(model, inner)
    for length in (7, 13):
        x = torch.randn(2, length, 32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = compiled(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
    sites = be.report.attention()
    assert sites and {s.status for s in sites} == {"rewritten"}, be.report


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_run_time_dropout_probability_is_passed_on(p):
    """inner="eager" runs the graph dynamo traced (AOT would specialize the float): p=1 drops everything."""
    torch.manual_seed(0)
    model = DropoutAttribute(p)
    compiled, be = _compiled_dynamic(model, "eager")
    q, k, v = (torch.randn(2, 4, 7, 8) for _ in range(3))
    torch.testing.assert_close(compiled(q, k, v), model(q, k, v), rtol=1e-5, atol=1e-6)
    (site,) = be.report.attention()
    assert site.status == "rewritten", be.report
