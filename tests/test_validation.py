"""No silent wrong answer (issue 9): `keep` is plain torch.compile, explain has no side effects, verify
checks what it claims to, and bad options, policies and build files fail with a message that names the fix."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn as nn

import attncc
import attncc.compiler
from attncc.cli import main
from attncc.compiler import ISOLATED
from attncc.codegen.variants.sparse import Sparse
from attncc.policy import PolicyError, load_policy
from models import zoo
from spellings import B, C, T, GraphBreak, TwoLayers

ATTNRES = {"attention": "keep", "residual": {"variant": "attnres", "block_size": 2}}


def _inner_error(excinfo) -> BaseException:
    """What the backend raised: dynamo wraps backend errors in BackendCompilerFailed."""
    err = excinfo.value
    return getattr(err, "inner_exception", None) or err


def _tensors(out) -> list[torch.Tensor]:
    return [leaf for leaf in torch.utils._pytree.tree_leaves(out) if isinstance(leaf, torch.Tensor)]


def _x(seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(B, T, C, generator=torch.Generator().manual_seed(seed))


def _two_layers() -> nn.Module:
    torch.manual_seed(0)
    return TwoLayers().eval()


# --- 1. keep is bit-for-bit plain torch.compile ------------------------------------------------------------


def _multihead_attention():
    torch.manual_seed(0)
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(0))
    return nn.MultiheadAttention(32, 4, batch_first=True), (x, x, x), {"need_weights": False}, 1


def _bloom():
    """BLOOM's ALiBi scores are a baddbmm, which canonicalization expands to add(mul, mul(matmul))."""
    from transformers import BloomConfig, BloomModel

    torch.manual_seed(0)
    cfg = BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=zoo.VOCAB, attn_implementation="eager")
    return BloomModel(cfg), (zoo._ids(2, 11),), {"attention_mask": zoo.padding_mask(2, 11), "use_cache": False}, 2


KEEP_MODELS = {
    "gpt2-eager": lambda: zoo.gpt2("eager", padding=True),
    "gpt2-sdpa": lambda: zoo.gpt2("sdpa"),
    "llama-eager": lambda: zoo.llama("eager", padding=True),
    "bert-eager": lambda: zoo.bert("eager", padding=True),
    "bloom-eager": _bloom,
    "multihead-attention": _multihead_attention,
}


@pytest.mark.parametrize("build", KEEP_MODELS.values(), ids=KEEP_MODELS.keys())
def test_keep_is_bit_for_bit_plain_compile(build):
    torch.manual_seed(0)
    model, args, kwargs, _ = build()
    model.eval()
    with torch.no_grad():
        expected = _tensors(torch.compile(model, backend="aot_eager")(*args, **kwargs))
        torch._dynamo.reset()
        be = attncc.backend({"attention": "keep"}, inner="aot_eager")
        got = _tensors(torch.compile(model, backend=be)(*args, **kwargs))
    assert be.report.attention(), "the pipeline saw no attention, so this test checks nothing"
    assert be.report.count("rewritten") == 0
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a, b), (a - b).abs().max()


def test_a_rewrite_still_reaches_the_inner_compiler(monkeypatch):
    from attncc.codegen.variants.softmax import SoftmaxVariant

    calls = []
    correct = SoftmaxVariant.run

    def run(*args):
        calls.append(1)
        return correct(*args)

    monkeypatch.setattr(SoftmaxVariant, "run", run)
    be = attncc.backend({"attention": "softmax"}, inner="eager")
    torch.compile(_two_layers(), backend=be)(_x())
    assert be.report.count("rewritten") == 2 and len(calls) == 2


# --- 2. explain has no side effects ----------------------------------------------------------------------


@pytest.fixture
def counting():
    """A backend that records each graph it compiles in `counting.graphs`."""

    def backend(gm, example_inputs):
        backend.graphs.append(gm)
        return gm.forward

    backend.graphs = []
    return backend


def test_explain_does_not_recompile_other_models(counting):
    model, args, kwargs, _ = zoo.gpt2("eager")
    model.eval()
    compiled = torch.compile(model, backend=counting)
    compiled(*args, **kwargs)
    assert len(counting.graphs) == 1
    other, other_args, other_kwargs, _ = zoo.gpt2("eager")
    for explained, a, k in ((model, args, kwargs), (other.eval(), other_args, other_kwargs)):
        attncc.explain(explained, a, {"attention": "softmax"}, example_kwargs=k)
        compiled(*args, **kwargs)
        assert len(counting.graphs) == 1, "explain made an earlier torch.compile recompile"


