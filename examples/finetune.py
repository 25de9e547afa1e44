"""Convert a model's attention with a policy, then fine-tune it: the whole attncc workflow in one script.

    python examples/finetune.py                                  # Llama -> linear attention + Block AttnRes
    python examples/finetune.py --policy my.yaml --steps 200 --inner inductor

The model is a small Llama from transformers' code (random init, so "fine-tuning" here learns a
fixed synthetic sequence); swap `build_model` for `AutoModelForCausalLM.from_pretrained(...)` to
convert a real checkpoint. `attncc.prepare` creates the parameters a policy adds (AttnRes queries and
key norms) on the model, so the optimizer built after it also trains them; the backend only reads them.
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import attncc

DEFAULT_POLICY = {
    "name": "linear-attnres",
    "attention": {"default": {"variant": "linear", "feature_map": "elu1"},
                  "rules": [{"where": {"layers": "0"}, "use": "softmax"}]},
    "residual": {"variant": "attnres", "block_size": 2},
}


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg)


def main(argv: list[str] | None = None) -> tuple[float, float]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", default=None, help="policy file (default: linear attention + Block AttnRes)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--inner", default="aot_eager", choices=("inductor", "aot_eager", "eager"))
    args = parser.parse_args(argv)
    policy = attncc.load_policy(args.policy or DEFAULT_POLICY)

    model = build_model().train()
    tokens = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(1))
    attncc.prepare(model, policy, (tokens,), {"use_cache": False})  # creates the AttnRes parameters
    print(attncc.explain(model, (tokens,), policy, {"use_cache": False}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    compiled = torch.compile(model, backend=attncc.backend(policy, inner=args.inner))
    losses = []
    for step in range(args.steps):
        logits = compiled(tokens, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    print(f"AttnRes parameters trained: {sum(p.numel() for p in attncc.parameters(model))}")
    return losses[0], losses[-1]


if __name__ == "__main__":
    main()
