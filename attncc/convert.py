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
   and v_proj for Llama; with SQA sites, the Linear modules outside the attention, because adapters on
   W_Q and W_O would hide the head structure SQA's weight surgery reshapes), the AttnRes parameters
   trained beside it. If the adapted model's graph leaves a transferred site unchanged, convert raises
   (it would fine-tune the original attention). The objective is the model's own
   loss when the batches carry `labels` (next-token cross-entropy for a causal LM), else the relative
   error of the last layer's output against the teacher. The adapters are merged into the weights at
   the end, so the model keeps its class and its state_dict keys.
5. **Measure.** The per-layer error on a held-out batch before, after the transfer and at the end
   (`Conversion.table()`; `Conversion.save_plots` draws it and the training curves).
6. **Save.** `save_converted` writes the model's state (safetensors, AttnRes parameters included)
   and the policy; `load_converted` puts them back into a model of the same class.

With `checkpoint=DIR` the training state is written every `checkpoint_every` steps; the same call on
a freshly built original model resumes where it stopped.

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
from attncc.compiler import Backend, failing_past_recompile_limit
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

    def save_plots(self, directory: str | Path) -> list[Path]:
        """Write the report's pictures (matplotlib, PNG) into `directory`: `layers.png`, the per-layer
        error before, after the transfer and after the fine-tune; `losses.png`, the training curves.
        Returns their paths."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        stages = [("before", self.before)]
        stages += ([("after transfer", self.transferred), ("after fine-tune", self.after)] if self.finetune_losses
                   else [("after transfer", self.after)])
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        width = 0.8 / len(stages)
        for i, (name, values) in enumerate(stages):
            ax.bar([layer + 1 + (i - (len(stages) - 1) / 2) * width for layer in range(len(values))], values,
                   width=width, label=name)
        ax.set(xlabel="layer", ylabel="relative error of the layer's output", title="error against the original",
               xticks=range(1, len(self.before) + 1))
        ax.legend()
        fig.tight_layout()
        paths = [directory / "layers.png"]
        fig.savefig(paths[0])
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        ax.plot(range(1, len(self.losses) + 1), self.losses, label="attention transfer")
        if self.finetune_losses:
            ax.plot(range(len(self.losses) + 1, len(self.losses) + len(self.finetune_losses) + 1),
                    self.finetune_losses, label="LoRA fine-tune")
        ax.set(xlabel="step", ylabel="loss", yscale="log", title="training")
        ax.legend()
        fig.tight_layout()
        paths.append(directory / "losses.png")
        fig.savefig(paths[1])
        plt.close(fig)
        return paths


def convert(model: nn.Module, policy: Any, batches: Iterable[Mapping[str, torch.Tensor]], *, steps: int,
            held_out: Mapping[str, torch.Tensor] | None = None, lr: float = 1e-3, seed: int = 0,
            inner: str = "aot_eager", progress: bool = True, mask_modules: tuple[str, ...] = (),
            finetune_steps: int = 0, lora_rank: int = 8, lora_targets: list[str] | None = None,
            finetune_lr: float = 1e-4, checkpoint: str | Path | None = None, checkpoint_every: int = 50) -> Conversion:
    """Attention transfer, then the optional LoRA fine-tune (the module docstring's steps 1-5).
    `batches` yields keyword inputs of the model (input_ids, attention_mask, ...), cycled until `steps`;
    `held_out` (default: the first batch) measures the per-layer error before and after. The model is
    changed in place: it is the student. `mask_modules`: the modules a policy's block masks may be
    imported from (as for attncc.backend). Afterwards the model's parameters want gradients as they did
    before (the freezing is for the training).

    `checkpoint`: a directory where the training state (model, optimizer, step, losses) is written
    every `checkpoint_every` steps and at the end of each stage. Calling convert again with the same
    arguments on a freshly built original model resumes from it: the same losses and weights as a run
    that was never interrupted (on the CPU). A larger `steps` continues a finished run.

    Past dynamo's recompile limit a compiled model silently runs without attncc; during a conversion
    that is an error (AttnccError) instead, never a transfer trained against the original attention."""
    with failing_past_recompile_limit("attncc.convert", "call torch._dynamo.reset() before each conversion of "
                                      "one process, or raise the limit"):
        return _convert(model, policy, batches, steps, held_out, lr, seed, inner, progress, mask_modules,
                        finetune_steps, lora_rank, lora_targets, finetune_lr, checkpoint, checkpoint_every)


def _convert(model, policy, batches, steps, held_out, lr, seed, inner, progress, mask_modules, finetune_steps,
             lora_rank, lora_targets, finetune_lr, checkpoint, checkpoint_every) -> Conversion:
    torch.manual_seed(seed)
    batches = list(batches)
    if not batches:
        raise AttnccError("attncc.convert needs at least one batch of inputs")
    held_out = dict(held_out or batches[0])
    saved = _Checkpoint(checkpoint, checkpoint_every)
    state = saved.load()
    if state is not None and state["stage"] == "finetune" and finetune_steps <= 0:
        raise AttnccError(f"attncc.convert: the checkpoint {saved.path} is from the LoRA fine-tune; pass the "
                          "finetune_steps of that run to resume it, or another checkpoint directory")
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
    student = LayerOutputs(attncc_compile(model, Backend(policy, inner=inner, mask_modules=mask_modules)),
                           model, layers)
    teacher = LayerOutputs(teacher, teacher, layers)
    start = time.perf_counter()
    try:
        before = layer_errors(student, teacher, held_out)
        if state is not None and state["stage"] == "finetune":  # the transfer had finished
            losses, after = state["transfer_losses"], state["transferred"]
        else:
            losses = _train(model, lambda batch: _transfer_loss(student, teacher, batch), [p for _, p in trained],
                            batches, steps, lr, "attention transfer", progress, saved, "transfer", state, {}, seed)
            after = layer_errors(student, teacher, held_out)
        student.remove()
        result = Conversion(before, after, losses, [name for name, _ in trained])
        if finetune_steps > 0:
            backend = Backend(policy, inner=inner, mask_modules=mask_modules)
            if lora_targets is None and any(s.variant == "sqa" for s in report.attention() if s.status == "rewritten"):
                lora_targets = _outside_attention(model, modules)
            result.transferred = after
            extra = {"transfer_losses": losses, "transferred": after}
            result.finetune_losses, result.lora_targets = _finetune(
                model, backend, layers, modules, teacher, batches, finetune_steps, finetune_lr, lora_rank, lora_targets,
                progress, saved, state, extra, seed)
            student = LayerOutputs(attncc_compile(model, backend), model, layers)
            result.after = layer_errors(student, teacher, held_out)
        result.seconds = time.perf_counter() - start
        return result
    finally:
        student.remove()
        for p, flag in wanted:
            p.requires_grad_(flag)


CHECKPOINT_FILE = "convert_state.pt"


class _Checkpoint:
    """The training state of a conversion in `directory`/convert_state.pt: written with torch.save,
    read back with torch.load(weights_only=True) (tensors, numbers, lists: no pickled code). No RNG
    state: every step seeds its own (`_train`), so a resumed run draws what the whole run drew."""

    def __init__(self, directory: str | Path | None, every: int):
        self.path = Path(directory) / CHECKPOINT_FILE if directory is not None else None
        self.every = max(1, int(every))

    def load(self) -> dict | None:
        if self.path is None or not self.path.exists():
            return None
        return torch.load(self.path, weights_only=True)

    def due(self, step: int, steps: int) -> bool:
        return self.path is not None and ((step + 1) % self.every == 0 or step + 1 == steps)

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        torch.save(state, partial)
        partial.replace(self.path)  # a run killed while writing keeps the previous checkpoint


STAGES = ("transfer", "finetune")


def _train(model, loss_of, params, batches, steps, lr, desc, progress, saved: _Checkpoint, stage: str,
           state: dict | None, extra: dict, seed: int) -> list[float]:
    """AdamW on `params` for `steps` steps of loss_of(batch), batches cycled; resumed from `state` when it
    is this stage's, checkpointed as `saved` says. Each step seeds torch's RNG from (seed, stage, step)
    (dropout draws the same numbers whether or not the run was resumed, whatever compiling consumed).
    Returns every step's loss."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    first = 0
    if state is not None and state["stage"] == stage:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise AttnccError(f"attncc.convert: the checkpoint {saved.path} is not from this model and policy "
                              f"({str(e).splitlines()[0]}); use another checkpoint directory") from e
        optimizer.load_state_dict(state["optimizer"])
        losses, first = list(state["losses"]), int(state["step"])
    model.train()
    start, tokens = time.perf_counter(), 0
    bar = tqdm(range(first, steps), desc=desc, disable=not progress, initial=first, total=steps)
    for step in bar:
        torch.manual_seed((seed * len(STAGES) + STAGES.index(stage)) * 1_000_003 + step)
        batch = batches[step % len(batches)]
        loss = loss_of(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        tokens += int(_real(batch).sum())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
        if saved.due(step, steps):
            saved.save({"stage": stage, "step": step + 1, "losses": losses, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), **extra})
    model.eval()
    return losses


def _finetune(model, backend, layers, modules, teacher, batches, steps, lr, rank, targets, progress, saved, state,
              extra, seed):
    """Step 4: LoRA adapters (peft; their initialization drawn from `seed`) on `targets`, trained with the
    AttnRes parameters, then merged into the weights. Returns the losses and the names of the adapted
    modules. The adapted model must still have every site of `modules` rewritten (an adapter can hide
    the structure a rewrite needs), else this is an error, never a fine-tune of the original attention."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
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
    checked = [0]  # the backend's graphs checked so far: each new graph once, not every step

    def loss_of(batch):
        outputs = student(batch)
        if len(backend.reports) != checked[0]:
            checked[0] = len(backend.reports)
            _check_rewritten(backend, modules, names)
        if "labels" in batch:
            return student.result.loss
        with torch.no_grad():
            target = teacher(batch)[-1:]
        return _relative_errors(outputs[-1:], target, _real(batch))[0]

    try:
        losses = _train(model, loss_of, [p for p in model.parameters() if p.requires_grad], batches, steps, lr,
                        "LoRA fine-tune", progress, saved, "finetune", state, extra, seed)
    finally:
        student.remove()
        adapted.merge_and_unload()
    return losses, names


def _check_rewritten(backend: Backend, modules: list[str], adapted: list[str]) -> None:
    """AttnccError if the fine-tune's graphs leave a transferred site (of `modules`) unchanged."""
    left = {s.module: s.reason for s in backend.report.attention() if s.status != "rewritten" and s.module in modules}
    if left:
        raise AttnccError(
            f"attncc.convert: with LoRA on {', '.join(adapted) or 'its modules'}, the fine-tune's graph leaves "
            f"{len(left)} site(s) unchanged ({'; '.join(f'{m}: {r}' for m, r in sorted(left.items())[:2])}), so it "
            "would train the original attention; pass lora_targets outside the attention (e.g. the MLP's "
            "Linear modules)")


def _outside_attention(model: nn.Module, modules: list[str]) -> list[str]:
    """The Linear modules outside the attention `modules` and the output embedding: LoRA targets that
    leave an SQA site's projections as the rewrite found them (SQA reshapes W_Q and W_O by head)."""
    prefixes = tuple(m + "." for m in modules)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not name.startswith(prefixes) and m is not head]


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
        """The layers' outputs in the call's last forward pass; what `fn` returned is kept as `self.result`.
        (The first call of attncc.compile's module with an AttnRes policy also runs the model once to prepare
        it, untransformed: those outputs come first and are dropped.)"""
        self.outputs.clear()
        self.result = self.fn(**batch)
        outputs = list(self.outputs)[-len(self.handles):]
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
        return torch.ones(ids.shape[:2], device=ids.device) if ids is not None else torch.ones(1, 1)
    return mask.float()


def _relative_errors(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                     weight: torch.Tensor) -> list[torch.Tensor]:
    """Per layer: Σ w·|s - t|² / Σ w·|t|² over real tokens."""
    w = weight[..., None].to(teacher[0].device, teacher[0].dtype)
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