def test_explain_can_run_more_often_than_the_recompile_limit():
    limit = torch._dynamo.config.recompile_limit
    for _ in range(limit + 2):
        report = attncc.explain(_two_layers(), (_x(),), {"attention": "softmax"})
        assert report.count("rewritten") == 2


@pytest.mark.parametrize("compiled_first", [
    pytest.param(False, id="explain-only"),
    pytest.param(True, id="after-a-compile", marks=pytest.mark.skipif(
        not ISOLATED, reason="before torch 2.13 a trace's compiles of a code object count against an earlier compile's")),
])
def test_explain_across_a_graph_break(counting, compiled_first):
    torch.manual_seed(0)
    compiled = torch.compile(GraphBreak(), backend=counting)
    if compiled_first:
        compiled(_x())
        assert len(counting.graphs) == 2
    for _ in range(torch._dynamo.config.recompile_limit + 2):
        report = attncc.explain(GraphBreak(), (_x(),), {"attention": "softmax"})
        assert report.graphs == 2 and report.count("rewritten") == 2
    compiled(_x())
    assert len(counting.graphs) == 2, "explain made an earlier torch.compile recompile"


def test_explain_does_not_touch_the_last_report():
    model, x = _two_layers(), _x()
    torch.compile(model, backend="attncc", options={"policy": {"attention": "softmax"}, "inner": "eager"})(x)
    before = attncc.last_report()
    attncc.explain(_two_layers(), (_x(),), {"attention": "keep"})
    assert attncc.last_report().to_json() == before.to_json()


def test_explain_with_attnres_does_not_add_parameters():
    model, args, kwargs, _ = zoo.gpt2("sdpa", layers=3)
    model.eval()
    keys = list(model.state_dict())
    parameters = [id(p) for p in model.parameters()]
    report = attncc.explain(model, args, ATTNRES, example_kwargs=kwargs)
    assert report.count("rewritten", kind="residual") > 0
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == parameters
    assert not hasattr(model, "attncc_attnres")
    assert attncc.parameters(model) == []


def test_explain_leaves_training_buffers_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(T), TwoLayers()).train()
    running = model[0].running_mean.clone()
    attncc.explain(model, (_x(),), {"attention": "softmax"})
    assert torch.equal(model[0].running_mean, running)


# --- 3. verify: tolerance by the original dtype, relative to the output's scale ------------------------------


@pytest.mark.parametrize("dtype, magnitude, relative, caught", [
    pytest.param(torch.bfloat16, 1.0, 1e-2, False, id="bf16-1pct-within-bf16-tolerance"),
    pytest.param(torch.bfloat16, 1e-3, 1e-2, False, id="bf16-small-1pct-within-bf16-tolerance"),
    pytest.param(torch.float16, 1.0, 1e-2, False, id="fp16-1pct-within-fp16-tolerance"),
    pytest.param(torch.float32, 1.0, 1e-2, True, id="fp32-1pct-caught"),
    pytest.param(torch.float32, 1e-3, 1e-2, True, id="fp32-small-1pct-caught"),
    pytest.param(torch.float32, 1.0, 1e-6, False, id="fp32-rounding-passes"),
    pytest.param(torch.float32, 1e3, 1e-6, False, id="fp32-large-rounding-passes"),
    pytest.param(torch.bfloat16, 1e-3, 0.5, True, id="bf16-small-50pct-caught"),
    pytest.param(torch.float32, 1e-5, 0.5, True, id="fp32-tiny-50pct-caught"),
    pytest.param(torch.float32, 1e-7, 0.5, False, id="fp32-below-the-absolute-floor"),
])
def test_compare_tolerance(dtype, magnitude, relative, caught):
    report = attncc.Report()
    expected = (magnitude * torch.linspace(0.5, 1.0, 64)).to(dtype)
    out = (expected.double() * (1 + relative)).to(dtype)
    if caught:
        with pytest.raises(attncc.VerificationError, match="differs from the original graph"):
            attncc.compiler._compare(out, expected, report)
    else:
        attncc.compiler._compare(out, expected, report)


def test_verify_catches_a_wrong_rewrite_of_a_small_output(monkeypatch):
    from attncc.codegen.variants.softmax import SoftmaxVariant

    correct = SoftmaxVariant.run

    def run(*args):
        return correct(*args) * 1.5

    monkeypatch.setattr(SoftmaxVariant, "run", run)
    model, x = _two_layers(), _x(scale=1e-3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e-2)
    compiled = torch.compile(model, backend=attncc.backend({"attention": "softmax"}, inner="eager", verify=True))
    with pytest.raises(attncc.VerificationError, match="differs from the original graph"):
        compiled(x)


