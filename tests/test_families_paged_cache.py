"""Every supported family through PagedCache in transformers' own generate(): a
left-padded batch gives exactly the tokens of the default cache (float64, greedy).

The reference is each prompt generated alone (default cache, eager attention) and, for
families whose features transformers' SDPA attention computes, its own left-padded batch
on SDPA. Not eager on the padded batch: in float64, transformers' eager attention turns
the fully masked padding rows into NaN, which then leaks into the real rows (its outputs
are wrong, not pagedkv's; SDPA and the per-prompt runs agree with each other and with
PagedCache).
"""

from __future__ import annotations

import pytest
import torch

from _models import FAMILIES, tiny_family
from pagedkv.integrations.transformers import PagedCache, cache_kwarg, check_model_supported
from test_families import BLOCK, NEW, family_prompts, reference, skip_if_missing

pytestmark = pytest.mark.usefixtures("single_thread")


def left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("name", list(FAMILIES))
def test_paged_cache_generate_matches_default_cache(name):
    skip_if_missing(name)
    model = tiny_family(name)
    prompts = family_prompts(seed=1)
    alone = reference(model, prompts)
    ids, mask = left_padded(prompts)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
              pad_token_id=0)  # fmt: skip
    with PagedCache(model, num_blocks=96, block_size=BLOCK) as cache:
        out = model.generate(**kw, **{cache_kwarg(model): cache})
        assert out[:, ids.shape[1] :].tolist() == alone
        # only the real (unpadded) tokens are stored: prompt + all but the last new token
        assert cache._live.lens == [len(p) + NEW - 1 for p in prompts]
        cache.kv_cache.check_integrity()
    assert model.config._attn_implementation == "eager"  # nothing left switched
    support = check_model_supported(model)
    if model._supports_sdpa and not support.softcap and not support.sinks:
        model.set_attn_implementation("sdpa")  # (transformers' SDPA cannot softcap or sink)
        assert torch.equal(out, model.generate(**kw))
