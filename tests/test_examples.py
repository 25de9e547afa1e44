"""The example scripts run, and fine-tuning a converted model lowers its loss."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import attncc.cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_converted_model_lowers_loss(capsys):
    first, last = _load("finetune").main(["--steps", "25"])
    assert last < 0.7 * first
    out = capsys.readouterr().out
    assert "linear" in out and "attnres" in out


def test_explain_cli_on_example_builders(capsys):
    policy = str(Path(attncc.cli.shipped_policy("demo.yaml")))
    for target in ("build", "llama"):
        assert attncc.cli.main(["explain", f"{EXAMPLES / 'tiny_models.py'}:{target}", "--policy", policy]) == 0
    out = capsys.readouterr().out
    assert out.count("rewritten") >= 2