def test_verify_passes_a_correct_bf16_rewrite():
    model, x = _two_layers(), _x()
    model = model.to(torch.bfloat16)
    compiled = torch.compile(model, backend=attncc.backend({"attention": "softmax"}, inner="eager", verify=True))
    compiled(x.to(torch.bfloat16))


# --- 4. strict options and policies -------------------------------------------------------------------------


DUPLICATES = {
    "top-level": ("version: 1\nname: a\nname: b\n", "name"),
    "nested": ("attention:\n  default: keep\n  default: softmax\n", "default"),
    "in-a-rule": ("attention:\n  rules:\n    - where: {layers: '0'}\n      use: keep\n      use: softmax\n", "use"),
}


@pytest.mark.parametrize("text, key", DUPLICATES.values(), ids=DUPLICATES.keys())
@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_duplicate_yaml_keys_are_an_error(tmp_path, text, key, suffix):
    path = tmp_path / f"policy{suffix}"
    path.write_text(text)
    with pytest.raises(PolicyError, match=f"duplicate key '{key}'") as excinfo:
        load_policy(path)
    assert str(path) in str(excinfo.value)


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent("""\
        attention:
          default: &relu {variant: linear, feature_map: relu}
          rules:
            - where: {layers: "0"}
              use:
                <<: *relu
                feature_map: elu1
        """))
    policy = load_policy(path)
    assert policy.attention.default.feature_map == "relu"
    assert policy.attention.rules[0].use.feature_map == "elu1"


