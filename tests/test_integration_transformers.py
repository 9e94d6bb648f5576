"""transformers integration: PagedCache in generate(), the attention hook, support checks."""

from __future__ import annotations

import types

import pytest
import torch
import transformers

from _models import tiny
from pagedkv.errors import UnsupportedModelError
from pagedkv.integrations.transformers import (
    PagedCache,
    check_model_supported,
    paged_mask,
    register,
)

NEW = 40


pytestmark = pytest.mark.usefixtures("single_thread")


def padded_batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]
    width = max(lengths)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def sdpa(model):
    model.set_attn_implementation("sdpa")
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_paged_cache_greedy_left_padded_matches_default_cache(family):
    model = tiny(family)
    ids, mask = padded_batch([5, 17, 33, 9])
    kw = dict(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0
    )
    ref = sdpa(model).generate(**kw)
    cache = PagedCache(model, num_blocks=64)
    assert model.config._attn_implementation == "pagedkv"
    out = model.generate(**kw, past_key_values=cache)
    assert out.shape == ref.shape
    assert torch.equal(out, ref)
    # the cache holds exactly the real (unpadded) tokens of each row
    lengths = mask.sum(1).tolist()
    assert cache._lens == [n + NEW - 1 for n in lengths]
    cache.kv_cache.check_integrity()
    cache.reset()
    assert cache.kv_cache.num_free_blocks == 64


def test_paged_cache_sampling_matches_default_cache():
    model = tiny("llama")
    ids, mask = padded_batch([6, 11], seed=3)
    kw = dict(
        input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=True, top_k=20,
        temperature=0.9, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(123)
    ref = sdpa(model).generate(**kw)
    cache = PagedCache(model, num_blocks=32)
    torch.manual_seed(123)
    out = model.generate(**kw, past_key_values=cache)
    assert torch.equal(out, ref)


def test_paged_cache_refuses_beam_search():
    model = tiny("llama")
    ids, mask = padded_batch([4, 6])
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False,
            pad_token_id=0, past_key_values=PagedCache(model, num_blocks=32),
        )  # fmt: skip


def test_forward_without_cache_after_paged_generate_is_a_clear_error():
    model = tiny("llama")
    ids, mask = padded_batch([4])
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                   pad_token_id=0, past_key_values=PagedCache(model, num_blocks=8))  # fmt: skip
    with pytest.raises(RuntimeError, match="paged KV cache"):
        model(input_ids=ids, use_cache=False)


def test_register_is_idempotent_and_mask_passes_padding_through():
    assert register() == register() == "pagedkv"
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert "pagedkv" in AttentionInterface._global_mapping
    assert "pagedkv" in AttentionMaskInterface._global_mapping
    assert paged_mask(q_length=2, kv_length=3, attention_mask=None) is None
    m = paged_mask(q_length=1, kv_length=2, attention_mask=torch.tensor([[0, 1, 1]]))
    assert m.dtype == torch.bool and m.tolist() == [[True, True]]


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (types.SimpleNamespace(model_type="gpt2"), "gpt2"),
        (types.SimpleNamespace(model_type="t5", is_encoder_decoder=True), "encoder-decoder"),
        (
            types.SimpleNamespace(
                model_type="mistral", sliding_window=16, max_position_embeddings=512
            ),
            "sliding",
        ),  # fmt: skip
        (
            types.SimpleNamespace(
                model_type="qwen3_next", layer_types=["linear_attention", "full_attention"]
            ),
            "linear",
        ),  # fmt: skip
        (
            types.SimpleNamespace(
                model_type="qwen2", layer_types=["full_attention", "sliding_attention"]
            ),
            "sliding",
        ),  # fmt: skip
    ],
)
def test_unsupported_models_are_refused_by_name(config, match):
    with pytest.raises(UnsupportedModelError, match=match):
        check_model_supported(config)


def test_unsupported_real_model_refused_by_paged_cache():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        PagedCache(model)
