"""Engine(kv_dtype=...): the pool stored compressed, sized by the compressed bytes; what it
serves, how many tokens it holds at once in the same bytes, and its bad input."""

from __future__ import annotations

import pytest
import torch

from _models import tiny
from pagedkv.engine import Engine, EngineConfig, SamplingParams
from pagedkv.storage import KVLayout

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state (unseeded draws included)."""
    torch.manual_seed(0)


def prompts_of(n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (length,), generator=g).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def bf16_llama():
    return tiny("llama").to(torch.bfloat16)


@pytest.mark.parametrize("kv_dtype", ["fp8", "int8"])
def test_engine_serves_from_a_compressed_pool(bf16_llama, kv_dtype):
    """Generation reads the quantized pool; greedy tokens mostly agree with the bf16 pool
    (the share is printed, a floor asserted: a broken read would agree at chance)."""
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    prompts = prompts_of(6, 30, seed=1)
    ref = [o.token_ids for o in Engine(bf16_llama, num_blocks=64).generate(prompts, params)]
    engine = Engine(bf16_llama, num_blocks=64, kv_dtype=kv_dtype)
    assert engine.cache.layout.quantized and engine.cache.pool.kv.dtype != torch.bfloat16
    outs = [o.token_ids for o in engine.generate(prompts, params)]
    same = sum(a == b for o, r in zip(outs, ref) for a, b in zip(o, r)) / (6 * 24)
    print(f"\n{kv_dtype}: {same:.1%} of greedy tokens equal to the bf16 pool's")
    assert all(len(o) == 24 for o in outs) and same > 0.5
    assert bool((engine.cache.pool.scales > 0).any())
    assert engine.stats().blocks_in_use == 0
    engine.cache.check_integrity()
    engine.close()


def peak_tokens(engine: Engine, prompts, params) -> int:
    """Most tokens whose KV the pool held at once while serving ``prompts``."""
    for p in prompts:
        engine.add_request(p, params)
    peak = 0
    while engine.has_unfinished():
        engine.step()
        held = sum(engine.cache.num_tokens(s) for s in engine.cache.seq_ids())
        peak = max(peak, held)
    return peak


def test_same_bytes_hold_1_9x_the_concurrent_tokens(bf16_llama):
    """A byte budget sized by EngineConfig (as for free device memory) gives the fp8 engine
    ~2x the blocks; under a load larger than both pools it holds >= 1.9x the tokens."""
    budget = 48 * KVLayout(2, 2, 16, 16, torch.bfloat16).bytes_per_block
    blocks = {}
    for kv in (None, "fp8"):
        lay = KVLayout(2, 2, 16, 16, torch.bfloat16, kv_dtype=kv)
        blocks[kv] = EngineConfig(cpu_kv_bytes=budget, kv_dtype=kv).resolve_num_blocks(
            lay.bytes_per_block, torch.device("cpu"))  # fmt: skip
        assert blocks[kv] * lay.bytes_per_block <= budget
    assert blocks[None] == 48 and blocks["fp8"] >= 94
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    prompts = prompts_of(40, 40, seed=2)  # 40 x 48 tokens: more than either pool holds
    peaks = {}
    for kv in (None, "fp8"):
        engine = Engine(bf16_llama, num_blocks=blocks[kv], prefix_caching=False, kv_dtype=kv)
        peaks[kv] = peak_tokens(engine, prompts, params)
        engine.close()
    print(f"\npeak concurrent tokens in {budget} bytes: bf16 {peaks[None]}, fp8 {peaks['fp8']}")
    assert peaks["fp8"] >= 1.9 * peaks[None]


def test_bad_kv_dtype_is_refused_before_anything_is_built(bf16_llama):
    with pytest.raises(ValueError, match="kv_dtype must be 'fp8' or 'fp8_e5m2' or 'int8'"):
        Engine(bf16_llama, num_blocks=8, kv_dtype="fp4")
    with pytest.raises(ValueError, match="kv_dtype must be"):
        Engine(bf16_llama, num_blocks=8, kv_dtype="fp16")  # the model's dtype is the default
    with pytest.raises(TypeError, match="kv_dtype must be"):
        EngineConfig(kv_dtype=8)
    assert EngineConfig(kv_dtype="int8").kv_dtype == "int8"


def test_a_backend_that_cannot_read_the_format_is_refused(monkeypatch):
    """Triton reads float8_e4m3fn only on compute capability 8.9+: a pool on an older GPU
    is refused before a byte is allocated, naming what works instead."""
    from pagedkv import ops

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(ops, "resolve", lambda backend, device: "triton")
    with pytest.raises(ValueError, match="compute capability 8.9"):
        ops.check_kv_readable(torch.float8_e4m3fn, torch.device("cuda", 0))
    ops.check_kv_readable(torch.float8_e5m2, torch.device("cuda", 0))  # e5m2 / int8 work
    ops.check_kv_readable(torch.int8, torch.device("cuda", 0))
    ops.check_kv_readable(torch.bfloat16, torch.device("cuda", 0))
