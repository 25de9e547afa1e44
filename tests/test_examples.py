"""The example scripts run, and fine-tuning a converted model lowers its loss."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

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


def test_convert_minilm_transfer_lowers_the_layer_error():
    """The MiniLM recipe in a reduced form: a few transfer steps of the pretrained model converted to
    linear attention lower the per-layer error of its hidden states against the original; then two
    LoRA fine-tune steps run."""
    import sys

    sys.path.insert(0, str(EXAMPLES))  # the band policy's block mask lives in the example module
    try:
        result = _load("convert_minilm").run("linear", steps=6, train_sentences=16, eval_sentences=8,
                                             progress=False, finetune_steps=2)
    finally:
        sys.path.remove(str(EXAMPLES))
    conversion = result["result"]
    assert sum(conversion.transferred) < 0.9 * sum(result["layer_before"]), result
    assert 0 < result["before"][0] < 1 and 0 < result["after"][0] <= 1
    # the recipe's LoRA stage ran on BERT's attention projections, after the transfer
    assert len(conversion.finetune_losses) == 2 and conversion.lora_targets, conversion
    assert all(name.endswith(("query", "value")) for name in conversion.lora_targets), conversion.lora_targets


def test_convert_cli_saves_a_model_that_loads_back(tmp_path, capsys):
    """attncc convert transfers, fine-tunes (LoRA, with AttnRes), reports and saves; load_converted puts the same
    weights into a fresh model."""
    import torch
    import yaml

    policy = tmp_path / "p.yaml"
    policy.write_text(yaml.safe_dump({"attention": {"default": {"variant": "linear"}}, "residual": "attnres"}))
    out = tmp_path / "out"
    assert attncc.cli.main(["convert", f"{EXAMPLES / 'tiny_models.py'}:llama_batches", "--policy", str(policy),
                            "--steps", "3", "--finetune-steps", "2", "--lora-rank", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| mean |" in text and (out / "report.md").read_text().startswith("# attncc convert")
    assert "2 LoRA fine-tune steps (rank 2, 8 modules, merged)" in text  # q_proj, v_proj of 4 layers
    for picture in ("layers.png", "losses.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({picture})" in text
    trained, batches = _load("tiny_models").llama_batches()
    fresh, _ = _load("tiny_models").llama_batches()
    import safetensors.torch

    saved = safetensors.torch.load_file(str(out / "model.safetensors"))
    assert any(k.startswith("attncc_attnres.") for k in saved)
    attncc.load_converted(fresh, out, example_kwargs=batches[0])
    state = fresh.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert not torch.equal(state["model.layers.0.self_attn.q_proj.weight"],
                           trained.state_dict()["model.layers.0.self_attn.q_proj.weight"])  # it trained


def test_convert_trains_only_the_rewritten_attention_and_restores_requires_grad():
    import torch

    model, batches = _load("tiny_models").llama_batches()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    policy = {"attention": {"default": {"variant": "linear"}, "rules": [{"where": {"layers": "0"}, "use": "keep"}]}}
    result = attncc.convert(model, policy, batches[1:], held_out=batches[0], steps=2, progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed == set(result.trained)
    assert all(n.startswith(("model.layers.1.", "model.layers.2.", "model.layers.3.")) and ".self_attn." in n
               for n in changed)
    assert all(p.requires_grad for p in model.parameters())


def test_lora_fine_tune_with_the_model_loss_merges_into_the_weights():
    """finetune_steps > 0: peft's LoRA on the model type's default modules (Llama: q_proj, v_proj), trained on
    the model's own loss (the batches carry labels), merged at the end: the same state_dict keys, layer 0
    (kept softmax, not transferred) has a changed v_proj, and the loss goes down on a repeated batch."""
    import torch

    model, batches = _load("tiny_models").llama_batches()
    keys = set(model.state_dict())
    v0 = model.model.layers[0].self_attn.v_proj.weight.detach().clone()
    train = [dict(batches[1], labels=batches[1]["input_ids"])]
    policy = {"attention": {"default": {"variant": "linear"}, "rules": [{"where": {"layers": "0"}, "use": "keep"}]}}
    result = attncc.convert(model, policy, train, held_out=batches[0], steps=1, progress=False, finetune_steps=6,
                            lora_rank=4, finetune_lr=1e-2)
    assert "model.layers.0.self_attn.v_proj" in result.lora_targets and len(result.finetune_losses) == 6
    assert 3 < result.finetune_losses[0] < 8  # next-token cross-entropy over 256 tokens
    assert result.finetune_losses[-1] < result.finetune_losses[0]
    assert set(model.state_dict()) == keys and not hasattr(model.model.layers[0].self_attn.v_proj, "lora_A")
    assert not torch.equal(model.model.layers[0].self_attn.v_proj.weight, v0)
    assert len(result.transferred) == len(result.after) == 4 and "after fine-tune" in result.table()
    assert all(p.requires_grad for p in model.parameters())


def test_lora_fine_tune_distills_the_last_layer_without_labels():
    model, batches = _load("tiny_models").llama_batches()
    result = attncc.convert(model, {"attention": "linear"}, batches[1:2], held_out=batches[0], steps=1,
                            progress=False, finetune_steps=5, lora_targets=["o_proj"], finetune_lr=1e-2)
    assert result.lora_targets == [f"model.layers.{i}.self_attn.o_proj" for i in range(4)]
    assert result.finetune_losses[-1] < result.finetune_losses[0]  # the relative error of the last layer


def test_lora_fine_tune_names_modules_it_cannot_find():
    model, batches = _load("tiny_models").llama_batches()
    with pytest.raises(attncc.AttnccError, match="lora_targets"):
        attncc.convert(model, {"attention": "linear"}, batches[1:2], held_out=batches[0], steps=1, progress=False,
                       finetune_steps=1, lora_targets=["no_such_proj"])
    assert all(p.requires_grad for p in model.parameters())


def test_lora_fine_tune_of_sqa_adapts_the_mlp_and_refuses_adapters_that_undo_the_rewrite():
    """SQA reshapes W_Q and W_O by head: LoRA on q_proj/v_proj hides that structure, so the fine-tune's
    graph would keep the original attention. By default an SQA conversion adapts the Linear modules
    outside the attention (every site stays rewritten); asked for q_proj and v_proj, convert raises."""
    import torch

    model, batches = _load("tiny_models").llama_batches()
    result = attncc.convert(model, {"attention": "sqa"}, batches[1:2], held_out=batches[0], steps=1, progress=False,
                            finetune_steps=2, lora_rank=2)
    assert result.lora_targets and not any(".self_attn." in name or "lm_head" in name for name in result.lora_targets)
    assert any(name.endswith("mlp.down_proj") for name in result.lora_targets)
    torch._dynamo.reset()
    model, batches = _load("tiny_models").llama_batches()
    with pytest.raises(attncc.AttnccError, match="leaves 4 site.*unchanged.*pass lora_targets outside the attention"):
        attncc.convert(model, {"attention": "sqa"}, batches[1:2], held_out=batches[0], steps=1, progress=False,
                       finetune_steps=1, lora_targets=["q_proj", "v_proj"])


def test_convert_resumes_from_its_checkpoint(tmp_path):
    """Interrupted in the transfer, then in the fine-tune, and resumed each time from the checkpoint: the
    same losses and weights as one uninterrupted run."""
    import torch

    def run(steps, checkpoint, finetune):
        torch._dynamo.reset()  # as a new process would start (and under dynamo's recompile limit)
        model, batches = _load("tiny_models").llama_batches()
        result = attncc.convert(model, {"attention": "linear"}, batches[1:], held_out=batches[0], steps=steps,
                                progress=False, checkpoint=checkpoint, checkpoint_every=1, finetune_steps=finetune,
                                lora_rank=2, finetune_lr=1e-3)
        return model, result

    whole_model, whole = run(3, None, 2)
    run(2, tmp_path, 0)  # stopped after 2 of 3 transfer steps
    run(3, tmp_path, 1)  # resumes the transfer, then stops after 1 of 2 fine-tune steps
    model, resumed = run(3, tmp_path, 2)
    assert resumed.losses == whole.losses and resumed.finetune_losses == whole.finetune_losses
    assert resumed.before == whole.before and resumed.after == pytest.approx(whole.after, rel=1e-6)
    expected = whole_model.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in model.state_dict().items())
    with pytest.raises(attncc.AttnccError, match="from the LoRA fine-tune"):
        run(3, tmp_path, 0)


def test_convert_refuses_to_train_past_the_recompile_limit():
    """Past the limit dynamo would run the model without attncc: convert raises instead. (The limit is set
    with config.patch: monkeypatch's undo hides a torch config entry for the rest of the process.)"""
    import torch

    model, batches = _load("tiny_models").llama_batches()
    limit = torch._dynamo.config.recompile_limit
    with torch._dynamo.config.patch(recompile_limit=1), pytest.raises(attncc.AttnccError, match="recompile limit"):
        attncc.convert(model, {"attention": "linear"}, batches[1:], held_out=batches[0], steps=1, progress=False)
    assert torch._dynamo.config.recompile_limit == limit


def test_conversion_plots_are_pictures_of_its_numbers(tmp_path):
    from attncc.convert import Conversion

    result = Conversion(before=[0.4, 0.5], after=[0.1, 0.2], losses=[0.5, 0.3, 0.2], transferred=[0.2, 0.3],
                        finetune_losses=[0.25, 0.2])
    paths = result.save_plots(tmp_path)
    assert [p.name for p in paths] == ["layers.png", "losses.png"]
    from PIL import Image

    for path in paths:
        image = Image.open(path)
        assert image.size == (600, 320) and len(set(image.convert("RGB").getdata())) > 10  # drawn, not blank


def test_convert_lm_recipe_trains_converts_and_reports(tmp_path):
    """The decoder LM recipe in a reduced CPU form: a tiny byte-level Llama pretrained for 60 steps on the
    standard library's source, converted to linear attention and to Block AttnRes (3 transfer steps, then the
    transfer resumed from its checkpoint into 2 LoRA steps); the report's table, JSON and pictures."""
    import json
    import math

    report = tmp_path / "lm.md"
    rows = _load("convert_lm").main([
        "--size", "tiny", "--train-steps", "60", "--seq", "64", "--batch", "16", "--variants", "linear", "attnres",
        "--steps", "3", "--finetune-steps", "2", "--lr", "1e-4", "--transfer-batch", "4", "--eval-sequences", "8",
        "--eval-batch", "8", "--prefill-len", "64", "--inner", "eager", "--convert-inner", "eager", "--no-progress",
        "--report", str(report)])
    assert [r["variant"] for r in rows] == ["original", "linear", "attnres"]
    original, linear, attnres = rows
    assert original["ppl_original"] < 256  # pretrained: better than a uniform guess over the bytes
    for r in (linear, attnres):
        assert all(math.isfinite(r[k]) for k in ("ppl_original", "ppl_transfer", "ppl_finetune", "prefill")), r
        transfer, result = r["transfer"], r["result"]
        # the second call resumed the finished transfer from its checkpoint, then fine-tuned
        assert result.losses == transfer.losses and len(result.finetune_losses) == 2
        assert result.transferred == pytest.approx(transfer.after, rel=1e-5)
    assert linear["sites"] == "2/2" and attnres["sites"] == "4/4"
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(linear["transfer"].after) < mean(linear["transfer"].before), linear["transfer"]
    assert max(attnres["transfer"].before) < 1e-5  # exact_start: the original model at init
    text = report.read_text()
    assert "| original |" in text and "| linear | 3 | 2 |" in text and "| attnres | 3 | 2 |" in text
    saved = json.loads(report.with_suffix(".json").read_text())
    assert [r["variant"] for r in saved["rows"]] == ["original", "linear", "attnres"]
    pictures = ["linear/layers.png", "linear/losses.png", "linear/attention.png", "attnres/layers.png",
                "attnres/losses.png", "attnres/depth_weights.png"]
    for picture in pictures:
        assert (tmp_path / "lm" / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"lm/{picture})" in text
