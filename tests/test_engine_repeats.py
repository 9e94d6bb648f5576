"""Zero-compute repeats: a prompt whose KV is all cached is answered from its stored
last-position logits (and partial last block) with no forward, token-identical to a cold
run; the store stays under its byte cap and never serves a prompt whose blocks changed.
Also: a failed batch leaves none of its unwritten blocks findable."""

from __future__ import annotations

import pytest
import torch

from _models import tiny
from pagedkv.engine import Engine, SamplingParams
from pagedkv.errors import CacheIntegrityError
from test_engine import reference

pytestmark = pytest.mark.usefixtures("single_thread")

BS = 8
NEW = 10
GREEDY = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
SEEDED = SamplingParams(max_new_tokens=NEW, temperature=0.9, top_k=40, seed=11, ignore_eos=True)
# tiny llama: vocab 256 float32 logits = 1024 bytes; KV 2 layers x K,V x 2 heads x 16 x 4 B
LOGITS_BYTES = 256 * 4
TOKEN_BYTES = 2 * 2 * 2 * 16 * 4


@pytest.fixture(scope="module")
def model():
    return tiny("llama")


def prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n,), generator=g).tolist()


def engine_of(model, **options) -> Engine:
    return Engine(model, **{"num_blocks": 64, "block_size": BS, **options})


class Forwards:
    """Counts the model forwards of an engine (tokens of each)."""

    def __init__(self, engine: Engine, monkeypatch) -> None:
        self.tokens: list[int] = []
        real = engine.runner.forward

        def counted(ids, pos, meta, rows):
            self.tokens.append(ids.numel())
            return real(ids, pos, meta, rows)

        monkeypatch.setattr(engine.runner, "forward", counted)


def first_step(engine: Engine, p: list[int], sp: SamplingParams) -> int:
    """Add a request, run one step; the request id (its first token is sampled)."""
    rid = engine.add_request(p, sp)
    engine.step()
    assert len(engine.core.requests[rid].output) == 1
    return rid


