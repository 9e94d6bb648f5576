"""Every supported family through the Engine: token-identical to transformers' generate().

Tiny random float64 models (tests/_models.py ``FAMILIES``) with their per-layer features
(sliding windows shorter than the prompts, alternating local/global layers, logit
softcaps, attention sinks, custom scaling, head_dim != hidden / heads, MoE, NoPE
layers). The reference is transformers' own greedy ``generate()`` with its default
cache and eager attention, one prompt at a time.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from _models import FAMILIES, WINDOW, family_config, tiny_family
from pagedkv import ops
from pagedkv.cache import KVCache
from pagedkv.engine import Engine, SamplingParams
from pagedkv.integrations.attention import PagedAttention, PagedAttentionMetadata
from pagedkv.integrations.support import TESTED_MODEL_TYPES, check_model_supported
from pagedkv.storage import KVLayout

pytestmark = pytest.mark.usefixtures("single_thread")

NEW = 12
BLOCK = 8
PREFIX = 24  # three blocks shared by every prompt: prefix-cache hits
SUFFIXES = (21, 6, 37, 14, 46, 2)  # prompts of 26..70 tokens: 4..9 blocks, all > WINDOW
GREEDY = SamplingParams(max_new_tokens=NEW, ignore_eos=True)


def family_prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 256, (PREFIX,), generator=g).tolist()
    return [prefix + torch.randint(3, 256, (n,), generator=g).tolist() for n in SUFFIXES]


def skip_if_missing(family: str) -> None:
    if family_config(family) is None:
        pytest.skip(f"transformers {transformers.__version__} has no {family!r} model family")


def reference(model, prompts, new=NEW) -> list[list[int]]:
    """transformers' greedy generate() (default cache, eager attention), one prompt each."""
    outs = []
    for p in prompts:
        o = model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, pad_token_id=0)
        outs.append(o[0, len(p) :].tolist())
    return outs


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    skip_if_missing(request.param)
    model = tiny_family(request.param)
    prompts = family_prompts()
    return request.param, model, prompts, reference(model, prompts)


def test_engine_matches_generate_with_prefix_hits_chunks_and_preemption(family):
    name, model, prompts, ref = family
    # 14 blocks of 8 hold the longest request (82 tokens) but not all six at once, so the
    # scheduler preempts (recompute); 40-token steps split the longer prompts into chunks.
    engine = Engine(model, num_blocks=14, block_size=BLOCK, max_batch_tokens=40)
    outs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == ref, name
    stats = engine.stats()
    assert stats.preemptions > 0, stats
    assert stats.cached_tokens >= PREFIX, stats  # the shared prefix was served from cache
    assert stats.blocks_in_use == 0
    engine.cache.check_integrity()
    assert model.config._attn_implementation == "eager"  # the model is left as it was


def _metadata(cache, seqs, q_lens, is_decode) -> PagedAttentionMetadata:
    tables = [cache.block_table(i) for i in seqs]
    width = max(map(len, tables))
    slots, cu = [], [0]
    for i, n in zip(seqs, q_lens):
        total = cache.num_tokens(i)
        slots += cache.slot_mapping(i, total - n, total)
        cu.append(cu[-1] + n)
    i32 = dict(dtype=torch.int32, device=cache.device)
    return PagedAttentionMetadata(
        kv=cache.pool.kv,
        slots=torch.tensor(slots, device=cache.device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], **i32),
        seq_lens=torch.tensor([cache.num_tokens(i) for i in seqs], **i32),
        cu_seqlens_q=torch.tensor(cu, **i32),
        max_q_len=max(q_lens),
        is_decode=is_decode,
    )


def paged_logits(model, prompts, next_tokens) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(logits of every prompt token, from one packed paged prefill of all prompts;
    logits [B, V] of one paged decode step of ``next_tokens`` after them). On the
    model's device and dtype."""
    support = check_model_supported(model)
    param = next(model.parameters())
    layout = KVLayout(support.num_layers, support.num_kv_heads, support.head_dim, BLOCK,
                      param.dtype)  # fmt: skip
    cache = KVCache(layout, 64, device=param.device, prefix_caching=False)
    paged = PagedAttention(model)
    seqs = list(range(len(prompts)))
    for i, p in zip(seqs, prompts):
        cache.allocate(i, p)
    meta = _metadata(cache, seqs, [len(p) for p in prompts], is_decode=False)
    dev = param.device
    ids = torch.tensor([t for p in prompts for t in p], device=dev)[None]
    pos = torch.cat([torch.arange(len(p), device=dev) for p in prompts])[None]
    with torch.no_grad():
        prefill = paged(meta, ids, position_ids=pos).logits[0]
        for i, t in zip(seqs, next_tokens):
            cache.append(i, [t])
        meta = _metadata(cache, seqs, [1] * len(seqs), is_decode=True)
        pos = torch.tensor([len(p) for p in prompts], device=dev)[None]
        decode = paged(meta, torch.tensor(next_tokens, device=dev)[None], position_ids=pos)
    return list(prefill.split([len(p) for p in prompts])), decode.logits[0]


