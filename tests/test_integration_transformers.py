"""transformers integration: PagedCache in generate(), its life cycle, the attention and
mask functions, support checks. (Drop-in safety and copies: test_dropin.py.)"""

from __future__ import annotations

import copy
import gc
import pickle
import types

import pytest
import torch
import transformers

from _models import tiny
from pagedkv.errors import OutOfBlocks, UnsupportedModelError
from pagedkv.integrations.transformers import (
    PagedCache,
    cache_kwarg,
    check_model_supported,
    paged_attention_forward,
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


def with_cache(model, cache):
    """``{name: cache}`` under the name this transformers gives the cache argument."""
    return {cache_kwarg(model): cache}


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_paged_cache_greedy_left_padded_matches_default_cache(family):
    model = tiny(family)
    ids, mask = padded_batch([5, 17, 33, 9])
    kw = dict(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0
    )
    ref = model.generate(**kw)
    cache = PagedCache(model, num_blocks=64)
    assert model.config._attn_implementation == "sdpa"  # nothing switched outside forwards
    out = model.generate(**kw, **with_cache(model, cache))
    assert out.shape == ref.shape
    assert torch.equal(out, ref)
    assert model.config._attn_implementation == "sdpa"
    # the cache holds exactly the real (unpadded) tokens of each row
    lengths = mask.sum(1).tolist()
    assert cache._live.lens == [n + NEW - 1 for n in lengths]
    assert cache.get_seq_length() == ids.shape[1] + NEW - 1
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
    ref = model.generate(**kw)
    cache = PagedCache(model, num_blocks=32)
    torch.manual_seed(123)
    out = model.generate(**kw, **with_cache(model, cache))
    assert torch.equal(out, ref)


def test_old_cache_argument_name_still_works():
    """``past_key_values=`` (the pre-5.24 name, deprecated since) reaches the cache too."""
    model = tiny("llama")
    ids, mask = padded_batch([7, 3])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    ref = model.generate(**kw, pad_token_id=0)
    cache = PagedCache(model, num_blocks=16)
    if cache_kwarg(model) == "cache":
        with pytest.warns(FutureWarning, match="past_key_values"):
            out = model.generate(**kw, pad_token_id=0, past_key_values=cache)
    else:
        out = model.generate(**kw, pad_token_id=0, past_key_values=cache)
    assert torch.equal(out, ref)


def test_paged_cache_refuses_beam_search():
    model = tiny("llama")
    ids, mask = padded_batch([4, 6])
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False,
            pad_token_id=0, **with_cache(model, PagedCache(model, num_blocks=32)),
        )  # fmt: skip
    assert model.config._attn_implementation == "sdpa"


def test_plain_forward_after_paged_generate_is_unchanged():
    model = tiny("llama")
    ids, mask = padded_batch([4, 9])
    before = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    cache = PagedCache(model, num_blocks=8)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                   pad_token_id=0, **with_cache(model, cache))  # fmt: skip
    after = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(before, after)


def test_positional_arguments_reach_the_cache():
    model = tiny("llama")
    ids, mask = padded_batch([6, 3])
    ref = model(ids, mask, use_cache=False).logits
    real = mask.bool()
    cache = PagedCache(model, num_blocks=8)
    out = model(ids, mask, None, cache).logits  # input_ids, attention_mask, position_ids, cache
    assert cache._live.lens == [6, 3]
    assert torch.allclose(out[real], ref[real], atol=1e-5)


def test_cache_refuses_a_forward_it_cannot_page():
    """Passed to another model (or a submodule), the cache raises instead of letting
    that model's attention run over the current chunk only."""
    model, other = tiny("llama"), tiny("llama")
    cache = PagedCache(model, num_blocks=8)
    ids, _ = padded_batch([5])
    with pytest.raises(RuntimeError, match="not paged"):
        other(input_ids=ids, **with_cache(other, cache))
    with pytest.raises(RuntimeError, match="not paged"):
        model.model(input_ids=ids, **with_cache(model, cache))
    with pytest.raises(ValueError, match="2D padding mask"):
        model(input_ids=ids, attention_mask=torch.ones(1, 1, 5, 5), **with_cache(model, cache))
    assert cache.kv_cache.num_free_blocks == 8  # nothing was reserved by the refusals
    assert model.config._attn_implementation == "sdpa"


