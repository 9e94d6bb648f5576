"""Which transformers models pagedkv can run, decided from their features.

A model runs on the paged path when its attention goes through transformers' attention
interface (the model class says so: ``is_backend_compatible()``) and every layer is
causal softmax attention over its own K/V, full or sliding-window, with any mix of
logit soft-capping, attention sinks, custom scaling, GQA, q/k/v bias or norms, RoPE or
none, and a head_dim of its own. Everything else is refused with
:class:`~pagedkv.errors.UnsupportedModelError` naming the feature: multi-latent
attention, linear / recurrent / state-space / convolution / chunked layers,
encoder-decoder models, cross-attention, bidirectional attention, KV shared across
layers, ALiBi. A ``model_type`` outside :data:`TESTED_MODEL_TYPES` whose features are
all supported runs, with a warning that it is untested.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pagedkv.errors import UnsupportedModelError

log = logging.getLogger("pagedkv.integrations")

#: Families tested token-for-token against transformers' own generate()
#: (tests/test_families.py): plain causal decoders over the attention interface.
TESTED_MODEL_TYPES = frozenset(
    {
        "llama", "qwen2", "mistral", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "phi3",
        "olmo2", "granite", "smollm3", "gpt_oss", "gemma", "cohere2", "starcoder2", "olmo3",
        "ministral", "exaone4", "vaultgemma", "mixtral", "qwen2_moe", "olmoe", "glm4",
        "helium", "seed_oss", "phi", "gpt_neox", "gpt2",
    }
)  # fmt: skip
#: Deprecated alias (the families pagedkv is tested on).
SUPPORTED_MODEL_TYPES = TESTED_MODEL_TYPES

#: Layer types the paged attention runs; any other is refused by its feature name.
SUPPORTED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
_LAYER_FEATURES = {
    "linear_attention": "linear attention",
    "chunked_attention": "chunked attention",
    "mamba": "state-space (Mamba) layers",
    "mamba2": "state-space (Mamba) layers",
    "ssm": "state-space (Mamba) layers",
    "conv": "convolution layers",
    "short_conv": "convolution layers",
    "recurrent": "recurrent layers",
    "compressed_sparse_attention": "compressed sparse attention",
    "heavily_compressed_attention": "compressed sparse attention",
}
# Config attributes that describe a pattern of mixed (non-attention) layers.
_PATTERN_ATTRS = ("layers_block_type", "block_types", "hybrid_override_pattern", "attn_type_list")


@dataclass(frozen=True)
class ModelSupport:
    """What :func:`check_model_supported` found in a supported model.

    ``windows``: per layer, the sliding window in tokens (a query at position p sees
    keys in ``(p - window, p]``) or None for full attention; ``softcap``: the attention
    logit soft-cap (or None); ``sinks``: its attention modules have per-head sink
    logits (known only when a model, not a config, is checked);
    ``tested``: the family is in :data:`TESTED_MODEL_TYPES`.
    """

    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    windows: tuple[int | None, ...]
    softcap: float | None
    sinks: bool
    tested: bool

    @property
    def all_windowed(self) -> bool:
        """Every layer is sliding-window (blocks before the window can be released)."""
        return bool(self.windows) and all(w is not None for w in self.windows)

    @property
    def release_window(self) -> int | None:
        """The window before which an engine releases old blocks when every layer is
        windowed: the *largest* layer window (a layer with a wider window still reads
        keys a narrower one skips); None (keep every block) otherwise. A model with a
        full-attention layer keeps one block table for all layers, so its windowed
        layers only skip the old blocks."""
        if not self.all_windowed:
            return None
        return max(w for w in self.windows if w is not None)


def check_model_supported(model_or_config: Any) -> ModelSupport:
    """Raise :class:`UnsupportedModelError` naming the feature pagedkv cannot run.

    Accepts a ``PreTrainedModel`` or its config (a config is checked against the
    causal-LM class transformers maps it to, when there is one; a model's attention
    modules are checked too). Returns the :class:`ModelSupport` of a supported model;
    an untested ``model_type`` is logged as a warning on ``pagedkv.integrations``.
    """
    model = model_or_config if hasattr(model_or_config, "config") else None
    config = model.config if model is not None else model_or_config
    model_type = str(getattr(config, "model_type", None) or type(config).__name__)

    def refuse(feature: str, how: str = "") -> UnsupportedModelError:
        return UnsupportedModelError(
            f"model {model_type!r} uses {feature}, which pagedkv cannot run: it runs "
            "decoder-only causal LMs whose layers are full or sliding-window softmax "
            f"attention over the transformers attention interface{how}"
        )

    def get(name: str, default: Any = None) -> Any:
        try:
            return getattr(config, name, default)
        except RuntimeError:  # transformers' per-layer configs refuse a global read
            raise refuse(f"per-layer values of {name!r} (a heterogeneous config)") from None

    layer_types = _check_config_features(config, get, refuse)
    cls = type(model) if model is not None else _causal_lm_class(config)
    if cls is not None and not _backend_compatible(cls):
        raise refuse(
            f"an attention that does not go through the attention interface ({cls.__name__})"
        )
    try:
        num_layers, kv_heads, head_dim = kv_geometry(config)
    except (AttributeError, TypeError) as exc:
        raise refuse(f"no self-attention geometry in its config ({exc})") from None
    except RuntimeError:  # per-layer head counts or dims
        raise refuse("per-layer attention geometry (a heterogeneous config)") from None
    v_dim = get("v_head_dim")
    if v_dim is not None and v_dim != head_dim:
        raise refuse(f"a value head_dim ({v_dim}) different from the key head_dim ({head_dim})")
    if model is not None:
        _check_attention_modules(model, num_layers, kv_heads, head_dim, refuse)

    support = ModelSupport(
        model_type=model_type, num_layers=num_layers, num_kv_heads=kv_heads, head_dim=head_dim,
        windows=_layer_windows(get("sliding_window"), layer_types, num_layers),
        softcap=get("attn_logit_softcapping"), sinks=_has_sinks(model),
        tested=model_type in TESTED_MODEL_TYPES,
    )  # fmt: skip
    if not support.tested:
        log.warning(
            "model_type %r is not among the families pagedkv is tested on; its features are "
            "supported, so it runs (compare a few outputs with transformers' generate())",
            model_type,
        )
    return support


def _check_config_features(config: Any, get, refuse) -> list:
    """Refuse what the config alone shows pagedkv cannot run; return its layer types."""
    if get("is_encoder_decoder", False):
        raise refuse("an encoder-decoder architecture")
    if get("add_cross_attention", False):
        raise refuse("cross-attention")
    if _text_config(config) is not config:
        raise refuse(
            "a multimodal wrapper config",
            "; load its text-only causal LM (e.g. Gemma3ForCausalLM) instead",
        )
    if get("kv_lora_rank") or get("q_lora_rank"):
        raise refuse(f"multi-latent attention (kv_lora_rank={get('kv_lora_rank')})")
    if get("use_bidirectional_attention", False) or get("is_causal", True) is False:
        raise refuse("bidirectional (non-causal) attention")
    if get("attention_chunk_size"):
        raise refuse(f"chunked attention (attention_chunk_size={get('attention_chunk_size')})")
    if get("num_kv_shared_layers", 0):
        shared = get("num_kv_shared_layers")
        raise refuse(f"KV shared across layers (num_kv_shared_layers={shared})")
    if get("alibi", False):
        raise refuse("ALiBi position biases")
    if get("lambda_std_dev") is not None:
        raise refuse("differential attention (two softmax maps per layer)")
    layer_types = list(get("layer_types") or [])
    other = [t for t in dict.fromkeys(layer_types) if t not in SUPPORTED_LAYER_TYPES]
    if other:
        feats = sorted({_LAYER_FEATURES.get(str(t), f"{t!r} layers") for t in other})
        raise refuse(f"{' and '.join(feats)} (layer_types contains {other})")
    for attr in _PATTERN_ATTRS:
        if get(attr) is not None:
            raise refuse(f"a hybrid layer pattern ({attr}={get(attr)!r})")
    if any(k.startswith(("mamba_", "ssm_")) for k in getattr(config, "__dict__", {})):
        raise refuse("state-space (Mamba) mixers")
    return layer_types


def kv_geometry(config: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a model's KV cache. ``head_dim`` is the
    config's own when set (Qwen3, Gemma: it need not be hidden_size / heads)."""
    config = _text_config(config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    if get is None:
        return config
    try:
        return get(decoder=True)
    except (TypeError, ValueError):
        return config


def _layer_windows(window: Any, layer_types: list, num_layers: int) -> tuple[int | None, ...]:
    """Each layer's window as the config gives it: ``sliding_window`` on the
    "sliding_attention" layers of ``layer_types``, or on every layer without layer types
    (Mistral, Phi-3, Starcoder2). (The kernels get each call's own ``sliding_window``.)"""
    if not layer_types:
        return (window,) * num_layers
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


def _causal_lm_class(config: Any) -> type | None:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        found: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # a class (typed as a tuple)
        return found if isinstance(found, type) else None
    except (ImportError, KeyError, ValueError):
        return None


def _backend_compatible(cls: type) -> bool:
    check = getattr(cls, "is_backend_compatible", None)
    if check is not None:
        return bool(check())
    return bool(getattr(cls, "_supports_attention_backend", False))


def _attention_modules(model: Any) -> list[Any]:
    """The model's self-attention modules: ``*Attention`` modules with a ``layer_idx``."""
    return [
        m
        for m in model.modules()
        if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)
    ]