# ------------------------------------------------------------------ repeats
@pytest.mark.parametrize("n", [16, 21, 5], ids=["aligned", "partial-last-block", "short"])
@pytest.mark.parametrize("sp", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_repeat_computes_nothing_and_yields_the_cold_tokens(model, monkeypatch, n, sp):
    p = prompt(n)
    cold = engine_of(model).generate([p], sp)[0]  # a fresh engine: the cold run
    engine = engine_of(model)
    first = engine.generate([p], sp)[0]
    before = engine.stats()
    forwards = Forwards(engine, monkeypatch)
    rid = first_step(engine, p, sp)
    assert forwards.tokens == []  # the first token came without a forward
    while engine.has_unfinished():
        engine.step()
    again = engine.core.take(rid)
    after = engine.stats()
    assert again.token_ids == first.token_ids == cold.token_ids
    if sp is GREEDY:
        assert cold.token_ids == reference(model, [p], NEW)[0]
    assert again.num_cached_tokens == n
    assert after.prefill_tokens == before.prefill_tokens  # zero prefill tokens
    assert after.cached_tokens - before.cached_tokens == n
    assert after.prompt_tokens - before.prompt_tokens == n
    assert (before.repeated_prompts, after.repeated_prompts) == (0, 1)
    assert forwards.tokens == [1] * (NEW - 1)  # only decode steps ran
    repeats = engine.scheduler.repeats
    r = n % BS
    assert repeats.stats().bytes_used == LOGITS_BYTES + r * TOKEN_BYTES
    assert engine.stats().blocks_in_use == 0
    engine.cache.check_integrity()
    repeats.check_integrity()


def test_repeats_beside_computed_requests_in_one_step(model):
    """Stored prompts admitted with prompts that need a forward, seeded and greedy: every
    request gets its own cold tokens, whatever the order of the batch."""
    a, b, c = prompt(16, 1), prompt(13, 2), prompt(11, 3)
    sps = [SEEDED, GREEDY, SamplingParams(max_new_tokens=NEW, temperature=1.2, seed=5)]
    cold = [engine_of(model).generate([q], sp)[0].token_ids for q, sp in zip((a, b, c), sps)]
    engine = engine_of(model)
    engine.generate([a, b], sps[:2])  # stores a and b
    before = engine.stats()
    # a and b (stored) come last in the step's chunks: c is computed, a and b are not
    outs = engine.generate([a, c, b], [sps[0], sps[2], sps[1]])
    assert [o.token_ids for o in outs] == [cold[0], cold[2], cold[1]]
    assert [o.num_cached_tokens for o in outs] == [16, 0, 13]
    assert engine.stats().prefill_tokens - before.prefill_tokens == 11  # c only
    assert engine.stats().repeated_prompts == 2
    engine.cache.check_integrity()


def test_two_repeats_of_one_prompt_in_one_step(model):
    p = prompt(19, 4)
    engine = engine_of(model)
    first = engine.generate([p], SEEDED)[0]
    outs = engine.generate([p, p], SEEDED)
    assert [o.token_ids for o in outs] == [first.token_ids] * 2
    assert [o.num_cached_tokens for o in outs] == [19, 19]
    engine.cache.check_integrity()


def test_repeats_follow_salts(model):
    p = prompt(16, 5)
    engine = engine_of(model)
    engine.generate([p], GREEDY, cache_salt="a")
    assert engine.generate([p], GREEDY, cache_salt="b")[0].num_cached_tokens == 0
    assert engine.generate([p], GREEDY, cache_salt="a")[0].num_cached_tokens == 16
    assert engine.stats().repeated_prompts == 1


@pytest.mark.parametrize("options", [dict(repeat_cache_bytes=0), dict(prefix_caching=False)])
def test_repeats_can_be_turned_off(model, options):
    p = prompt(16, 6)
    engine = engine_of(model, **options)
    assert engine.scheduler.repeats is None and engine.runner.repeats is None
    first = engine.generate([p], GREEDY)[0]
    again = engine.generate([p], GREEDY)[0]
    assert again.token_ids == first.token_ids
    assert again.num_cached_tokens == (8 if engine.config.prefix_caching else 0)
    assert engine.stats().repeated_prompts == 0


# ------------------------------------------------------------------ the byte cap
def test_the_byte_cap_holds_and_evicts_the_least_recently_used(model):
    # aligned prompts: 1024 bytes each; room for two
    engine = engine_of(model, repeat_cache_bytes=2 * LOGITS_BYTES + 500)
    ps = [prompt(16, 10 + i) for i in range(3)]
    cold = [o.token_ids for o in engine.generate(ps[:2], GREEDY)]
    assert engine.generate([ps[0]], GREEDY)[0].num_cached_tokens == 16  # ps[0] is recent
    cold.append(engine.generate([ps[2]], GREEDY)[0].token_ids)  # evicts ps[1]
    s = engine.scheduler.repeats.stats()
    assert (s.entries, s.bytes_used, s.stores, s.evicted, s.hits) == (2, 2048, 3, 1, 1)
    assert s.bytes_used <= s.capacity_bytes == 2 * LOGITS_BYTES + 500
    outs = engine.generate(ps, GREEDY)
    assert [o.token_ids for o in outs] == cold
    # ps[1] was recomputed (its last block: lookup leaves it out), the others repeated
    assert [o.num_cached_tokens for o in outs] == [16, 8, 16]
    s = engine.scheduler.repeats.stats()
    assert s.bytes_used <= s.capacity_bytes and s.entries == 2
    engine.scheduler.repeats.check_integrity()


def test_an_entry_over_the_cap_is_not_kept(model):
    engine = engine_of(model, repeat_cache_bytes=LOGITS_BYTES + 3 * TOKEN_BYTES)
    engine.generate([prompt(16, 20), prompt(12, 21)], GREEDY)  # 1024 B fits, 1024 + 4x512 not
    s = engine.scheduler.repeats.stats()
    assert (s.entries, s.bytes_used, s.stores, s.too_large) == (1, LOGITS_BYTES, 1, 1)


# ------------------------------------------------------------------ invalidation
def test_an_evicted_prompt_block_invalidates_its_entry(model):
    p = prompt(21, 30)
    engine = engine_of(model)
    first = engine.generate([p], SEEDED)[0]
    cached = engine.cache.stats().cached_blocks
    assert engine.cache.evict(cached) == cached > 0
    before = engine.stats()
    again = engine.generate([p], SEEDED)[0]
    assert again.token_ids == first.token_ids
    assert again.num_cached_tokens == 0
    assert engine.stats().prefill_tokens - before.prefill_tokens == 21
    assert engine.stats().repeated_prompts == 0
    # the recompute stored it again: the next repeat is free
    assert engine.generate([p], SEEDED)[0].num_cached_tokens == 21
    assert engine.stats().repeated_prompts == 1


def test_blocks_cached_anew_do_not_revive_an_entry(model):
    """The prompt's blocks are evicted, then computed and cached again by a longer
    prompt: they hold KV of another computation, so the entry is stale (dropped) and the
    prompt's last block is recomputed."""
    p = prompt(16, 31)
    engine = engine_of(model)
    first = engine.generate([p], GREEDY)[0]
    stored = engine.cache.prompt_match(p)
    engine.cache.evict(engine.cache.stats().cached_blocks)
    engine.generate([p + prompt(5, 32)], GREEDY)  # caches p's two blocks again
    assert engine.cache.prompt_match(p).key == stored.key
    assert engine.cache.prompt_match(p).registrations != stored.registrations
    before = engine.stats()
    again = engine.generate([p], GREEDY)[0]
    assert again.token_ids == first.token_ids and again.num_cached_tokens == 8
    assert engine.stats().prefill_tokens - before.prefill_tokens == 8
    s = engine.scheduler.repeats.stats()
    assert (s.stale, s.hits) == (1, 0)


def test_blocks_gone_between_find_and_allocate_are_computed(model, monkeypatch):
    """The race a TTL allows (a block expires between the two reads of one admission):
    the whole allocation is discarded and the prompt computed as usual."""
    p = prompt(21, 33)
    engine = engine_of(model)
    first = engine.generate([p], SEEDED)[0]
    cache, real = engine.cache, engine.cache.allocate

    def expiring(seq_id, tokens, salt=None, **kw):
        if kw.get("whole"):
            cache.evict(cache.stats().cached_blocks)
        return real(seq_id, tokens, salt, **kw)

    monkeypatch.setattr(cache, "allocate", expiring)
    before = engine.stats()
    again = engine.generate([p], SEEDED)[0]
    assert again.token_ids == first.token_ids and again.num_cached_tokens == 0
    assert engine.stats().prefill_tokens - before.prefill_tokens == 21
    assert engine.stats().repeated_prompts == 0 and engine.stats().blocks_in_use == 0
    cache.check_integrity()


def test_the_repeat_store_check_fires(model):
    engine = engine_of(model)
    engine.generate([prompt(16, 40), prompt(12, 41)], GREEDY)
    repeats = engine.scheduler.repeats
    repeats.check_integrity()
    key = next(iter(repeats._entries))
    repeats._lru.add(key, repeats._lru.size(key) + 1)
    with pytest.raises(CacheIntegrityError, match="indexed as"):
        repeats.check_integrity()
    repeats._lru.add(key, repeats._entries[key].nbytes)
    del repeats._entries[key]
    with pytest.raises(CacheIntegrityError, match="1 entries but 2 indexed keys"):
        repeats.check_integrity()
    repeats._lru.pop(key)
    repeats._lru.capacity_bytes = 10
    with pytest.raises(CacheIntegrityError, match="capacity_bytes"):
        repeats.check_integrity()


# ------------------------------------------------------------------ failed batches
class FailAt:
    """A runner.launch that raises at call ``at`` (0-based), the real one otherwise;
    ``resolve=True``: the launch goes through and reading its tokens raises (an error of
    the device work, surfacing at the step's one wait)."""

    def __init__(self, engine: Engine, monkeypatch, at: int, resolve: bool = False) -> None:
        self.calls, self.at, self.real, self.resolve = 0, at, engine.runner.launch, resolve
        monkeypatch.setattr(engine.runner, "launch", self)

    def __call__(self, chunks):
        self.calls += 1
        if self.calls - 1 != self.at:
            return self.real(chunks)
        if not self.resolve:
            raise RuntimeError("device lost")
        self.real(chunks)
        return Lost()


class Lost:
    def tolist(self):
        raise RuntimeError("device lost")


def test_a_failed_prefill_leaves_no_block_findable(model, monkeypatch):
    p = prompt(20, 50)
    engine = engine_of(model)
    FailAt(engine, monkeypatch, at=0)
    # two requests of one prompt in one step: the second holds the first's new blocks
    outs = engine.generate([p, p], GREEDY)
    assert [o.finish_reason for o in outs] == ["error", "error"]
    assert engine.cache.lookup(p) == 0 and engine.cache.prompt_match(p[:16]) is None
    assert engine.cache.stats().cached_blocks == 0
    assert engine.stats().blocks_in_use == 0
    engine.cache.check_integrity()
    assert engine.generate([p], GREEDY)[0].token_ids == reference(model, [p], NEW)[0]


def test_a_failed_decode_keeps_the_blocks_written_before(model, monkeypatch):
    p = prompt(15, 51)  # one full block; the first output token fills the second
    engine = engine_of(model)
    FailAt(engine, monkeypatch, at=1)
    out = engine.generate([p], GREEDY)[0]
    assert out.finish_reason == "error" and len(out.token_ids) == 1
    seq = p + out.token_ids
    assert engine.cache.prompt_match(p[:8]) is not None  # written by the prefill
    assert engine.cache.prompt_match(seq) is None  # registered by the failed step only
    assert engine.cache.lookup(seq + [7]) == 8
    engine.cache.check_integrity()


def test_a_step_failed_while_another_is_in_flight_keeps_the_earlier_blocks(model, monkeypatch):
    p = prompt(15, 51)
    engine = engine_of(model, overlap=True)
    FailAt(engine, monkeypatch, at=1)  # the decode launched while the prefill runs
    out = engine.generate([p], GREEDY)[0]
    # the prefill's token was pending, never emitted: the request had failed first
    assert out.finish_reason == "error" and out.token_ids == []
    assert engine.cache.prompt_match(p[:8]) is not None  # written by the prefill
    assert engine.cache.lookup(p + [7]) == 8
    assert engine.stats().blocks_in_use == 0
    engine.cache.check_integrity()
    assert engine.generate([p], GREEDY)[0].token_ids == reference(model, [p], NEW)[0]


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_a_step_failing_on_the_device_caches_none_of_its_blocks(model, monkeypatch, overlap):
    p = prompt(20, 52)
    engine = engine_of(model, overlap=overlap)
    FailAt(engine, monkeypatch, at=0, resolve=True)  # the prefill's tokens never arrive
    out = engine.generate([p], GREEDY)[0]
    assert out.finish_reason == "error" and out.token_ids == []
    assert engine.cache.lookup(p) == 0 and engine.cache.stats().cached_blocks == 0
    assert engine.stats().blocks_in_use == 0
    engine.cache.check_integrity()
    assert engine.generate([p], GREEDY)[0].token_ids == reference(model, [p], NEW)[0]


@pytest.mark.parametrize("sp", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_repeats_under_overlap_yield_the_cold_tokens(model, monkeypatch, sp):
    ps = [prompt(16, 70), prompt(21, 71), prompt(5, 72)]
    cold = [o.token_ids for o in engine_of(model).generate(ps, sp)]
    engine = engine_of(model, overlap=True)
    assert [o.token_ids for o in engine.generate(ps, sp)] == cold
    before = engine.stats()
    fresh = prompt(13, 73)  # computed in the same steps as the repeats
    outs = engine.generate([*ps, fresh], sp)
    assert [o.token_ids for o in outs[:3]] == cold
    assert outs[3].token_ids == engine_of(model).generate([fresh], sp)[0].token_ids
    after = engine.stats()
    assert after.repeated_prompts - before.repeated_prompts == 3
    assert after.prefill_tokens - before.prefill_tokens == len(fresh)
    assert [o.num_cached_tokens for o in outs[:3]] == [16, 21, 5]
    engine.cache.check_integrity()


# ------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_cuda_repeats_match_the_cold_run(cuda_graphs):
    model = tiny("llama").cuda()
    ps = [prompt(16, 60), prompt(29, 61), prompt(3, 62)]
    sps = [GREEDY, SEEDED, SEEDED]
    cold = Engine(model, num_blocks=64, block_size=BS, cuda_graphs=cuda_graphs)
    ref = [o.token_ids for o in cold.generate(ps, sps)]
    engine = Engine(model, num_blocks=64, block_size=BS, cuda_graphs=cuda_graphs)
    assert [o.token_ids for o in engine.generate(ps, sps)] == ref
    before = engine.stats()
    outs = engine.generate(ps, sps)
    assert [o.token_ids for o in outs] == ref
    assert [o.num_cached_tokens for o in outs] == [16, 29, 3]
    assert engine.stats().prefill_tokens == before.prefill_tokens
    engine.cache.check_integrity()


def test_a_quantized_pool_stores_no_repeats(model):
    # a partial block's KV there comes with per-block scales the stored tail would lack
    engine = engine_of(model, kv_dtype="fp8")
    assert engine.scheduler.repeats is None
    p = prompt(21, 80)
    first = engine.generate([p], GREEDY)[0].token_ids
    again = engine.generate([p], GREEDY)[0]
    assert again.token_ids == first and again.num_cached_tokens == 16
    assert engine.stats().repeated_prompts == 0
