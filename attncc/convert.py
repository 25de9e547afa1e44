"""Convert a model with a policy, then transfer the original's function back: attention transfer.

    result = attncc.convert(model, "policy.yaml", batches, steps=200)
    print(result.table())
    attncc.save_converted(model, "policy.yaml", "out/")      # later: attncc.load_converted(model, "out/")

The steps, in order:

1. **Teacher.** A frozen copy of the original model, run eagerly.
2. **Student.** The model itself, compiled with the policy (`attncc.compile`). `explain` finds which
   attention sites the policy rewrites; what trains is what feeds the new variants: the parameters of
   those attention modules (the projections whose outputs the variant now reads, SQA's merged heads)
   and the parameters the policy adds (AttnRes queries and key norms, `attncc.parameters(model)`).
   Everything else is frozen. The variants' own math has no free parameters (fixed feature maps).
3. **Transfer.** On each batch, teacher and student run the same inputs; the loss is the relative
   squared error of every layer's output (forward hooks on the module list holding the attention
   sites, so the stream stays in one graph, as AttnRes needs), at real tokens (the batch's
   `attention_mask`), averaged over layers: layer by layer, the student learns to reproduce the
   teacher. AdamW, a fixed seed (deterministic on the CPU), a tqdm bar with loss and tokens/s.
4. **Fine-tune (optional, `finetune_steps > 0`).** A low-rank fine-tune of the whole model with peft's
   LoRA (rank `lora_rank` on `lora_targets`, by default peft's choice for the model type, e.g. q_proj
   and v_proj for Llama), the AttnRes parameters trained beside it. The objective is the model's own
   loss when the batches carry `labels` (next-token cross-entropy for a causal LM), else the relative
   error of the last layer's output against the teacher. The adapters are merged into the weights at
   the end, so the model keeps its class and its state_dict keys.
5. **Measure.** The per-layer error on a held-out batch before, after the transfer and at the end
   (`Conversion.table()`).
6. **Save.** `save_converted` writes the model's state (safetensors, AttnRes parameters included)
   and the policy; `load_converted` puts them back into a model of the same class.

"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from attncc.attnres import compile as attncc_compile
from attncc.attnres import parameters as attnres_parameters
from attncc.attnres import prepare
from attncc.compiler import Backend
from attncc.errors import AttnccError
from attncc.explain import explain
from attncc.policy import dump_policy, load_policy

STATE_FILE, POLICY_FILE = "model.safetensors", "policy.yaml"


@dataclass
class Conversion:
    """What a conversion did: the per-layer relative error on the held-out batch before, after the
    transfer (`transferred`) and at the end (`after`: after the fine-tune when there was one)."""

    before: list[float]
    after: list[float]
    losses: list[float] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)  # names of the parameters the transfer trained
    seconds: float = 0.0
    transferred: list[float] = field(default_factory=list)
    finetune_losses: list[float] = field(default_factory=list)
    lora_targets: list[str] = field(default_factory=list)  # the modules LoRA adapted (then merged)

    def table(self) -> str:
        columns = [("error before", self.before)]
        if self.finetune_losses:
            columns += [("after transfer", self.transferred), ("after fine-tune", self.after)]
        else:
            columns += [("error after", self.after)]
        lines = ["| layer | " + " | ".join(name for name, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for i, row in enumerate(zip(*(values for _, values in columns))):
            lines.append(f"| {i + 1} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
        mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
        lines.append("| mean | " + " | ".join(f"{mean(values):.4f}" for _, values in columns) + " |")
        return "\n".join(lines)


def convert(model: nn.Module, policy: Any, batches: Iterable[Mapping[str, torch.Tensor]], *, steps: int,
            held_out: Mapping[str, torch.Tensor] | None = None, lr: float = 1e-3, seed: int = 0,
            inner: str = "aot_eager", progress: bool = True, mask_modules: tuple[str, ...] = (),
            finetune_steps: int = 0, lora_rank: int = 8, lora_targets: list[str] | None = None,
            finetune_lr: float = 1e-4) -> Conversion:
    """Attention transfer, then the optional LoRA fine-tune (the module docstring's steps 1-5). `batches` yields keyword inputs of the
    model (input_ids, attention_mask, ...), cycled until `steps`; `held_out` (default: the first batch)
    measures the per-layer error before and after. The model is changed in place: it is the student.
    `mask_modules`: the modules a policy's block masks may be imported from (as for attncc.backend).
    Afterwards the model's parameters want gradients as they did before (the freezing is for the training)."""
    torch.manual_seed(seed)
    batches = list(batches)
    if not batches:
        raise AttnccError("attncc.convert needs at least one batch of inputs")
    held_out = dict(held_out or batches[0])
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    policy = load_policy(policy)
    report = explain(model, (), policy, dict(held_out), mask_modules=mask_modules)
    modules = sorted({s.module for s in report.attention() if s.status == "rewritten"})
    if not modules and policy.residual.variant == "keep":
        raise AttnccError("attncc.convert: the policy rewrites no attention site and no residual stream of this "
                          f"model, so there is nothing to transfer:\n{report}")
    prepare(model, policy, (), dict(held_out))
    wanted = [(p, p.requires_grad) for p in model.parameters()]
    trained = _train_only(model, modules)
    layers = _layer_list([s.module for s in report.attention()])
    backend = Backend(policy, inner=inner, mask_modules=mask_modules)
    student = LayerOutputs(attncc_compile(model, backend), model, layers)
    teacher = LayerOutputs(teacher, teacher, layers)
    try:
        result = _transfer(model, student, teacher, batches, held_out, trained, steps, lr, progress)
        student.remove()
        if finetune_steps > 0:
            backend = Backend(policy, inner=inner, mask_modules=mask_modules)
            result.transferred = result.after
            result.finetune_losses, result.lora_targets = _finetune(
                model, backend, layers, teacher, batches, finetune_steps, finetune_lr, lora_rank, lora_targets,
                progress)
            student = LayerOutputs(attncc_compile(model, backend), model, layers)
            result.after = layer_errors(student, teacher, held_out)
        return result
    finally:
        student.remove()
        for p, flag in wanted:
            p.requires_grad_(flag)


def _transfer(model, student, teacher, batches, held_out, trained, steps, lr, progress) -> Conversion:
    from tqdm.auto import tqdm

    before = layer_errors(student, teacher, held_out)
    optimizer = torch.optim.AdamW([p for _, p in trained], lr=lr, weight_decay=0.0)
    losses: list[float] = []
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="attention transfer", disable=not progress)
    tokens = 0
    for step in bar:
        batch = batches[step % len(batches)]
        loss = _transfer_loss(student, teacher, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        tokens += int(_real(batch).sum())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
    model.eval()
    after = layer_errors(student, teacher, held_out)
    return Conversion(before, after, losses, [name for name, _ in trained], time.perf_counter() - start)


def _finetune(model, backend, layers, teacher, batches, steps, lr, rank, targets, progress):
    """Step 4: LoRA adapters (peft) on `targets`, trained with the AttnRes parameters, then merged into the
    weights. Returns the losses and the names of the adapted modules."""
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    added = attnres_parameters(model)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets)
    try:
        adapted = get_peft_model(model, config)
    except ValueError as e:
        raise AttnccError(f"attncc.convert: the LoRA fine-tune cannot choose its modules ({e}); pass lora_targets "
                          "(the names of Linear modules, e.g. ['q_proj', 'v_proj'])") from e
    for p in added:
        p.requires_grad_(True)
    names = sorted(getattr(adapted.base_model, "targeted_module_names", []))
    student = LayerOutputs(attncc_compile(model, backend), model, layers)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses: list[float] = []
    model.train()
    start, tokens = time.perf_counter(), 0
    try:
        bar = tqdm(range(steps), desc="LoRA fine-tune", disable=not progress)
        for step in bar:
            batch = batches[step % len(batches)]
            outputs = student(batch)
            if "labels" in batch:
                loss = student.result.loss
            else:
                with torch.no_grad():
                    target = teacher(batch)[-1:]
                loss = _relative_errors(outputs[-1:], target, _real(batch))[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            tokens += int(_real(batch).sum())
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
    finally:
        student.remove()
        model.eval()
        adapted.merge_and_unload()
    return losses, names


def _train_only(model: nn.Module, modules: list[str]) -> list[tuple[str, nn.Parameter]]:
    """Freeze the model except the rewritten attention modules and the policy's own parameters."""
    model.requires_grad_(False)
    prefixes = tuple(m + "." for m in modules)
    added = {id(p) for p in attnres_parameters(model)}
    trained = [(n, p) for n, p in model.named_parameters() if n.startswith(prefixes) or id(p) in added]
    for _, p in trained:
        p.requires_grad_(True)
    if not trained:
        raise AttnccError("attncc.convert: the rewritten sites have no parameters to train")
    return trained


def _layer_list(modules: list[str]) -> str:
    """The path of the module list holding the attention sites (model.layers, encoder.layer, ...)."""
    for module in modules:
        parts = module.split(".")
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if index is not None:
            return ".".join(parts[:index])
    raise AttnccError("attncc.convert matches the original layer by layer, but no attention site's module path "
                      f"has a layer index (sites: {', '.join(modules) or 'none'})")


class LayerOutputs:
    """Calls `fn` and returns the outputs of the layers of `owner.<path>` (forward hooks, removed by `remove`)."""

    def __init__(self, fn: Any, owner: nn.Module, path: str):
        self.fn, outputs = fn, []
        self.outputs = outputs

        def keep(module, args, out):
            outputs.append(out[0] if isinstance(out, (tuple, list)) else out)

        self.handles = [layer.register_forward_hook(keep) for layer in owner.get_submodule(path)]

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The layers' outputs; what `fn` returned is kept as `self.result`."""
        self.outputs.clear()
        self.result = self.fn(**batch)
        outputs = list(self.outputs)
        self.outputs.clear()
        return outputs

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _real(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[B, T] weights of the real tokens (the attention_mask; all ones without one)."""
    mask = batch.get("attention_mask")
    ids = batch.get("input_ids")
    if mask is None:
        return torch.ones(ids.shape[:2]) if ids is not None else torch.ones(1, 1)
    return mask.float()


def _relative_errors(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                     weight: torch.Tensor) -> list[torch.Tensor]:
    """Per layer: Σ w·|s - t|² / Σ w·|t|² over real tokens."""
    w = weight[..., None].to(teacher[0].dtype)
    return [((s - t) ** 2 * w).sum() / ((t ** 2) * w).sum().clamp(min=1e-12) for s, t in zip(student, teacher)]


def _transfer_loss(student: LayerOutputs, teacher: LayerOutputs, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        target = teacher(batch)
    errors = _relative_errors(student(batch), target, _real(batch))
    return torch.stack(errors).mean()


def layer_errors(student: LayerOutputs, teacher: LayerOutputs, batch: Mapping[str, torch.Tensor]) -> list[float]:
    """The relative error of each layer's output, student against teacher, on one batch."""
    with torch.no_grad():
        return [e.item() for e in _relative_errors(student(batch), teacher(batch), _real(batch))]


def save_converted(model: nn.Module, policy: Any, directory: str | Path) -> Path:
    """Write the converted model's state (safetensors; AttnRes parameters included) and its policy."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(getattr(model, "_orig_mod", model), str(directory / STATE_FILE))
    dump_policy(load_policy(policy), directory / POLICY_FILE)
    return directory


def load_converted(model: nn.Module, directory: str | Path, example_kwargs: Mapping[str, Any] | None = None):
    """Load what `save_converted` wrote into `model` (same class and config as the saved one); returns
    the policy. With an AttnRes policy, `example_kwargs` (one batch of inputs) lets `prepare` create the
    parameters first. Reads safetensors only (no pickled code)."""
    from safetensors.torch import load_model

    directory = Path(directory)
    policy = load_policy(directory / POLICY_FILE)
    if policy.residual.variant != "keep":
        if example_kwargs is None:
            raise AttnccError("load_converted: the policy uses AttnRes; pass example_kwargs (one batch of inputs) "
                              "so that attncc.prepare can create its parameters before loading them")
        prepare(model, policy, (), dict(example_kwargs))
    load_model(model, str(directory / STATE_FILE))
    return policy