def test_duplicate_json_keys_are_an_error(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text('{"version": 1, "attention": "keep", "attention": "softmax"}')
    with pytest.raises(PolicyError, match="duplicate key 'attention'") as excinfo:
        load_policy(path)
    assert str(path) in str(excinfo.value)


NOT_BOOLS = [("verify", "no"), ("verify", "false"), ("debug", "false"), ("debug", 1), ("verify", None)]


@pytest.mark.parametrize("key, value", NOT_BOOLS)
def test_bool_options_must_be_bools(key, value):
    with pytest.raises(ValueError, match=f"{key}={value!r}.*expected a bool"):
        attncc.backend({"attention": "keep"}, **{key: value})


@pytest.mark.parametrize("key, value", NOT_BOOLS[:3])
def test_bool_options_must_be_bools_by_name(key, value):
    compiled = torch.compile(_two_layers(), backend="attncc", options={"inner": "eager", key: value})
    with pytest.raises(Exception) as excinfo:
        compiled(_x())
    error = _inner_error(excinfo)
    assert isinstance(error, ValueError)
    assert f"{key}={value!r}" in str(error) and "expected a bool" in str(error)


HUGE = 10**30
INTEGER_PARAMS = {
    "window": {"variant": "sparse", "window": HUGE},
    "sinks": {"variant": "sparse", "sinks": HUGE},
    "block": {"variant": "sparse", "pattern": "power", "block": HUGE},
    "window_blocks": {"variant": "sparse", "pattern": "power", "window_blocks": HUGE},
    "query_heads": {"variant": "sqa", "query_heads": HUGE},
    "kv_heads": {"variant": "sqa", "kv_heads": HUGE},
}


@pytest.mark.parametrize("field, variant", INTEGER_PARAMS.items(), ids=INTEGER_PARAMS.keys())
def test_integer_params_are_bounded(field, variant):
    with pytest.raises(PolicyError, match=rf"attention\.{field}: must be <= 2147483647 \(2\*\*31-1\)"):
        load_policy({"attention": variant})
    load_policy({"attention": {**variant, field: 2**31 - 1}})


def test_residual_and_target_integers_are_bounded():
    with pytest.raises(PolicyError, match=r"residual\.block_size: must be <= 2147483647"):
        load_policy({"residual": {"variant": "attnres", "block_size": HUGE}})
    with pytest.raises(PolicyError, match=r"target\.max_seq_len: must be <= 2147483647"):
        load_policy({"target": {"max_seq_len": HUGE}})


def mask_mod_ok(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def mask_mod_two_args(q_idx, kv_idx):
    return q_idx >= kv_idx


def mask_mod_keyword_only(b, h, q_idx, *, kv_idx):
    return q_idx >= kv_idx


def mask_mod_varargs(*indices):
    return indices[2] >= indices[3]


@pytest.mark.parametrize("name", ["mask_mod_two_args", "mask_mod_keyword_only"])
def test_mask_with_a_wrong_signature(name):
    sparse = Sparse(pattern="block", mask=f"test_validation:{name}")
    with pytest.raises(PolicyError, match=rf"mask: mask 'test_validation:{name}' must have the signature "
                                          r"mask_mod\(b, h, q_idx, kv_idx\)"):
        sparse.load_mask(["test_validation"])


@pytest.mark.parametrize("name", ["mask_mod_ok", "mask_mod_varargs"])
def test_mask_with_a_good_signature(name):
    assert Sparse(pattern="block", mask=f"test_validation:{name}").load_mask(["test_validation"]) is globals()[name]


def test_mask_with_a_wrong_signature_fails_when_the_backend_is_built():
    policy = {"attention": {"variant": "sparse", "pattern": "block", "mask": "test_validation:mask_mod_two_args"}}
    with pytest.raises(PolicyError, match=r"attention.default.mask: .*mask_mod\(b, h, q_idx, kv_idx\)"):
        attncc.backend(policy, inner="eager", mask_modules=["test_validation"])


@pytest.mark.parametrize("allowed", [(), ("os",), ("test_valid",)], ids=["none", "another", "a-prefix-only"])
def test_a_policy_imports_mask_code_only_from_allowed_modules(allowed):
    """A policy is data: naming a function in it does not import anything the user did not allow."""
    policy = {"attention": {"variant": "sparse", "pattern": "block", "mask": "test_validation:mask_mod_ok"}}
    with pytest.raises(PolicyError, match=r"attention.default.mask: mask 'test_validation:mask_mod_ok' would import "
                                          r"module 'test_validation', which is not allowed.*mask_modules="):
        attncc.backend(policy, inner="eager", mask_modules=allowed)
    with pytest.raises(PolicyError, match="not allowed"):
        attncc.explain(_two_layers(), (_x(),), policy, mask_modules=allowed)


def test_an_allowed_block_mask_runs_end_to_end():
    policy = {"attention": {"variant": "sparse", "pattern": "block", "mask": "test_validation:mask_mod_ok"}}
    model, x = _two_layers(), _x()
    be = attncc.backend(policy, inner="aot_eager", mask_modules=["test_validation"])
    with torch.no_grad():
        out = torch.compile(model, backend=be)(x)
    assert be.report.count("rewritten") == 2
    # mask_mod_ok is the causal mask: the same as the model's own causal softmax attention
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)


# --- 5. kernels="triton" without a GPU needs the Triton interpreter ------------------------------------------


@pytest.mark.parametrize("interpret", [None, "0"])
def test_triton_kernels_on_cpu_need_the_interpreter(monkeypatch, interpret):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    with pytest.raises(ValueError, match="kernels='triton'.*no CUDA GPU.*TRITON_INTERPRET=1"):
        attncc.backend({"attention": "softmax"}, kernels="triton")
    compiled = torch.compile(_two_layers(), backend="attncc", options={"inner": "eager", "kernels": "triton"})
    with pytest.raises(Exception) as excinfo:
        compiled(_x())
    assert "TRITON_INTERPRET=1" in str(_inner_error(excinfo))


def test_triton_kernels_on_cpu_with_the_interpreter(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    attncc.backend({"attention": "softmax"}, kernels="triton")


# --- 6. the CLI: build() must return (model, example_args[, example_kwargs]) ------------------------------


BUILD_RETURNS = {
    "model-only": "return Model()",
    "one-tuple": "return (Model(),)",
    "too-long": "return Model(), (torch.randn(2, 5, 16),), {}, None",
    "kwargs-not-a-dict": "return Model(), (torch.randn(2, 5, 16),), [1]",
}


@pytest.mark.parametrize("body", BUILD_RETURNS.values(), ids=BUILD_RETURNS.keys())
def test_cli_build_returning_the_wrong_thing(tmp_path, capsys, body):
    build = tmp_path / "only_model.py"
    build.write_text(textwrap.dedent(f"""\
        import torch

        class Model(torch.nn.Module):
            def forward(self, x):
                return x

        def build():
            {body}
        """))
    policy = tmp_path / "policy.yaml"
    policy.write_text("attention: keep\n")
    assert main(["explain", f"{build}:build", "--policy", str(policy)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attncc: error:") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert "build() must return (model, example_args) or (model, example_args, example_kwargs)" in err
