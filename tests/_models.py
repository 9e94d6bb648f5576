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

    Qwen2 has q/k/v bias; Mistral is built without sliding window (the windowed families
    are in :data:`FAMILIES`).
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


# -- the families (tests/test_families*.py) ------------------------------------------
# Each entry: (config class name, the config's extra fields). A tiny geometry: hidden 64,
# vocab 256; head_dim 32 where the family has its own (not hidden / heads); windows (13)
# shorter than the test prompts and not a multiple of the block size.
WINDOW = 13
FAMILY_SHAPE = dict(
    hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=256, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, tie_word_embeddings=False,
)  # fmt: skip
# fmt: off
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(num_hidden_layers=2)),
    "qwen2": (  # q/k/v bias; layers >= max_window_layers are windowed
        "Qwen2Config",
        dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW,
             max_window_layers=1),
    ),
    "mistral": ("MistralConfig", dict(num_hidden_layers=2, sliding_window=WINDOW)),
    "qwen3": ("Qwen3Config", dict(num_hidden_layers=2, head_dim=32)),  # q/k norm
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(num_hidden_layers=2, head_dim=32, num_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=32),
    ),
    "gemma2": (  # alternating windows, attention + final logit softcaps, own scaling
        "Gemma2Config",
        dict(num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW,
             attn_logit_softcapping=0.05, final_logit_softcapping=0.5),
    ),
    "gemma3_text": (  # 5 local : 1 global, two RoPE bases, query_pre_attn_scalar
        "Gemma3TextConfig",
        dict(num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=20,
             sliding_window=WINDOW),
    ),
    "phi3": ("Phi3Config", dict(num_hidden_layers=2, sliding_window=WINDOW)),  # fused qkv
    "olmo2": ("Olmo2Config", dict(num_hidden_layers=2)),  # q/k norm over all heads
    "granite": (
        "GraniteConfig",
        dict(num_hidden_layers=2, embedding_multiplier=3.0, attention_multiplier=0.2,
             residual_multiplier=0.5, logits_scaling=2.0),
    ),
    "smollm3": ("SmolLM3Config", dict(num_hidden_layers=4, no_rope_layer_interval=2)),  # NoPE
    "gpt_oss": (  # sinks, MoE, alternating windows
        "GptOssConfig",
        dict(num_hidden_layers=2, head_dim=32, num_local_experts=4, num_experts_per_tok=2,
             sliding_window=WINDOW, rope_parameters=dict(rope_type="default", rope_theta=1e4)),
    ),
    # -- more plain causal decoders over the attention interface ----------------------
    "gemma": ("GemmaConfig", dict(num_hidden_layers=2, head_dim=32)),
    "cohere2": (  # 3 windowed RoPE layers : 1 global NoPE layer, logit_scale
        "Cohere2Config", dict(num_hidden_layers=4, sliding_window=WINDOW, logit_scale=0.5),
    ),
    "starcoder2": ("Starcoder2Config", dict(num_hidden_layers=2, sliding_window=WINDOW)),
    "olmo3": ("Olmo3Config", dict(num_hidden_layers=4, sliding_window=WINDOW)),
    "ministral": ("MinistralConfig", dict(num_hidden_layers=2, head_dim=16, sliding_window=WINDOW)),
    "exaone4": ("Exaone4Config", dict(num_hidden_layers=4, sliding_window=WINDOW)),
    "vaultgemma": (
        "VaultGemmaConfig",
        dict(num_hidden_layers=2, head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW,
             attn_logit_softcapping=0.05),
    ),
    "mixtral": (  # MoE, all layers windowed
        "MixtralConfig",
        dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
             sliding_window=WINDOW),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
             shared_expert_intermediate_size=48),
    ),
    "olmoe": ("OlmoeConfig", dict(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2)),
    "glm4": ("Glm4Config", dict(num_hidden_layers=2, head_dim=32)),  # partial RoPE
    "helium": ("HeliumConfig", dict(num_hidden_layers=2, head_dim=16)),
    "seed_oss": ("SeedOssConfig", dict(num_hidden_layers=2, head_dim=32)),
    "phi": ("PhiConfig", dict(num_hidden_layers=2)),  # partial RoPE, parallel block
    "gpt_neox": ("GPTNeoXConfig", dict(num_hidden_layers=2, num_key_value_heads=4)),  # no GQA
    "gpt2": (  # learned positions, Conv1D projections, no GQA
        "GPT2Config",
        dict(n_layer=2, n_embd=64, n_head=4, n_positions=512, num_key_value_heads=4),
    ),
}
# fmt: on


def family_config(family: str):
    """The tiny config of ``family`` (see :data:`FAMILIES`), or None when the installed
    transformers has no such family."""
    cls_name, extra = FAMILIES[family]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        return None
    return cls(**{**FAMILY_SHAPE, **extra})


def tiny_family(family: str, *, dtype=torch.float64, seed: int = 0):
    """A tiny random model of ``family`` in ``dtype`` (float64: exact comparisons), eval,
    eager attention (the reference every family has), EOS disabled so generations run
    to their length. The same (family, seed) always gets the same weights."""
    cfg = family_config(family)
    if cfg is None:
        raise LookupError(f"transformers {transformers.__version__} has no {family!r} family")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager", **_experts(cfg)
    )
    model.generation_config.eos_token_id = None
    return model.to(dtype).eval()


def _experts(cfg) -> dict:
    # MoE families: transformers' default grouped-mm experts have no float64 kernel;
    # the eager loop over experts computes the same thing in any dtype.
    return {"experts_implementation": "eager"} if hasattr(cfg, "num_experts_per_tok") else {}


def generate_one_by_one(model, prompts, new: int) -> list[list[int]]:
    """transformers' greedy generate() with its default cache, one prompt at a time: the
    ``new`` tokens after each prompt."""
    outs = []
    for p in prompts:
        o = model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, pad_token_id=0)
        outs.append(o[0, len(p) :].tolist())
    return outs
