"""The engine releases blocks outside the window of a model whose every layer is windowed.

A tiny float64 Mistral with a 13-token window (shorter than the prompts, not a multiple
of the block size): greedy output must stay token-identical to transformers' generate()
while the engine holds only about window / block_size + 1 blocks per sequence; models
with a full-attention layer keep every block.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from _models import WINDOW, tiny_family
from pagedkv.cache import KVCache
from pagedkv.engine import Engine, SamplingParams
from pagedkv.integrations.support import ModelSupport
from pagedkv.tiers import CPUTier
from test_families import family_prompts, reference, skip_if_missing

pytestmark = pytest.mark.usefixtures("single_thread")

BS = 4
STEP_TOKENS = 8  # chunked prefill: at most 8 tokens a step


@pytest.fixture(scope="module")
def mistral():
    skip_if_missing("mistral")
    return tiny_family("mistral")


def test_long_generation_holds_the_window_not_the_context(mistral):
    prompt = torch.randint(3, 256, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    new = 70
    ref = reference(mistral, [prompt], new)
    engine = Engine(mistral, num_blocks=64, block_size=BS, max_batch_tokens=STEP_TOKENS)
    assert engine.scheduler.window == WINDOW
    held = []
    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=new, ignore_eos=True))
    while engine.has_unfinished():
        outs = engine.step()
        held.append(engine.cache.manager.num_used_blocks)
    assert outs[0].request_id == rid and outs[0].token_ids == ref[0]
    # After a step computing tokens [0, p), blocks before p - W + 1 go; the next step
    # reserves up to STEP_TOKENS more: at most ceil((W - 1 + STEP) / BS) + 1 blocks.
    bound = -(-(WINDOW - 1 + STEP_TOKENS) // BS) + 1
    assert max(held[:-1]) <= bound, held
    assert engine.stats().blocks_peak <= bound
    needed = -(-(len(prompt) + new) // BS)  # what keeping every block holds at the end
    assert needed == 25 and bound == 6
    engine.cache.check_integrity()
    assert engine.stats().blocks_in_use == 0


def test_prefix_hits_and_swap_preemption_with_released_blocks(mistral, monkeypatch):
    prompts = family_prompts()
    ref = reference(mistral, prompts)
    swapped_released = []
    real = KVCache.swap_out

    def swap_out(cache, seq_id):
        swapped_released.append(cache.num_released(seq_id))
        return real(cache, seq_id)

    monkeypatch.setattr(KVCache, "swap_out", swap_out)
    engine = Engine(
        mistral, num_blocks=22, block_size=BS, max_batch_tokens=STEP_TOKENS * 2,
        preemption="swap", tiers=[CPUTier(1 << 20, swap_bytes=4 << 20)],
    )  # fmt: skip
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in outs] == ref
    stats = engine.stats()
    assert stats.preemptions > 0 and stats.cached_tokens > 0, stats
    assert any(swapped_released), swapped_released  # victims swapped with released blocks
    engine.cache.check_integrity()
    engine.close()


def test_retained_requests_keep_every_block(mistral):
    engine = Engine(mistral, num_blocks=32, block_size=BS, max_batch_tokens=STEP_TOKENS)
    prompt = list(range(3, 33))
    out = engine.generate([prompt], SamplingParams(max_new_tokens=6, ignore_eos=True),
                          retain=True)[0]  # fmt: skip
    seq = engine.core.retained_request(out).seq_id
    assert engine.cache.num_released(seq) == 0  # a snapshot needs all of its KV
    engine.release(out)


@pytest.mark.parametrize("family", ["gemma2", "qwen2"])
def test_models_with_a_full_attention_layer_keep_every_block(family):
    skip_if_missing(family)
    engine = Engine(tiny_family(family), num_blocks=32, block_size=BS)
    assert engine.scheduler.window is None


def test_released_memory_benchmark_holds_the_window(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import kv_memory_released as kvr

    r = kvr.replay(8192, 1000, 16)
    assert r.full_blocks == 512
    assert r.held_blocks == 512 - (8192 - 1000 + 1) // 16 == 63  # tokens 7184..8191
    assert r.held_bytes < 1.02 * r.needed_bytes
    assert r.held_blocks < r.peak_blocks <= r.held_blocks + 512 // 16 + 1  # a prefill chunk
    assert kvr.main(["--context", "4096", "--window", "1024", "--out", str(tmp_path)]) == 0
    assert "every block kept" in capsys.readouterr().out


def test_release_window_is_the_largest_layer_window():
    # a layer with a wider window still reads keys a narrower one skips
    all_windowed = ModelSupport("x", 3, 2, 8, (8, 32, 16), None, False, True)
    mixed = ModelSupport("x", 2, 2, 8, (8, None), None, False, True)
    assert all_windowed.release_window == 32 and mixed.release_window is None
