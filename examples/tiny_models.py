"""Builders for `attncc explain`, e.g.

    attncc explain examples/tiny_models.py:build --policy attncc/policies/demo.yaml
    attncc explain examples/tiny_models.py:llama --policy my-policy.yaml --json
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def build():
    """A 4-layer GPT-2 from transformers' own code, random init."""
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=256, n_embd=64, n_layer=4, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval(), (torch.randint(0, 256, (2, 32)),), {"use_cache": False}


def llama():
    """A 4-layer Llama with grouped-query attention (8 heads, 2 kv heads)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval(), (torch.randint(0, 256, (2, 32)),), {"use_cache": False}


def llama_batches():
    """For `attncc convert`: the Llama above and four batches of inputs (the first is held out)."""
    model, (ids,), _ = llama()
    g = torch.Generator().manual_seed(1)
    return model, [{"input_ids": torch.randint(0, 256, (2, 32), generator=g)} for _ in range(4)]
