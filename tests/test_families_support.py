"""Which models run: decided from their features; the others are refused by name."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

from _models import FAMILY_SHAPE, tiny_family
from pagedkv.engine import Engine, SamplingParams
from pagedkv.errors import UnsupportedModelError
from pagedkv.integrations.attention import PagedAttentionMetadata, paged_attention_forward
from pagedkv.integrations.cache import PagedCache
from pagedkv.integrations.support import check_model_supported, kv_geometry

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
    num_hidden_layers=2, vocab_size=64,
)  # fmt: skip


def config(name: str, **fields):
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls(**fields)


# (config class, its fields, what the refusal must name)
REFUSED = {
    "mla-deepseek-v3": (
        "DeepseekV3Config",
        dict(SMALL, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
             v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
             first_k_dense_replace=1),
        "multi-latent attention",
    ),  # fmt: skip
    "t5": ("T5Config", dict(d_model=32, d_ff=64, num_layers=2, num_heads=4, vocab_size=64),
           "encoder-decoder"),  # fmt: skip
    "bart": (
        "BartConfig",
        dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64),
        "encoder-decoder",
    ),  # fmt: skip
    "qwen3-next": (
        "Qwen3NextConfig",
        dict(SMALL, num_hidden_layers=4, head_dim=8, linear_num_value_heads=2,
             linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
             shared_expert_intermediate_size=16),
        "linear attention",
    ),  # fmt: skip
    "falcon-h1": ("FalconH1Config", dict(SMALL, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                                        mamba_d_state=8, mamba_n_groups=1), "hybrid|Mamba"),
    "jamba": ("JambaConfig", dict(SMALL, num_experts=2, num_experts_per_tok=1),
              "linear attention|hybrid|Mamba"),  # fmt: skip
    "llama4-chunked": ("Llama4TextConfig", dict(SMALL, attention_chunk_size=16),
                       "chunked attention"),  # fmt: skip
    "gemma3n-kv-sharing": ("Gemma3nTextConfig", dict(SMALL, num_kv_shared_layers=1),
                           "KV shared across layers"),  # fmt: skip
    "gemma3-multimodal": ("Gemma3Config", {}, "multimodal"),
    "lfm2-conv": ("Lfm2Config", dict(SMALL, full_attn_idxs=[1]), "convolution"),
    "recurrent-gemma": ("RecurrentGemmaConfig", dict(SMALL), "recurrent|linear attention"),
    "diffllama": ("DiffLlamaConfig", dict(SMALL), "differential attention"),
    "bloom-alibi": ("BloomConfig", dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=64),
                    "attention interface"),  # fmt: skip
    "gpt2-cross-attention": ("GPT2Config", dict(n_embd=32, n_layer=1, n_head=2, vocab_size=64,
                                                add_cross_attention=True), "cross-attention"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_configs_name_the_feature(case):
    name, fields, match = REFUSED[case]
    with pytest.raises(UnsupportedModelError, match=match):
        check_model_supported(config(name, **fields))


@pytest.mark.parametrize("case", ["mla-deepseek-v3", "t5", "qwen3-next", "falcon-h1"])
def test_refused_models_build_nothing(case):
    """Engine and PagedCache refuse the real (tiny) model before allocating anything."""
    name, fields, match = REFUSED[case]
    cfg = config(name, **fields)
    torch.manual_seed(0)
    auto = transformers.AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else (
        transformers.AutoModelForCausalLM)  # fmt: skip
    model = auto.from_config(cfg)
    with pytest.raises(UnsupportedModelError, match=match):
        Engine(model, num_blocks=8)
    with pytest.raises(UnsupportedModelError, match=match):
        PagedCache(model, num_blocks=8)


def test_layers_without_attention_modules_are_refused():
    """The model is checked too, not only its config: a layer whose attention module is
    something else (a recurrent mixer, say) is refused, and so is a bidirectional one."""
    model = tiny_family("llama")
    check_model_supported(model)
    model.model.layers[1].self_attn = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError, match=r"without self-attention .*\[1\]"):
        check_model_supported(model)
    model = tiny_family("llama")
    model.model.layers[0].self_attn.is_causal = False
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        Engine(model, num_blocks=8)
    model = tiny_family("llama")
    model.model.layers[0].self_attn.head_dim = 8
    with pytest.raises(UnsupportedModelError, match="head_dim of 8 in layer 0"):
        check_model_supported(model)


def test_bert_as_a_decoder_without_causal_attention_is_refused():
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=64, is_decoder=False,
    )  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        check_model_supported(transformers.BertLMHeadModel(cfg))


class _MyConfig(transformers.LlamaConfig):
    model_type = "my_decoder"


class _MyDecoder(transformers.LlamaForCausalLM):
    config_class = _MyConfig


def test_unknown_model_type_with_supported_features_runs_with_a_warning(caplog):
    cfg = _MyConfig(**FAMILY_SHAPE, num_hidden_layers=2)
    torch.manual_seed(0)
    model = _MyDecoder(cfg).to(torch.float64).eval()
    model.generation_config.eos_token_id = None
    with caplog.at_level(logging.WARNING, logger="pagedkv.integrations"):
        engine = Engine(model, num_blocks=32, block_size=8)
    warned = [r for r in caplog.records if "my_decoder" in r.getMessage()]
    assert len(warned) == 1 and "not among the families" in warned[0].getMessage()
    assert "\n" not in warned[0].getMessage()
    prompt = list(range(3, 40))
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    out = engine.generate([prompt], SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert out[0].token_ids == ref[0, len(prompt) :].tolist()
    assert not check_model_supported(model).tested


def test_tested_families_do_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="pagedkv.integrations"):
        support = check_model_supported(tiny_family("qwen3"))
    assert support.tested and not caplog.records


def test_kv_geometry_takes_head_dim_from_the_config():
    assert kv_geometry(transformers.Qwen3Config(**SMALL, head_dim=16)) == (2, 2, 16)
    assert kv_geometry(transformers.LlamaConfig(**SMALL)) == (2, 2, 8)
    assert kv_geometry(transformers.LlamaConfig(**dict(SMALL, num_key_value_heads=None))) == (
        2, 4, 8)  # fmt: skip
    gemma = config("Gemma3TextConfig", **SMALL, head_dim=24)
    assert kv_geometry(gemma) == (2, 2, 24)


# -- the attention function refuses, rather than silently ignores, what it cannot run --
def _meta(d=8, hkv=2):
    kv = torch.zeros(1, 2, 4, 8, hkv, d, dtype=torch.float64)
    return PagedAttentionMetadata(
        kv=kv, slots=torch.tensor([0]), block_tables=torch.zeros(1, 1, dtype=torch.int32),
        seq_lens=torch.tensor([1], dtype=torch.int32),
        cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32), max_q_len=1, is_decode=True,
    )  # fmt: skip


class _Attn(torch.nn.Module):
    layer_idx = 0
    is_causal = True


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(position_bias=torch.zeros(1)), "position bias"),
        (dict(indices=torch.zeros(1)), "sparse attention"),
        (dict(is_causal=False), "bidirectional"),
        (dict(attention_mask=torch.zeros(1, 1, 1, 1)), "mask of its own"),
        (dict(value=torch.zeros(1, 2, 1, 4, dtype=torch.float64)), "head dims 8/8/4"),
        (dict(module="no layer_idx"), "no layer_idx"),
    ],
)
def test_attention_function_refuses_features_it_cannot_compute(change, match):
    q = torch.zeros(1, 4, 1, 8, dtype=torch.float64)
    k = torch.zeros(1, 2, 1, 8, dtype=torch.float64)
    args = dict(module=_Attn(), query=q, key=k, value=k, attention_mask=None)
    args.update(change)
    if args["module"] == "no layer_idx":
        args["module"] = torch.nn.Module()
    meta = _meta()
    before = meta.kv.clone()
    with pytest.raises(UnsupportedModelError, match=match):
        paged_attention_forward(**args, pagedkv_metadata=meta)
    assert torch.equal(meta.kv, before)  # refused before writing anything
