"""DiskStore crash safety: a writer killed with SIGKILL never leaves a readable partial entry."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

from pagedkv.stores import DiskStore

CAPACITY = 12 << 20

# The writer stores value(key) under key, over and over (replacing, evicting, deleting),
# so any entry the survivor lists can be checked against value(key).
WRITER = textwrap.dedent(
    """
    import hashlib, random, sys
    from pagedkv.stores import DiskStore

    def value(key):
        size = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % (1 << 20) + 1
        return hashlib.shake_256(key.encode()).digest(size)

    values = {f"e{i:03d}": value(f"e{i:03d}") for i in range(30)}  # time goes to writes
    store = DiskStore(sys.argv[1], int(sys.argv[2]))
    rng = random.Random(int(sys.argv[3]))
    print("ready", flush=True)
    while True:
        keys = [f"e{rng.randrange(30):03d}" for _ in range(rng.randint(1, 3))]
        store.put_many([(k, values[k]) for k in keys])
        if rng.random() < 0.1:
            store.delete_many([f"e{rng.randrange(30):03d}"])
    """
)


def value(key: str) -> bytes:
    size = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % (1 << 20) + 1
    return hashlib.shake_256(key.encode()).digest(size)


def temp_files(root: str) -> list[str]:
    return [
        os.path.join(d, f)
        for d, _, files in os.walk(root)
        for f in files
        if f.startswith(".pagedkv-tmp-")
    ]


def test_sigkilled_writer_leaves_only_whole_entries(tmp_path):
    root = str(tmp_path / "store")
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(src), env.get("PYTHONPATH", "")])
    rng = random.Random(1234)
    seen_temp = 0
    trial = 0
    # At least 6 trials; more (up to 30) until one kill landed mid-write: whether the
    # kill beats the writer's rename is a race, lost more often on a loaded machine.
    while trial < 6 or (seen_temp == 0 and trial < 30):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, root, str(CAPACITY), str(trial)],
            stdout=subprocess.PIPE,
            env=env,
        )
        try:
            assert proc.stdout.readline().strip() == b"ready"
            time.sleep(rng.uniform(0.02, 0.4))
            # odd trials: kill at the first sight of a temp file, i.e. mid-write
            deadline = time.monotonic() + 2.0
            while trial % 2 and not temp_files(root) and time.monotonic() < deadline:
                pass
            assert proc.poll() is None, "the writer stopped by itself"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        seen_temp += len(temp_files(root)) > 0

        store = DiskStore(root, CAPACITY)
        listed = sorted(store.keys())
        assert all("pagedkv-tmp" not in k for k in listed)
        assert temp_files(root) == [], "open must remove a dead writer's temp files"
        got = store.get_many(listed)
        for key, data in zip(listed, got):
            assert data is not None, f"trial {trial}: {key} listed but unreadable"
            assert data == value(key), f"trial {trial}: {key} has {len(data)} bytes, not its value"
        assert store.stats().entries == len(listed)
        store.check_integrity()
        store.close()
        trial += 1
    assert len(listed) > 0
    assert seen_temp > 0, "no trial killed the writer in the middle of a write"
