"""Tiny random-weight models of the supported families, shared by the engine tests."""

from __future__ import annotations

import torch
import transformers

SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=256, max_position_embeddings=512,
)  # fmt: skip
SEEDS = {"llama": 0, "qwen2": 1, "mistral": 2}


def tiny(family: str = "llama", *, layers: int = 2, seed: int | None = None):
    """A float32 tiny model; the same (family, layers, seed) always gets the same weights.

    Qwen2 has q/k/v bias; Mistral is built without sliding window (pagedkv refuses it).
    EOS is disabled so generations run to their length.
    """
    torch.manual_seed(SEEDS[family] if seed is None else seed)
    shape = dict(SHAPE, num_hidden_layers=layers)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape))
    else:
        cfg = transformers.MistralConfig(sliding_window=None, **shape)
        model = transformers.MistralForCausalLM(cfg)
    model.generation_config.eos_token_id = None
    return model.float().eval()
