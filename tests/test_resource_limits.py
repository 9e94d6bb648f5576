"""Oversized pools, managers and tiers, and missing devices, fail fast and cleanly.

Each must raise :class:`ResourceError` (a ``PagedKVError`` and a ``ValueError``)
naming the argument, the bytes asked for and the bytes available, before anything
is allocated, in well under a second. Sizes are derived from what this machine
reports free, so every request here is larger than the machine whatever it is.
"""

from __future__ import annotations

import random
import re
import time
import tracemalloc

import pytest
import torch
import transformers
from typer.testing import CliRunner

from pagedkv import BlockManager, KVCache, KVLayout, KVPool, PagedKVError, ResourceError, _resources
from pagedkv.tiers import CPUTier, DiskTier, TieredStore

BIG_LAYOUT = KVLayout(32, 8, 128, 16, torch.bfloat16)  # 2 MiB a block
SMALL_LAYOUT = KVLayout(1, 1, 4, 4, torch.float32)


def host_free() -> int:
    return _resources.available_host_bytes().bytes


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def refused(make, *patterns: str) -> ResourceError:
    """Run ``make()``; it must raise ResourceError matching every pattern, fast, allocating
    nothing (Python heap and process RSS stay flat)."""
    rss = rss_bytes()
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ResourceError) as info:
            make()
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0, f"took {elapsed:.2f}s to refuse"
    assert peak < 4 << 20, f"allocated {peak} bytes of Python objects before refusing"
    assert rss_bytes() - rss < 64 << 20, "resident memory jumped before refusing"
    err = info.value
    assert isinstance(err, PagedKVError) and isinstance(err, ValueError)
    for p in patterns:
        assert re.search(p, str(err)), f"{p!r} not in {err}"
    return err


# Every message names the argument, the bytes asked for and the bytes available.
ASKED = r"needs [0-9.]+ [KMGTP]iB \((\d+) bytes\)"
AVAILABLE = r"only [0-9.]+ [KMGTP]iB \((\d+) bytes\) is available"