def test_failed_forward_restores_the_model_and_marks_the_cache():
    model = tiny("llama")
    cache = PagedCache(model, num_blocks=8)
    ids, _ = padded_batch([5])
    boom = model.model.layers[1].register_forward_hook(lambda *a: 1 / 0)
    try:
        with pytest.raises(ZeroDivisionError):
            model(input_ids=ids, **with_cache(model, cache))
    finally:
        boom.remove()
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="reset"):
        model(input_ids=ids, **with_cache(model, cache))
    cache.reset()
    assert cache.kv_cache.num_free_blocks == 8
    ref = model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(model(input_ids=ids, **with_cache(model, cache)).logits, ref, atol=1e-5)


def test_pool_too_small_is_a_clear_error_and_reserves_nothing():
    model = tiny("llama")
    cache = PagedCache(model, num_blocks=2, block_size=4)
    ids, mask = padded_batch([6, 7])
    with pytest.raises(OutOfBlocks, match="num_blocks"):
        model(input_ids=ids, attention_mask=mask, **with_cache(model, cache))
    assert cache.kv_cache.num_free_blocks == 2 and cache.get_seq_length() == 0


def test_close_and_garbage_collection_detach_the_cache():
    model = tiny("llama")
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    ids, _ = padded_batch([5])
    with PagedCache(model, num_blocks=8) as cache:
        model(input_ids=ids, **with_cache(model, cache))
        assert len(model._forward_pre_hooks) == hooks[0] + 1
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
    assert cache.kv_cache.num_free_blocks == 8
    with pytest.raises(RuntimeError, match="closed"):
        model(input_ids=ids, **with_cache(model, cache))
    cache = PagedCache(model, num_blocks=8)
    model(input_ids=ids, **with_cache(model, cache))
    del cache
    gc.collect()
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks


def test_paged_cache_cannot_be_pickled_or_shallow_copied():
    cache = PagedCache(tiny("llama"), num_blocks=4)
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(cache)
    with pytest.raises(TypeError, match="deepcopy"):
        copy.copy(cache)


def test_bad_constructor_arguments_are_refused():
    model = tiny("llama")
    with pytest.raises(TypeError, match="model"):
        PagedCache(None)
    other = tiny("llama", layers=3)
    with pytest.raises(ValueError, match="layout"):
        PagedCache(model, kv_cache=PagedCache(other, num_blocks=4).kv_cache)


def test_register_is_idempotent_and_functions_delegate_outside_paged_forwards():
    """A model set to "pagedkv" by hand runs plain forwards exactly as sdpa does."""
    assert register() == register() == "pagedkv"
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    assert AttentionInterface._global_mapping["pagedkv"] is paged_attention_forward
    assert AttentionMaskInterface._global_mapping["pagedkv"] is paged_mask
    kw = dict(batch_size=1, q_length=2, kv_length=3, attention_mask=torch.tensor([[0, 1, 1]]))
    assert torch.equal(paged_mask(**kw), sdpa_mask(**kw))
    model = tiny("qwen2")
    ids, mask = padded_batch([6, 11], seed=5)
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    ref = model.generate(**gen, pad_token_id=0)
    ref_logits = model(input_ids=ids, attention_mask=mask).logits
    model.set_attn_implementation("pagedkv")
    assert torch.equal(model.generate(**gen, pad_token_id=0), ref)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref_logits)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (types.SimpleNamespace(model_type="t5", is_encoder_decoder=True), "encoder-decoder"),
        (
            types.SimpleNamespace(
                model_type="qwen3_next", layer_types=["linear_attention", "full_attention"]
            ),
            "uses linear attention",
        ),  # fmt: skip
        (types.SimpleNamespace(model_type="deepseek_v3", kv_lora_rank=512), "multi-latent"),
        (types.SimpleNamespace(model_type="gpt2"), "no self-attention geometry"),
    ],
)
def test_unsupported_models_are_refused_by_name(config, match):
    """(Real configs of every refused kind: test_families_support.py.)"""
    with pytest.raises(UnsupportedModelError, match=match):
        check_model_supported(config)


def test_unsupported_real_model_refused_by_paged_cache():
    cfg = transformers.BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=64)
    model = transformers.BloomForCausalLM(cfg)  # ALiBi, outside the attention interface
    with pytest.raises(UnsupportedModelError, match="bloom.*attention interface"):
        PagedCache(model)
