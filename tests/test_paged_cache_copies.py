"""copy.deepcopy(PagedCache): transformers' prompt-reuse recipe on copy-on-write forks.

Recipe (transformers docs, "re-use a prompt cache"): fill a cache with a shared prefix
by one forward, deep-copy it per prompt, generate from prefix + prompt with the copy.
"""

from __future__ import annotations

import copy

import pytest
import torch

from _models import tiny
from pagedkv.integrations.transformers import PagedCache, cache_kwarg

NEW = 10
BS = 8
PREFIX = 37  # not a multiple of BS: the last prefix block is shared and partly filled

pytestmark = pytest.mark.usefixtures("single_thread")


def tokens(n, seed):
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, cache=None, new=NEW):
    extra = {} if cache is None else {cache_kwarg(model): cache}
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
        pad_token_id=0, **extra,
    )  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def fill(model, ids, **kw):
    cache = PagedCache(model, block_size=BS, **kw)
    with torch.no_grad():
        model(input_ids=ids, **{cache_kwarg(model): cache})
    return cache


def pool_bytes(cache, blocks):
    return cache.kv_cache.pool.kv[:, :, blocks].clone()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_copies_continue_like_fresh_caches_and_leave_the_original(family):
    model = tiny(family).double()
    prefix = tokens(PREFIX, 0)
    suffixes = [tokens(n, 10 + n) for n in (5, 12, 1)]
    original = fill(model, prefix, num_blocks=64)
    pool = original.kv_cache
    sid = original._live.seq_id(0)
    table = pool.block_table(sid)
    kv_before = pool_bytes(original, table)
    used = pool.num_blocks - pool.num_free_blocks
    assert used == -(-PREFIX // BS)
    for suffix in suffixes:
        ids = torch.cat([prefix, suffix], 1)
        twin = copy.deepcopy(original)
        # a fork: same blocks, nothing allocated or copied yet
        assert pool.num_blocks - pool.num_free_blocks == used
        assert pool.block_table(twin._live.seq_id(0)) == table
        assert twin.get_seq_length() == PREFIX
        out = generate(model, ids, twin)
        assert out == generate(model, ids)  # transformers' default cache, whole prompt
        assert out == generate(model, ids, PagedCache(model, num_blocks=64, block_size=BS))
        # the copy owns only what it wrote: its own copy of the partial last block and
        # the blocks after it; the full prefix blocks stay shared
        own = -(-(ids.shape[1] + NEW - 1) // BS) - PREFIX // BS
        assert pool.num_blocks - pool.num_free_blocks == used + own
        assert pool.block_table(twin._live.seq_id(0))[: PREFIX // BS] == table[: PREFIX // BS]
        twin.close()
        assert pool.num_blocks - pool.num_free_blocks == used
    assert pool.block_table(sid) == table and original.get_seq_length() == PREFIX
    assert torch.equal(pool_bytes(original, table), kv_before)
    pool.check_integrity()
    # the original itself still continues correctly after its copies are gone
    ids = torch.cat([prefix, suffixes[0]], 1)
    assert generate(model, ids, original) == generate(model, ids)


def test_copy_of_a_padded_batch_and_copies_of_copies():
    model = tiny("llama").double()
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (9, 20)]
    ids = torch.tensor([[0] * (20 - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (20 - len(r)) + [1] * len(r) for r in rows])
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    original = PagedCache(model, num_blocks=64, block_size=BS)
    model.generate(ids, **kw, **{cache_kwarg(model): original})
    # the cache has seen 20 + 5 columns; copies continue from all 26 known tokens
    cont = dict(attention_mask=torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1),
                max_new_tokens=4, do_sample=False, pad_token_id=0)  # fmt: skip
    more = model.generate(ref, **cont)
    twin = copy.deepcopy(original)
    grandchild = copy.deepcopy(twin)
    for c in (twin, grandchild):
        assert torch.equal(model.generate(ref, **cont, **{cache_kwarg(model): c}), more)
    assert original._live.lens == [9 + 5, 20 + 5]
    original.kv_cache.check_integrity()


def test_a_dropped_copy_frees_its_blocks_and_a_closed_one_cannot_be_copied():
    model = tiny("llama")
    original = fill(model, tokens(PREFIX, 1), num_blocks=32)
    pool = original.kv_cache
    free = pool.num_free_blocks
    twin = copy.deepcopy(original)
    generate(model, torch.cat([tokens(PREFIX, 1), tokens(4, 2)], 1), twin, new=3)
    assert pool.num_free_blocks < free
    del twin  # garbage collection releases the copy's sequence (refcount: at once)
    assert pool.num_free_blocks == free
    original.close()
    with pytest.raises(RuntimeError, match="closed"):
        copy.deepcopy(original)
