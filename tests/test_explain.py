"""attncc.explain and the command line: what attncc finds in a model and what a policy does to each site."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

import attncc
from attncc.cli import main
from models import zoo

DOCUMENTED = ("kind", "module", "layer", "pattern", "heads", "kv_heads", "head_dim", "causal", "mask",
              "variant", "params", "status", "reason")
LINEAR = {"variant": "linear", "feature_map": "relu"}
MIXED = {"name": "mixed", "attention": {"default": LINEAR, "rules": [{"where": {"layers": "0"}, "use": "keep"}]}}


def _expected_params() -> dict:
    return attncc.load_policy(MIXED).attention.default.params()


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def gpt2_report(request):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, args, kwargs, layers = zoo.gpt2(request.param)
    assert layers == 2
    return request.param, attncc.explain(model.eval(), args, MIXED, example_kwargs=kwargs)


def test_sites_have_the_documented_fields(gpt2_report):
    impl, report = gpt2_report
    sites = report.attention()
    assert len(sites) == 2
    pattern = "softmax_attention" if impl == "eager" else "sdpa_attention"
    for layer, site in enumerate(sites):
        assert site.kind == "attention"
        assert site.module == f"h.{layer}.attn"
        assert site.layer == layer
        assert site.pattern == pattern
        assert (site.heads, site.kv_heads, site.head_dim) == (4, 4, 8)
        assert site.causal is True
        assert site.mask == "causal"
    kept, rewritten = sites
    assert (kept.variant, kept.params, kept.status, kept.reason) == ("keep", {}, "kept", "policy: keep")
    assert (rewritten.variant, rewritten.params, rewritten.status) == ("linear", _expected_params(), "rewritten")
    assert rewritten.params["feature_map"] == "relu"
    assert rewritten.kernel == "reference" and kept.kernel is None
    assert report.policy == "mixed" and report.graphs == 1
    assert report.count("rewritten", kind="attention") == 1 and report.count("kept", kind="attention") == 1


def test_report_json(gpt2_report):
    _, report = gpt2_report
    data = json.loads(report.to_json())
    assert data["policy"] == "mixed" and data["graphs"] == 1
    assert len(data["sites"]) == len(report.sites)
    for row, site in zip(data["sites"], report.sites):
        for key in DOCUMENTED:
            assert key in row, key
            assert row[key] == getattr(site, key), key
    rows = [row for row in data["sites"] if row["kind"] == "attention"]
    assert [(r["module"], r["layer"], r["status"], r["variant"]) for r in rows] == [
        ("h.0.attn", 0, "kept", "keep"), ("h.1.attn", 1, "rewritten", "linear")]
    assert rows[1]["params"] == _expected_params()
    assert json.loads(report.to_json(indent=2)) == data


def test_report_table(gpt2_report):
    _, report = gpt2_report
    lines = str(report).splitlines()
    header = lines[0].split()
    for column in ("graph", "kind", "module", "layer", "pattern", "H", "Hkv", "D", "causal", "mask", "variant", "status"):
        assert column in header
    rows = lines[1:-1]
    assert len(rows) == len(report.sites)
    for i, (row, site) in enumerate(zip(rows, report.sites)):
        cells = row.split()
        assert cells[:4] == [str(i), str(site.graph), site.kind, site.module]
        assert site.status in cells
    assert "h.0.attn" in rows[0] and "kept" in rows[0] and "policy: keep" in rows[0]
    assert "h.1.attn" in rows[1] and "rewritten" in rows[1] and "linear(feature_map=relu" in rows[1]
    assert lines[-1].startswith(f"{len(report.sites)} sites in 1 graph(s):")
    assert "1 rewritten" in lines[-1]
    assert report.table() == str(report)


def test_explain_does_not_need_a_list_of_args():
    from spellings import B, C, T, MatmulDiv

    (site,) = attncc.explain(MatmulDiv(), torch.randn(B, T, C), {"attention": "softmax"}).attention()
    assert (site.layer, site.status, site.mask, site.causal) == (0, "rewritten", "none", False)


def test_no_attention():
    from spellings import B, C, T, MoeRouter

    with pytest.raises(attncc.AttnccError, match="no attention found in MoeRouter"):
        attncc.explain(MoeRouter(), (torch.randn(B, T, C),))


def test_policy_errors_are_not_wrapped():
    model, args, kwargs, _ = zoo.gpt2("sdpa")
    policy = {"attention": {"default": "softmax", "rules": [{"where": {"layers": "2-3"}, "use": "keep"}]}}
    with pytest.raises(attncc.PolicyError, match=r"rules\[0\]\.where\.layers: layer 3 is outside the model"):
        attncc.explain(model, args, policy, example_kwargs=kwargs)


# --- the command line ------------------------------------------------------------------------------------

BUILD = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(b, t, c))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Attention(), Attention(), Attention()])

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def build():
    torch.manual_seed(0)
    return Model().eval(), (torch.randn(2, 5, 16),)
'''

POLICY = """
version: 1
name: cli-test
attention:
  default: softmax
  rules:
    - where: {layers: "0"}
      use: keep
