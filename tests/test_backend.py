"""The torch.compile backend: construction, options, inner compilers, policies, verify, debug, reports."""

from __future__ import annotations

import warnings

import pytest
import torch

import attncc
import attncc.compiler
from attncc.passes.pipeline import PASSES
from spellings import B, C, T, GraphBreak, MatmulDiv, SdpaEnableGqa, TwoLayers

SOFTMAX = {"attention": "softmax"}
MIXED = {"name": "mixed", "attention": {"default": "softmax", "rules": [{"where": {"layers": "0"}, "use": "keep"}]}}


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, T, C, generator=torch.Generator().manual_seed(seed))


def _model(cls=TwoLayers):
    torch.manual_seed(0)
    return cls().eval()


def _inner_error(excinfo) -> BaseException:
    """What the backend raised: dynamo wraps backend errors in BackendCompilerFailed."""
    err = excinfo.value
    return getattr(err, "inner_exception", None) or err


@pytest.fixture
def backend_calls(monkeypatch):
    """Every Backend instance that compiles a graph, including those the entry point builds."""
    seen: list[attncc.Backend] = []
    original = attncc.compiler.Backend.__call__

    def spy(self, gm, example_inputs):
        seen.append(self)
        return original(self, gm, example_inputs)

    monkeypatch.setattr(attncc.compiler.Backend, "__call__", spy)
    return seen


