"""Which transformers models pagedkv can run, and why the others are refused."""

from __future__ import annotations

from typing import Any

from pagedkv.errors import UnsupportedModelError

#: model_type values whose attention is standard causal softmax attention with RoPE and
#: (optionally) GQA and q/k/v bias: the families the paged attention path is tested on.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "qwen2", "mistral"})


def check_model_supported(model_or_config: Any) -> None:
    """Raise :class:`UnsupportedModelError` naming the feature pagedkv cannot run.

    Accepts a ``PreTrainedModel`` or its config. Refused: encoder-decoder models,
    sliding-window or linear-attention layers, and any ``model_type`` outside
    :data:`SUPPORTED_MODEL_TYPES`.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"encoder-decoder models ({model_type!r}) are not supported: pagedkv runs "
            "decoder-only causal LMs"
        )
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        raise UnsupportedModelError(
            f"model {model_type!r} has layers of type {other}: only full causal attention "
            "layers are supported (no sliding-window, chunked or linear attention)"
        )
    window = getattr(config, "sliding_window", None)
    max_pos = getattr(config, "max_position_embeddings", None)
    if window is not None and (max_pos is None or window < max_pos):
        raise UnsupportedModelError(
            f"model {model_type!r} uses sliding-window attention (sliding_window={window}): "
            "not supported; set config.sliding_window = None if the model was trained "
            "with full attention"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: "
            f"{sorted(SUPPORTED_MODEL_TYPES)}"
        )


def kv_geometry(config: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a supported model's KV cache."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim
