"""Train a converted model under torch.distributed: DDP (default) or FSDP2 `fully_shard`, each rank compiling with attncc.

    torchrun --nproc-per-node 2 examples/train_distributed.py                       # DDP, CPU (gloo)
    torchrun --nproc-per-node 2 examples/train_distributed.py --fsdp                # FSDP2 (see wrap: one unit with AttnRes)
    torchrun --nproc-per-node 2 examples/train_distributed.py --save ckpt           # DCP checkpoint after the steps
    torchrun --nproc-per-node 1 examples/train_distributed.py --load ckpt --steps 1 # ... loaded into 1 process
    torchrun --nproc-per-node 2 examples/train_distributed.py --inner inductor      # on GPUs (NCCL is picked there)

The model is a tiny Llama from transformers (random init, seeded), converted by a policy with `linear`
attention and Block AttnRes. `attncc.prepare(model, policy, example_args)` creates the AttnRes parameters
on the model BEFORE it is wrapped, so DDP broadcasts and all-reduces them and FSDP2 shards them like
any other parameter; then every rank compiles its own wrapped model with `attncc.backend(policy)`.
AttnRes needs the whole residual stream in one graph: `wrap` turns off dynamo's DDPOptimizer (which
splits the graph at DDP's buckets) and, with AttnRes, makes the whole model one FSDP2 unit (each
`fully_shard` unit is a graph break in torch 2.13).
The global batch is deterministic (seeded); rank r takes its contiguous shard, and the loss printed by
rank 0 is the mean over the global batch (what a single process computes on the whole batch).
`--save DIR` / `--load DIR` use torch.distributed.checkpoint through
`torch.distributed.checkpoint.state_dict.get_state_dict/set_state_dict` (model, AttnRes parameters
included, and optimizer); a checkpoint saved by N ranks loads into any number of ranks.

`train(rank, world, args)` is the work (a test calls it in-process with world=1); `main()` is torchrun's entry.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from transformers import LlamaConfig, LlamaForCausalLM

import attncc

POLICY = {
    "name": "linear-attnres",
    "attention": {"default": {"variant": "linear", "feature_map": "elu1"}},
    "residual": {"variant": "attnres", "block_size": 2},
}
VOCAB, BATCH, SEQ = 128, 4, 32


def build_model(layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg)


def global_batch(step: int, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    """The step's global batch of tokens, the same on every rank and in a single process: a fixed seeded
    batch (so the loss falls), `step` kept for a data loader that would change it."""
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def shard(tokens: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    if tokens.shape[0] % world:
        raise ValueError(f"global batch {tokens.shape[0]} does not split over {world} ranks")
    return tokens.chunk(world)[rank]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP (per decoder layer + root; "
                        "with AttnRes the root only, see wrap)")
    parser.add_argument("--fsdp-per-layer", action="store_true", default=None,
                        help="with --fsdp and AttnRes: shard per decoder layer anyway (AttnRes is then not rewritten)")
    parser.add_argument("--residual", default="attnres", choices=("attnres", "keep"),
                        help="the policy's residual stream: Block AttnRes (default) or kept")
    parser.add_argument("--bucket-cap-mb", type=float, default=None, help="DDP gradient bucket size")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--inner", default="aot_eager", choices=("inductor", "aot_eager", "eager"),
                        help="attncc's inner compiler: aot_eager on CPU, inductor on GPUs")
    parser.add_argument("--save", default=None, help="DCP checkpoint directory written after the last step")
    parser.add_argument("--load", default=None, help="DCP checkpoint directory read before the first step")
    parser.add_argument("--dump", default=None, help="directory for rank-wise results as JSON/.pt (used by the tests)")
    return parser.parse_args(argv)


def wrap(model: torch.nn.Module, world: int, fsdp: bool, attnres: bool, bucket_cap_mb: float | None = None,
         per_layer: bool | None = None) -> torch.nn.Module:
    """DDP, or FSDP2 `fully_shard` (on each decoder layer, then the root, which takes the rest: embeddings,
    head and the AttnRes parameters).

    AttnRes rewrites the residual stream only when the whole stream is in one compiled graph. In torch
    2.13 FSDP2's hooks run under `torch._dynamo.disable`, so every `fully_shard` unit is a graph break:
    with AttnRes the default is therefore one FSDP2 unit (the root: its parameters are sharded and
    gathered all at once); `per_layer=True` forces the per-layer sharding, which keeps the AttnRes rewrite
    out (the attention rewrite, inside each layer, still works). Without AttnRes the default is per layer.
    """
    if world == 1 and not dist.is_initialized():
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        if per_layer if per_layer is not None else not attnres:
            for layer in model.model.layers:
                fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel
    if attnres:
        # dynamo's DDPOptimizer splits the graph at DDP's gradient buckets (to overlap all-reduce with
        # backward); AttnRes rewrites the residual stream only when it is whole in one graph
        torch._dynamo.config.optimize_ddp = False
    kwargs = {} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}
    return DistributedDataParallel(model, **kwargs)


def train(rank: int, world: int, args: argparse.Namespace) -> list[float]:
    """Build, convert (prepare before wrapping), wrap, compile and train; the global-batch loss per step.

    With world == 1 and no process group the model is not wrapped (the single-process reference).
    """
    policy = attncc.load_policy(POLICY if args.residual == "attnres" else {**POLICY, "residual": {"variant": "keep"}})
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = build_model(args.layers).to(device).train()
    example = shard(global_batch(0), rank, world).to(device)
    attncc.prepare(model, policy, (example,), {"use_cache": False})  # AttnRes parameters exist from here on
    attnres = policy.residual.variant != "keep"
    model = wrap(model, world, args.fsdp, attnres, args.bucket_cap_mb, args.fsdp_per_layer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    first = load(model, optimizer, args.load) if args.load else 0  # the step the checkpoint stopped at
    backend = attncc.backend(policy, inner=args.inner)
    compiled = torch.compile(model, backend=backend)
    losses = []
    for step in range(first, first + args.steps):
        tokens = shard(global_batch(step), rank, world).to(device)
        logits = compiled(tokens, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        if args.dump:
            _dump_grads(model, rank, step, args.dump)
        optimizer.step()
        total = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(total)
            total /= world
        losses.append(total.item())
        if step == first and attnres and rank == 0 and not backend.report.count("rewritten", "residual"):
            print("warning: the AttnRes rewrite did not happen (the residual stream is not whole in one graph)",
                  flush=True)
        if rank == 0:
            print(f"step {step:3d}  loss {losses[-1]:.6f}", flush=True)
    if args.save:
        save(model, optimizer, args.save, first + args.steps)
    if args.dump:
        _dump(model, rank, losses, backend, args.dump)
    return losses


def save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str, next_step: int) -> None:
    """A DCP checkpoint of model (AttnRes parameters included) and optimizer; every rank writes its part."""
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd, "meta": {"next_step": next_step}}, checkpoint_id=path)


def load(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str) -> int:
    """Load a DCP checkpoint saved by any number of ranks into this (wrapped) model; returns the next step."""
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd, "meta": {"next_step": 0}}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(state["meta"]["next_step"])


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's parameters on every rank (gathered from FSDP shards), unwrapped names."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=False)
    return {k: v.detach().clone() for k, v in get_model_state_dict(model, options=opts).items()}


def _attnres_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    container = getattr(getattr(model, "module", model), "attncc_attnres", None)
    out = {}
    for name, p in (container.named_parameters() if container is not None else ()):
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):  # FSDP2: a sharded DTensor
            g = g.full_tensor()
        out[name] = None if g is None else g.detach().clone()
    return out


def _dump_grads(model: torch.nn.Module, rank: int, step: int, out: str) -> None:
    torch.save(_attnres_grads(model), Path(out) / f"grads_rank{rank}_step{step}.pt")


def _dump(model: torch.nn.Module, rank: int, losses: list[float], backend, out: str) -> None:
    state = _full_state(model)
    report = backend.report
    torch.save(state, Path(out) / f"state_rank{rank}.pt")
    (Path(out) / f"result_rank{rank}.json").write_text(json.dumps({
        "losses": losses,
        "rewritten_attention": report.count("rewritten", "attention"),
        "rewritten_residual": report.count("rewritten", "residual"),
        "graphs": report.graphs,
    }))


def main(argv: list[str] | None = None) -> list[float]:
    args = parse(argv)
    if "RANK" in os.environ:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    else:
        rank, world = 0, 1
    if args.dump:
        Path(args.dump).mkdir(parents=True, exist_ok=True)
    try:
        return train(rank, world, args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