# --- the backend as a callable, with each inner compiler --------------------------------------------


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_callable_backend_equals_eager(inner):
    model, x = _model(), _x()
    be = attncc.backend(SOFTMAX, inner=inner)
    out = torch.compile(model, backend=be)(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
    report = be.report
    assert report.graphs == 1
    assert [s.module for s in report.attention()] == ["layers.0", "layers.1"]
    assert [s.status for s in report.attention()] == ["rewritten", "rewritten"]
    assert be.options.inner == inner
    assert f"inner={inner!r}" in repr(be)


def test_callable_backend_with_inductor():
    model, x = _model(MatmulDiv), _x()
    be = attncc.backend(SOFTMAX, inner="inductor")
    out = torch.compile(model, backend=be)(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
    (site,) = be.report.attention()
    assert site.status == "rewritten" and site.variant == "softmax"


def test_mixed_policy_keeps_and_rewrites():
    model, x = _model(), _x()
    be = attncc.backend(MIXED, inner="eager")
    torch.testing.assert_close(torch.compile(model, backend=be)(x), model(x), rtol=1e-5, atol=1e-6)
    assert [(s.layer, s.variant, s.status) for s in be.report.attention()] == [
        (0, "keep", "kept"), (1, "softmax", "rewritten")]
    assert be.report.policy == "mixed"


# --- by name, through the torch_dynamo_backends entry point -----------------------------------------


def test_registered_by_name(backend_calls):
    from importlib.metadata import entry_points

    (ep,) = [ep for ep in entry_points(group="torch_dynamo_backends") if ep.name == "attncc"]
    assert ep.load() is attncc.compiler.registered_backend

    model, x = _model(), _x()
    compiled = torch.compile(model, backend="attncc", options={"policy": MIXED, "inner": "aot_eager"})
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    (be,) = backend_calls
    assert be.options.inner == "aot_eager"
    assert be.policy.name == "mixed"
    assert [s.status for s in be.report.attention()] == ["kept", "rewritten"]


def test_unknown_option_rejected_by_backend():
    with pytest.raises(ValueError, match="unknown attncc option") as excinfo:
        attncc.backend(SOFTMAX, bogus=1)
    message = str(excinfo.value)
    assert "'bogus'" in message
    for key in ("inner", "kernels", "verify", "debug"):
        assert key in message


def test_unknown_option_rejected_by_name():
    model, x = _model(MatmulDiv), _x()
    compiled = torch.compile(model, backend="attncc", options={"bogus": 1, "inner": "eager"})
    with pytest.raises(Exception) as excinfo:
        compiled(x)
    assert isinstance(_inner_error(excinfo), ValueError)
    message = str(excinfo.value)
    assert "unknown attncc option(s) 'bogus'" in message
    assert "valid keys: policy, inner, kernels, verify, debug" in message


# --- policy sources ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".yaml", ".toml", ".json"])
def test_policy_from_file(tmp_path, suffix):
    path = tmp_path / f"policy{suffix}"
    attncc.dump_policy(attncc.load_policy(MIXED), path)
    model, x = _model(), _x()
    be = attncc.backend(str(path), inner="aot_eager")
    assert be.policy.source == str(path)
    torch.testing.assert_close(torch.compile(model, backend=be)(x), model(x), rtol=1e-5, atol=1e-6)
    assert be.report.policy == "mixed"
    assert [s.status for s in be.report.attention()] == ["kept", "rewritten"]


@pytest.mark.parametrize("form", ["dict", "policy"])
def test_policy_from_dict_and_object(form):
    policy = MIXED if form == "dict" else attncc.load_policy(MIXED)
    be = attncc.backend(policy, inner="aot_eager")
    if form == "policy":
        assert be.policy is policy
    model, x = _model(), _x()
    torch.testing.assert_close(torch.compile(model, backend=be)(x), model(x), rtol=1e-5, atol=1e-6)
    assert [s.status for s in be.report.attention()] == ["kept", "rewritten"]


def test_no_policy_keeps_everything():
    be = attncc.backend(inner="eager")
    model, x = _model(), _x()
    torch.testing.assert_close(torch.compile(model, backend=be)(x), model(x))
    assert [s.status for s in be.report.attention()] == ["kept", "kept"]


# --- bad options and bad policies ----------------------------------------------------------------------


def test_bad_inner():
    with pytest.raises(ValueError, match="inner='tvm'") as excinfo:
        attncc.backend(SOFTMAX, inner="tvm")
    assert "valid: inductor, aot_eager, eager" in str(excinfo.value)


def test_bad_kernels():
    with pytest.raises(ValueError, match="kernels='cuda'") as excinfo:
        attncc.backend(SOFTMAX, kernels="cuda")
    assert "valid: auto, triton, reference" in str(excinfo.value)


def test_bad_policy_fails_at_construction(monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before the policy was checked")

    monkeypatch.setattr(attncc.compiler, "run_pipeline", no_compile)
    with pytest.raises(attncc.PolicyError, match="did you mean 'linear'"):
        attncc.backend({"attention": "liner"}, inner="eager")
    with pytest.raises(attncc.PolicyError, match="did you mean 'linear'"):
        attncc.Backend({"attention": "liner"})


def test_rule_outside_the_model():
    """A graph only warns (the model may span graphs); explain, which sees the whole model, raises."""
    policy = {"attention": {"default": "softmax", "rules": [{"where": {"layers": "5"}, "use": "keep"}]}}
    be = attncc.backend(policy, inner="eager")
    with pytest.warns(UserWarning, match=r"attention\.rules\[0\]\.where\.layers: layer 5 is outside the model \(layers 0-1\)"):
        torch.compile(_model(), backend=be)(_x())
    with pytest.raises(attncc.PolicyError, match=r"attention\.rules\[0\]\.where\.layers: layer 5 is outside"):
        attncc.explain(_model(), (_x(),), policy)


def test_rule_matching_no_site():
    policy = {"attention": {"default": "softmax", "rules": [{"where": {"module": "decoder.*"}, "use": "keep"}]}}
    be = attncc.backend(policy, inner="eager")
    with pytest.warns(UserWarning, match=r"attention\.rules\[0\]: matches no attention site"):
        torch.compile(_model(), backend=be)(_x())
    with pytest.raises(attncc.PolicyError, match=r"matches no attention site.*layers\.0, layers\.1"):
        attncc.explain(_model(), (_x(),), policy)


# --- verify ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_verify_passes_on_a_correct_rewrite(inner):
    model, x = _model(), _x()
    be = attncc.backend(SOFTMAX, inner=inner, verify=True)
    compiled = torch.compile(model, backend=be)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled(_x(1)), model(_x(1)), rtol=1e-5, atol=1e-6)
    assert be.report.count("rewritten") == 2


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_verify_catches_a_wrong_rewrite(monkeypatch, inner):
    from attncc.codegen.variants.softmax import SoftmaxVariant

    correct = SoftmaxVariant.run

    def run(*args):
        return correct(*args) + 0.1

    monkeypatch.setattr(SoftmaxVariant, "run", run)
    model, x = _model(), _x()
    be = attncc.backend(MIXED, inner=inner, verify=True)
    compiled = torch.compile(model, backend=be)
    with pytest.raises(attncc.VerificationError) as excinfo:
        compiled(x)
    message = str(excinfo.value)
    assert "differs from the original graph" in message
    assert "Rewritten sites: layers.1 (softmax)" in message
    assert "layers.0" not in message  # kept, not rewritten


def test_verify_without_rewrites_is_a_no_op():
    model, x = _model(), _x()
    be = attncc.backend({"attention": "keep"}, inner="eager", verify=True)
    torch.testing.assert_close(torch.compile(model, backend=be)(x), model(x))


# --- debug dumps -----------------------------------------------------------------------------------------


def _assert_dumps(directory, graphs: int = 1):
    names = {p.name for p in directory.iterdir()}
    for g in range(graphs):
        for index, p in enumerate(PASSES):
            for when in ("before", "after"):
                assert f"graph{g}_{index:02d}_{p.name}_{when}.txt" in names, sorted(names)
    last = len(PASSES) - 1
    rewrite = next(i for i, p in enumerate(PASSES) if p.name == "rewrite_attention")
    assert "attncc_softmax" not in (directory / f"graph0_{rewrite:02d}_rewrite_attention_before.txt").read_text()
    assert "attncc_softmax" in (directory / f"graph0_{rewrite:02d}_rewrite_attention_after.txt").read_text()
    assert (directory / f"graph0_{last:02d}_{PASSES[last].name}_after.txt").read_text().strip()


def test_debug_option_dumps_every_pass(tmp_path, monkeypatch):
    monkeypatch.delenv("ATTNCC_DEBUG", raising=False)
    monkeypatch.setenv("ATTNCC_DEBUG_DIR", str(tmp_path / "dumps"))
    model, x = _model(), _x()
    torch.compile(model, backend=attncc.backend(SOFTMAX, inner="eager", debug=True))(x)
    _assert_dumps(tmp_path / "dumps")


def test_debug_default_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("ATTNCC_DEBUG", raising=False)
    monkeypatch.delenv("ATTNCC_DEBUG_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    torch.compile(_model(), backend=attncc.backend(SOFTMAX, inner="eager", debug=True))(_x())
    _assert_dumps(tmp_path / "attncc_debug")


def test_debug_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCC_DEBUG", "1")
    monkeypatch.setenv("ATTNCC_DEBUG_DIR", str(tmp_path))
    torch.compile(_model(), backend=attncc.backend(SOFTMAX, inner="eager"))(_x())
    _assert_dumps(tmp_path)


def test_no_dumps_without_debug(tmp_path, monkeypatch):
    monkeypatch.delenv("ATTNCC_DEBUG", raising=False)
    monkeypatch.setenv("ATTNCC_DEBUG_DIR", str(tmp_path / "dumps"))
    torch.compile(_model(), backend=attncc.backend(SOFTMAX, inner="eager"))(_x())
    assert not (tmp_path / "dumps").exists()


# --- kernels --------------------------------------------------------------------------------------------


def test_reference_kernels_on_cpu():
    model, x = _model(SdpaEnableGqa), _x()
    be = attncc.backend(SOFTMAX, inner="aot_eager", kernels="reference")
    torch.testing.assert_close(torch.compile(model, backend=be)(x), model(x), rtol=1e-5, atol=1e-6)
    (site,) = be.report.attention()
    assert site.status == "rewritten"
    assert site.kernel == "reference"
    assert "[kernel reference]" in str(be.report)


# --- reports over several graphs -------------------------------------------------------------------------


def test_report_merges_graphs():
    model, x = _model(GraphBreak), _x()
    be = attncc.backend(SOFTMAX, inner="aot_eager")
    torch.testing.assert_close(torch.compile(model, backend=be)(x), model(x), rtol=1e-5, atol=1e-6)
    assert len(be.reports) == 2
    report = be.report
    assert report.graphs == 2
    sites = report.attention()
    assert [(s.module, s.layer, s.graph, s.mask, s.status) for s in sites] == [
        ("layers.0", 0, 0, "causal", "rewritten"),
        ("layers.1", 1, 1, "none", "rewritten"),
    ]
    assert report.count("rewritten", kind="attention") == 2
    assert sum(r.pattern_hits.get("softmax_attention", 0) for r in be.reports) == 2
    assert report.pattern_hits.get("softmax_attention") == 2
    assert "in 2 graph(s)" in str(report)


def test_layer_rule_across_a_graph_break():
    model, x = _model(GraphBreak), _x()
    be = attncc.backend(MIXED, inner="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each graph alone sees only one of the layers
        torch.compile(model, backend=be)(x)
    assert [s.status for s in be.report.attention()] == ["kept", "rewritten"]


def test_no_attention_warns():
    from spellings import ClassifierHead

    model, x = _model(ClassifierHead), _x()
    be = attncc.backend(SOFTMAX, inner="eager")
    with pytest.warns(UserWarning, match="found no attention"):
        torch.compile(model, backend=be)(x)
    assert be.report.attention() == []
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*found no attention")  # a keep policy wants nothing
        torch._dynamo.reset()
        torch.compile(model, backend=attncc.backend({"attention": "keep"}, inner="eager"))(x)


def test_verify_skips_variants_that_change_the_function():
    model, x = _model(), _x()
    be = attncc.backend({"attention": {"variant": "linear"}}, inner="eager", verify=True)
    with pytest.warns(UserWarning, match="only checks function-preserving rewrites; this graph also has linear"):
        torch.compile(model, backend=be)(x)
    assert be.report.count("rewritten") == 2


def test_recompile_keeps_every_graph_and_by_name_report_is_reachable():
    model = _model()
    be = attncc.backend(SOFTMAX, inner="eager")
    compiled = torch.compile(model, backend=be)
    compiled(_x())
    compiled(torch.randn(B, T + 3, C))  # a new length: dynamo recompiles the same frame
    compiled(_x())  # ... and the first graph still runs for the first length
    assert len(be.reports) == 2 and be.report.graphs == 2
    assert [(s.graph, s.status) for s in be.report.attention()] == [(0, "rewritten")] * 2 + [(1, "rewritten")] * 2
    torch._dynamo.reset()
    torch.compile(model, backend="attncc", options={"policy": SOFTMAX, "inner": "eager"})(_x())
    assert attncc.last_report().count("rewritten") == 2