"""


@pytest.fixture
def build_file(tmp_path):
    path = tmp_path / "tiny_model.py"
    path.write_text(textwrap.dedent(BUILD))
    return path


@pytest.fixture
def policy_file(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def test_cli_explain_json(build_file, policy_file, capsys):
    assert main(["explain", f"{build_file}:build", "--policy", str(policy_file), "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["policy"] == "cli-test" and data["graphs"] == 1
    sites = [s for s in data["sites"] if s["kind"] == "attention"]
    assert [(s["module"], s["layer"], s["variant"], s["status"]) for s in sites] == [
        ("blocks.0", 0, "keep", "kept"), ("blocks.1", 1, "softmax", "rewritten"), ("blocks.2", 2, "softmax", "rewritten")]
    for s in sites:
        assert set(DOCUMENTED) <= set(s)
        assert (s["pattern"], s["heads"], s["kv_heads"], s["head_dim"]) == ("sdpa_attention", 2, 2, 8)
        assert (s["causal"], s["mask"]) == (True, "causal")


def test_cli_explain_table(build_file, policy_file, capsys):
    # the function name defaults to build
    assert main(["explain", str(build_file), "--policy", str(policy_file)]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["#", "graph", "kind", "module"]
    for i in range(3):
        assert any(f"blocks.{i}" in line for line in lines[1:-1])
    assert "2 rewritten" in lines[-1] and "graph(s)" in lines[-1]


def test_cli_missing_policy_file(build_file, tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["explain", f"{build_file}:build", "--policy", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("attncc: error:")
    assert str(missing) in captured.err and "file not found" in captured.err


def test_cli_policy_typo(build_file, tmp_path, capsys):
    bad = tmp_path / "typo.yaml"
    bad.write_text("version: 1\nattention: liner\n")
    assert main(["explain", f"{build_file}:build", "--policy", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "attncc: error:" in err and "did you mean 'linear'" in err


def test_cli_rule_outside_the_model(build_file, tmp_path, capsys):
    bad = tmp_path / "far.yaml"
    bad.write_text("attention:\n  default: softmax\n  rules:\n    - {where: {layers: '7'}, use: keep}\n")
    assert main(["explain", f"{build_file}:build", "--policy", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "attncc: error:" in err and "layer 7 is outside the model (layers 0-2)" in err
    assert "Traceback" not in err


def test_cli_bad_target(tmp_path, policy_file, build_file, capsys):
    assert main(["explain", f"{tmp_path / 'missing.py'}:build", "--policy", str(policy_file)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["explain", f"{build_file}:make", "--policy", str(policy_file)]) == 2
    assert "has no function 'make'" in capsys.readouterr().err


def test_cli_demo_gpt2(capsys):
    assert main(["demo", "--model", "gpt2", "--inner", "eager"]) == 0
    out = capsys.readouterr().out
    assert "model: gpt2 (GPT2LMHeadModel" in out
    assert "policy: demo" in out
    for layer in range(4):
        assert f"transformer.h.{layer}.attn" in out
    assert "3 rewritten" in out
    (line,) = [line for line in out.splitlines() if "vs eager" in line]
    assert line.startswith("compiled (eager, first call")
    rel = float(line.rsplit("relative", 1)[1])
    assert rel < 1e-4


def test_cli_demo_converts_minilm(capsys):
    """The default demo: the pretrained MiniLM converted with the shipped convert.yaml, a few transfer
    steps, then its sites, the embeddings' quality against the original, and the time per batch."""
    assert main(["demo", "--steps", "2", "--inner", "aot_eager"]) == 0
    out = capsys.readouterr().out
    assert "model: minilm (BertModel" in out and "policy: convert-linear" in out
    assert "5 rewritten" in out and "attention transfer: 2 steps" in out
    after = [line for line in out.splitlines() if line.strip().startswith("after transfer:")]
    assert after and 0 < float(after[0].split("cosine ")[1].split(",")[0]) <= 1
    assert "time per batch of 48 sentences" in out
