"""The engine over offload tiers: same outputs, fewer prefill tokens after eviction."""

from __future__ import annotations

import pytest

from _models import tiny
from pagedkv.engine import Engine
from pagedkv.tiers import CPUTier, DiskTier
from test_engine import GREEDY, prompts_of

pytestmark = pytest.mark.usefixtures("single_thread")


def run_rounds(engine: Engine, rounds: list[list[list[int]]]) -> list[list[list[int]]]:
    return [[o.token_ids for o in engine.generate(r, GREEDY)] for r in rounds]


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_tiers_serve_evicted_prefixes_with_identical_outputs(tier, tmp_path):
    model = tiny("llama")
    system = list(range(100, 164))  # a 64-token shared system prompt
    first = prompts_of((7, 12), seed=1, prefix=system)
    others = prompts_of((90, 90, 90), seed=2)  # unrelated traffic evicts the system prompt
    rounds = [first, others, prompts_of((9, 15), seed=3, prefix=system)]

    plain = Engine(model, num_blocks=40, block_size=8)
    expected = run_rounds(plain, rounds)

    layout_bytes = plain.cache.layout.bytes_per_block
    tiers = (
        [CPUTier(256 * layout_bytes)]
        if tier == "cpu"
        else [DiskTier(tmp_path / "kv", 256 * layout_bytes)]
    )
    tiered = Engine(model, num_blocks=40, block_size=8, tiers=tiers)
    assert run_rounds(tiered, rounds) == expected

    s_plain, s_tiered = plain.stats(), tiered.stats()
    assert plain.cache.stats().evictions > 0  # the system prompt really left the device
    tier_hits = tiered.cache.tier_stats()["tier_hit_tokens"]
    assert tier_hits >= 64  # the whole system prompt came back from the tier
    # Prompt tokens the tiers served were not computed again (recomputes after a
    # preemption may save even more: their hits are not counted as cached_tokens).
    saved = s_plain.prefill_tokens - s_tiered.prefill_tokens
    assert saved >= s_tiered.cached_tokens - s_plain.cached_tokens >= 64
    tiered.cache.check_integrity()
    tiered.cache.close()
