"""A KVCache with tiers that is never closed: the interpreter still exits cleanly.

The write-back thread used to be left storing blocks while the interpreter tore down
(executors refusing work, then ``terminate called without an active exception``: exit
code 134). Each test runs a child process that demotes blocks and exits without
``close()``, then checks the exit code and every entry the disk tier holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pagedkv.stores.framing import unpack

SRC = str(Path(__file__).resolve().parents[1] / "src")

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from pagedkv import CPUTier, DiskTier, KVCache
    from pagedkv.storage import KVLayout
    from pagedkv.stores import DiskStore
    from pagedkv.tiers import chain

    path, delay, flush_s, device = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    chain.AT_EXIT_FLUSH_SECONDS = flush_s
    real_put = DiskStore.put_many

    def slow_put(self, items):  # a slow disk: write-backs are still pending at exit
        time.sleep(delay)
        return real_put(self, items)

    DiskStore.put_many = slow_put
    layout = KVLayout(4, 4, 64, 16, torch.float32)  # 128 KiB blocks
    bpb = layout.bytes_per_block
    cache = KVCache(layout, 8, device=device, tiers=[CPUTier(2 * bpb), DiskTier(path, 1 << 30)])
    for i in range(40):
        cache.allocate(i, list(range(i * 1000, i * 1000 + 65)))  # 4 full blocks + 1 token
        cache.free(i)
    tiers = cache.tiers
    print(json.dumps({
        "demoted": tiers.stats()["demoted"],
        "pending": len(tiers._writer),
        "cpu_blocks": tiers.levels[0].capacity_blocks,
        "fingerprint": tiers._frame_fp,
        "block_bytes": bpb,
    }), flush=True)
    # no cache.close(): the interpreter exits with write-backs pending
    """
)


def _exit_without_close(tmp_path: Path, delay: float, flush_s: float, device: str = "cpu"):
    disk = tmp_path / "disk"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(disk), str(delay), str(flush_s), device],
        env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stderr[-3000:]}"
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["pending"] > 0, "the test must exit with write-backs still pending"
    files = [p for p in disk.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.startswith(".pagedkv-tmp-")]
    entries = [p for p in files if p.suffix == ".v"]
    for p in entries:  # no partial entry: every one is whole and verifies
        payload = unpack(p.read_bytes(), fingerprint=info["fingerprint"])
        assert payload is not None and len(payload) == info["block_bytes"], p
    return info, entries, proc.stderr


def test_exit_without_close_stores_pending_blocks(tmp_path):
    info, entries, stderr = _exit_without_close(tmp_path, delay=0.01, flush_s=30.0)
    # everything demoted reached a tier: the CPU tier's last blocks, the rest on disk
    assert len(entries) == info["demoted"] - info["cpu_blocks"]
    assert "Traceback" not in stderr and "could not be stored" not in stderr


@pytest.mark.gpu
def test_exit_without_close_on_cuda(tmp_path):
    # the writer waits on the copy stream's events and pinned rows while exiting
    info, entries, stderr = _exit_without_close(tmp_path, delay=0.01, flush_s=30.0, device="cuda")
    assert len(entries) == info["demoted"] - info["cpu_blocks"]
    assert "Traceback" not in stderr


def test_exit_without_close_drops_what_cannot_be_stored_in_time_and_warns(tmp_path):
    info, entries, stderr = _exit_without_close(tmp_path, delay=0.3, flush_s=0.2)
    assert len(entries) < info["demoted"] - info["cpu_blocks"]
    assert "could not be stored in the tiers before exit" in stderr
    assert stderr.count("could not be stored") == 1  # warned once
    assert "Traceback" not in stderr


def test_exit_hook_keeps_nothing_alive_and_close_removes_it(tmp_path, monkeypatch):
    import atexit
    import gc
    import weakref

    import torch

    from pagedkv.storage import KVLayout, KVPool
    from pagedkv.tiers import CPUTier, DiskTier, TieredStore

    layout = KVLayout(2, 2, 8, 4, torch.float32)
    pool = KVPool(layout, 8)
    registered, unregistered = [], []
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setattr(atexit, "unregister", unregistered.append)

    def make() -> TieredStore:
        ts = TieredStore([CPUTier(4 * layout.bytes_per_block), DiskTier(tmp_path, 1 << 20)],
                         layout, "fp")  # fmt: skip
        ts.attach(pool)
        return ts

    dropped = make()
    ref = weakref.ref(dropped)
    del dropped
    gc.collect()
    assert ref() is None  # the hook holds the chain weakly: an unused one is collected
    assert unregistered == registered  # and is unregistered with it

    closed = make()
    assert registered[-1] is closed._exit_hook
    closed.close()
    assert unregistered[-1] is registered[-1]  # close() unregistered the hook
    registered[-1]()  # a hook that outlives its chain's close is a no-op
    closed.close()  # idempotent
    assert len(unregistered) == 2