def test_huge_block_manager_is_refused_before_allocating():
    per_block = BlockManager.bookkeeping_bytes(1, 16)
    n = max(10**9, 2 * host_free() // per_block + 1)
    err = refused(lambda: BlockManager(n, 16), f"BlockManager: num_blocks={n} ", ASKED, AVAILABLE)
    asked = int(re.search(ASKED, str(err)).group(1))
    assert asked == BlockManager.bookkeeping_bytes(n, 16) and asked > host_free()
    assert "pass a smaller num_blocks (at most" in str(err)


def test_huge_kvcache_pool_is_refused_before_the_manager_allocates():
    n = max(10**6, 2 * host_free() // BIG_LAYOUT.bytes_per_block + 1)
    refused(lambda: KVCache(BIG_LAYOUT, n), f"KVCache: num_blocks={n} ", ASKED, AVAILABLE, "pool")
    refused(lambda: KVPool(BIG_LAYOUT, n), f"KVPool: num_blocks={n} ", ASKED, AVAILABLE)


def test_huge_cpu_tier_is_refused():
    capacity = max(32 << 30, 2 * host_free())
    refused(lambda: CPUTier(capacity), f"CPUTier: capacity_bytes={capacity} ", ASKED, AVAILABLE)


def test_cpu_tier_is_checked_again_when_opened(monkeypatch):
    tier = CPUTier(128 << 20)  # fits now; memory goes before the tier is opened
    monkeypatch.setattr(_resources, "available_host_bytes", lambda: _fake(64 << 20))
    refused(lambda: TieredStore([tier], SMALL_LAYOUT, "fp"), "CPUTier: capacity_bytes=134217728")


def _fake(n: int) -> _resources.Available:
    return _resources.Available(n, "test")


def test_message_states_exact_numbers(monkeypatch):
    monkeypatch.setattr(_resources, "available_host_bytes", lambda: _fake(1 << 30))
    layout = KVLayout(1, 1, 256, 16, torch.float32)  # 32 KiB a block
    err = refused(lambda: KVPool(layout, 65536))  # 2 GiB
    assert str(err) == (
        "KVPool: num_blocks=65536 needs 2.0 GiB (2147483648 bytes) of host memory "
        "(32768 bytes per block), but only 1.0 GiB (1073741824 bytes) is available (test); "
        "pass a smaller num_blocks (at most 32768 fit now)"
    )


def test_kvcache_adds_pool_bookkeeping_and_cpu_tiers(monkeypatch):
    """Each part fits alone; together they do not: refused before any is allocated."""
    monkeypatch.setattr(_resources, "available_host_bytes", lambda: _fake(256 << 20))
    layout = KVLayout(1, 1, 256, 16, torch.float32)
    tier = CPUTier(150 << 20)
    n = (150 << 20) // layout.bytes_per_block
    err = refused(lambda: KVCache(layout, n, tiers=[tier]), "pool", "block bookkeeping")
    assert "CPU tiers 150.0 MiB" in str(err)


def test_requests_that_fit_are_not_refused():
    cache = KVCache(SMALL_LAYOUT, 64, tiers=[CPUTier(1 << 20)])
    cache.allocate("a", list(range(9)))
    cache.check_integrity()
    cache.close()
    BlockManager(1 << 20, 16)  # 1M blocks: ~0.4 GiB at full use, fits any test machine


def test_disk_tier_larger_than_its_file_system_is_refused(tmp_path):
    import shutil

    total = shutil.disk_usage(tmp_path).total
    err = refused(lambda: DiskTier(tmp_path / "t", total + 1), f"capacity_bytes={total + 1}")
    assert "in all" in str(err) and "free" in str(err)


def test_cuda_device_that_does_not_exist_is_a_clear_error():
    if torch.cuda.is_available():
        bad = f"cuda:{torch.cuda.device_count()}"
        why = "there is no CUDA device"
    else:
        bad, why = "cuda", "asks for CUDA but this torch .* is built without CUDA"
    for make in (
        lambda: KVPool(SMALL_LAYOUT, 4, bad),
        lambda: KVCache(SMALL_LAYOUT, 4, device=bad),
        lambda: _resources.resolve_device(bad),
    ):
        refused(make, re.escape(f"device={bad!r}"), why)


def test_bad_device_values():
    with pytest.raises(ValueError, match="not a torch device"):
        KVPool(SMALL_LAYOUT, 4, "cdua")
    with pytest.raises(TypeError, match="device must be a str"):
        KVPool(SMALL_LAYOUT, 4, 1.5)
    assert _resources.resolve_device("cpu") == torch.device("cpu")
    assert _resources.resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cli_generate_on_a_missing_cuda_is_one_line(tmp_path):
    from pagedkv.cli import app

    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64,
    )  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    # cuda:99 exists on no machine (a CPU-only one has no CUDA at all)
    args = ["generate", "--model", str(tmp_path), "--device", "cuda:99", "hi"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert "CUDA" in result.output and len(result.output.strip().splitlines()) <= 2


@pytest.mark.gpu
def test_pool_larger_than_free_gpu_memory_is_refused_without_allocating():
    dev = torch.device("cuda")
    free = _resources.free_device_bytes(dev).bytes
    n = 2 * free // BIG_LAYOUT.bytes_per_block + 1
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated(dev)
    for make in (
        lambda: KVPool(BIG_LAYOUT, n, "cuda"),
        lambda: KVCache(BIG_LAYOUT, n, device="cuda"),
    ):
        err = refused(make, f"num_blocks={n} ", ASKED, AVAILABLE, "of cuda memory")
        assert "free on cuda" in str(err)
    assert torch.cuda.memory_allocated(dev) == allocated
    pool = KVPool(BIG_LAYOUT, 8, "cuda")  # a pool that fits is still made
    assert pool.kv.is_cuda and pool.nbytes == 8 * BIG_LAYOUT.bytes_per_block


@pytest.mark.gpu
def test_pinned_cpu_tier_message_says_pinned():
    capacity = 2 * host_free()
    refused(lambda: CPUTier(capacity), "of pinned host memory")


# -- the probes themselves ----------------------------------------------------------------


def _write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit_minus_unreclaimable_usage(tmp_path):
    leaf = tmp_path / "user.slice" / "job"
    _write(leaf / "memory.max", "max\n")  # no limit here ...
    _write(tmp_path / "user.slice" / "memory.max", f"{8 << 30}\n")  # ... but on the parent
    _write(tmp_path / "user.slice" / "memory.current", f"{3 << 30}\n")
    _write(tmp_path / "user.slice" / "memory.stat", f"anon 1\ninactive_file {1 << 30}\n")
    got = _resources._cgroup_available("0::/user.slice/job\n", str(tmp_path))
    assert got.bytes == (8 << 30) - (2 << 30) and "memory.max" in got.source


def test_cgroup_v1_and_no_limit(tmp_path):
    mem = tmp_path / "memory"
    _write(mem / "memory.limit_in_bytes", "9223372036854771712\n")  # v1 "unlimited"
    _write(mem / "docker" / "c1" / "memory.limit_in_bytes", f"{4 << 30}\n")
    _write(mem / "docker" / "c1" / "memory.usage_in_bytes", f"{1 << 30}\n")
    text = "12:cpu,cpuacct:/docker/c1\n4:memory:/docker/c1\n0::/\n"
    got = _resources._cgroup_available(text, str(tmp_path))
    assert got.bytes == 3 << 30
    assert _resources._cgroup_available("4:memory:/\n", str(tmp_path)) is None
    assert _resources._cgroup_available("", str(tmp_path)) is None
    # a namespaced path that does not exist under the mount: its root is our cgroup
    _write(mem / "memory.limit_in_bytes", f"{2 << 30}\n")
    _write(mem / "memory.usage_in_bytes", f"{1 << 29}\n")
    got = _resources._cgroup_available("4:memory:/elsewhere/x\n", str(tmp_path))
    assert got.bytes == (2 << 30) - (1 << 29)


def test_small_requests_are_not_probed(monkeypatch):
    def boom():
        raise AssertionError("probed")

    monkeypatch.setattr(_resources, "available_host_bytes", boom)
    BlockManager(1024, 16)
    KVPool(SMALL_LAYOUT, 16)
    CPUTier(1 << 20)


def test_bookkeeping_estimate_matches_a_measured_manager():
    """The per-block figure the manager is refused by is what a full manager holds."""
    n, bs = 8192, 16
    rng = random.Random(0)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        m = BlockManager(n, bs)
        eager = tracemalloc.get_traced_memory()[0] - base
        for i in range(n // 64):
            m.allocate(i, [rng.randrange(50_000) for _ in range(64 * bs)])
        full = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert m.num_free_blocks == 0
    estimate = BlockManager.bookkeeping_bytes(n, bs)
    assert eager < estimate
    assert abs(full - estimate) < 0.1 * estimate, (full, estimate)