def eager_logits(model, prompt) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0]


def test_paged_logits_equal_eager_attention_and_every_feature_matters(family, monkeypatch):
    """Prefill and decode logits equal transformers' eager attention (to float32 rounding:
    the RMS norms of these models compute in float32 even for float64 weights); dropping
    a layer feature the family has (window, softcap, sinks) from the kernel calls breaks
    that, so the prompts and configs do exercise every one."""
    name, model, prompts, ref = family
    prompts, nxt = prompts[:3], [r[0] for r in ref[:3]]
    want = [eager_logits(model, p + [t]) for p, t in zip(prompts, nxt)]
    got, dec = paged_logits(model, prompts, nxt)
    for i, (w, g) in enumerate(zip(want, got)):
        torch.testing.assert_close(g, w[:-1], rtol=0, atol=1e-6)
        torch.testing.assert_close(dec[i], w[-1], rtol=0, atol=1e-6)
    support = check_model_supported(model)
    feats = {"window": any(support.windows), "softcap": support.softcap, "sinks": support.sinks}
    for feature in [f for f, on in feats.items() if on]:
        for op in ("prefill_attention", "decode_attention"):
            real = getattr(ops, op)

            def without(*args, _f=feature, _real=real, **kwargs):
                return _real(*args, **{**kwargs, _f: None})

            monkeypatch.setattr(ops, op, without)
            off, off_dec = paged_logits(model, prompts, nxt)
            monkeypatch.setattr(ops, op, real)
            if op == "prefill_attention":
                gap = max((o - w[:-1]).abs().max().item() for o, w in zip(off, want))
            else:
                gap = max((off_dec[i] - w[-1]).abs().max().item() for i, w in enumerate(want))
            assert gap > 1e-4, f"{name}: {op} without {feature} changes nothing ({gap})"


def test_family_features_are_what_the_config_says(family, monkeypatch):
    """ModelSupport (read from the config) says what each layer's attention call passes
    the kernels, and what the tiny config was built with."""
    name, model, prompts, _ = family
    support = check_model_supported(model)
    calls = []
    real = ops.prefill_attention

    def spy(*args, **kwargs):
        calls.append((kwargs["window"], kwargs["softcap"], kwargs["sinks"] is not None))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "prefill_attention", spy)
    paged_logits(model, prompts[:1], [3])
    assert calls == [(w, support.softcap, support.sinks) for w in support.windows]
    assert support.tested and support.model_type == name
    assert support.head_dim == (getattr(model.config, "head_dim", None) or 16)
    w = WINDOW
    expected = {
        "mistral": (w, w), "phi3": (w, w), "starcoder2": (w, w), "ministral": (w, w),
        "mixtral": (w, w), "qwen2": (None, w, w), "gemma2": (w, None) * 2,
        "vaultgemma": (w, None), "gpt_oss": (w, None), "gemma3_text": (w,) * 5 + (None,),
        "cohere2": (w, w, w, None), "olmo3": (w, w, w, None), "exaone4": (w, w, w, None),
    }.get(name, (None,) * model.config.num_hidden_layers)  # fmt: skip
    assert support.windows == expected
    assert support.sinks == (name == "gpt_oss")
    assert support.softcap == (0.05 if name in ("gemma2", "vaultgemma") else None)


def test_the_tested_list_is_the_tested_families():
    assert set(FAMILIES) == TESTED_MODEL_TYPES


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma2", "gpt_oss"])
def test_engine_on_the_triton_kernels_matches_generate(name):
    """The Triton kernels (the interpreter on CPU; compiled on CUDA in
    test_families_gpu.py) with windows + softcap (Gemma 2) and windows + sinks (gpt-oss),
    in float32, through the engine with preemption and prefix hits."""
    skip_if_missing(name)
    model = tiny_family(name, dtype=torch.float32)
    prompts = family_prompts()[:4]
    ref = reference(model, prompts)
    with ops.use_backend("triton"):
        engine = Engine(model, num_blocks=11, block_size=BLOCK, max_batch_tokens=40)
        outs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == ref
    stats = engine.stats()
    assert stats.preemptions > 0 and stats.cached_tokens >= PREFIX, stats