def _check_attention_modules(
    model: Any, num_layers: int, kv_heads: int, head_dim: int, refuse
) -> None:
    mods = _attention_modules(model)
    layers = sorted({m.layer_idx for m in mods})
    if layers != list(range(num_layers)):
        missing = sorted(set(range(num_layers)) - set(layers))
        raise refuse(
            f"layers without self-attention (no attention module for layers {missing[:8]}: "
            "recurrent, state-space or convolution mixers)"
            if missing
            else f"attention modules that do not map one-to-one onto its {num_layers} layers"
        )
    for m in mods:
        if getattr(m, "is_causal", True) is False:
            raise refuse(f"bidirectional (non-causal) attention ({type(m).__name__})")
        d = getattr(m, "head_dim", None)
        if isinstance(d, int) and d != head_dim:
            raise refuse(
                f"a head_dim of {d} in layer {m.layer_idx} where its config gives {head_dim}"
            )
        groups = getattr(m, "num_key_value_groups", None)
        heads = getattr(model.config, "num_attention_heads", None)
        if isinstance(groups, int) and isinstance(heads, int) and heads // groups != kv_heads:
            raise refuse(
                f"{heads // groups} KV heads in layer {m.layer_idx} where its config gives "
                f"{kv_heads}"
            )


def _has_sinks(model: Any) -> bool:
    return model is not None and any(
        getattr(m, "sinks", None) is not None for m in _attention_modules(model)
    )
