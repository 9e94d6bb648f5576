"""First-run conversion of the default model: one converter at a time, nothing left behind.

The conversion itself is replaced by a tiny fake (``convert_gguf``) so these tests take
seconds; the real GGUF conversion runs in test_engine_smollm2.py / test_cli.py. Every
test uses its own ``PAGEDKV_CACHE_DIR``: the real cache is never touched.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pagedkv.engine import model_loader
from pagedkv.stores.atomic import host_id

SRC = str(Path(__file__).resolve().parents[1] / "src")
NAME = model_loader.DEFAULT_MODEL_NAME


def fake_convert(gguf: Path, out: Path) -> None:
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"weights")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("PAGEDKV_CACHE_DIR", str(root))
    monkeypatch.setattr(model_loader, "default_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(model_loader, "convert_gguf", fake_convert)
    return root


def temp_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".pagedkv-tmp-"))


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


def test_converts_once_and_logs(cache, caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="pagedkv.engine.model_loader"):
        target = model_loader.default_model_dir()
    assert target == cache / NAME
    assert (target / "config.json").read_text() == "{}"
    assert temp_dirs(cache) == []
    messages = [r.getMessage() for r in caplog.records]
    assert any("converting" in m for m in messages) and any("converted" in m for m in messages)
    calls = []
    monkeypatch.setattr(model_loader, "convert_gguf", lambda g, o: calls.append(o))
    assert model_loader.default_model_dir() == target and calls == []  # no second conversion


def test_interrupted_conversion_leaves_no_temp_dir(cache, monkeypatch):
    def interrupted(gguf: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half of the weights")
        raise KeyboardInterrupt  # Ctrl-C in the middle

    monkeypatch.setattr(model_loader, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model_loader.default_model_dir()
    assert temp_dirs(cache) == [] and not (cache / NAME).exists()
    monkeypatch.setattr(model_loader, "convert_gguf", fake_convert)
    assert (model_loader.default_model_dir() / "config.json").exists()  # the lock was released


def test_stale_temp_dirs_of_dead_processes_are_removed_nothing_else(cache, caplog, tmp_path):
    cache.mkdir(parents=True)
    host, dead = host_id(), _dead_pid()
    stale = cache / f".pagedkv-tmp-{host}-{dead}-0123456789ab"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "model.safetensors").write_bytes(b"x" * 1000)
    other = "0" * 8 if host != "0" * 8 else "1" * 8
    kept = {
        f".pagedkv-tmp-{host}-{os.getpid()}-0123456789ab": "dir",  # a live converter
        f".pagedkv-tmp-{other}-{dead}-0123456789ab": "dir",  # another host: cannot check
        f".pagedkv-tmp-{host}-{dead}-0123456789ac": "file",  # not a directory
        f".pagedkv-tmp-{host}-{dead}-0123456789ad": "link",  # a symlink to a folder
        f"{NAME}.tmp{dead}": "dir",  # an older version's name: not provably ours
        "notes.tmp": "dir",
        "mine": "dir",
    }
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep me")
    for name, kind in kept.items():
        if kind == "dir":
            (cache / name).mkdir()
            (cache / name / "f").write_bytes(b"keep")
        elif kind == "file":
            (cache / name).write_bytes(b"keep")
        else:
            os.symlink(outside, cache / name)
    with caplog.at_level(logging.INFO, logger="pagedkv.engine.model_loader"):
        model_loader.default_model_dir()
    assert not stale.exists()
    assert sorted(p.name for p in cache.iterdir()) == sorted([*kept, NAME, f"{NAME}.lock"])
    assert (outside / "precious").read_bytes() == b"keep me"
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "removed 1 temp directories" in messages
    assert f"{NAME}.tmp{dead}" in messages  # pointed out, not deleted
    # at a later start too (the model already converted), a dead converter's dir goes
    stale.mkdir()
    model_loader.default_model_dir()
    assert not stale.exists()


CONVERTER = textwrap.dedent(
    """
    import logging, os, sys, time
    from pathlib import Path
    from pagedkv.engine import model_loader

    events, release = Path(sys.argv[1]), Path(sys.argv[2])
    logging.basicConfig(filename=sys.argv[3], level=logging.INFO, format="%(message)s")

    def note(what):
        with open(events, "a") as f:
            f.write(f"{what} {os.getpid()}\\n")

    def slow_convert(gguf, out):
        note("start")
        deadline = time.monotonic() + 60
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")
        note("end")

    model_loader.convert_gguf = slow_convert
    model_loader.default_gguf = lambda: Path("/nonexistent/fake.gguf")
    print(model_loader.default_model_dir(), flush=True)
    """
)


def _wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_two_first_runs_convert_once(tmp_path):
    root = tmp_path / "cache"
    events, release = tmp_path / "events", tmp_path / "release"
    env = {**os.environ, "PYTHONPATH": SRC, "PAGEDKV_CACHE_DIR": str(root)}

    def start(i: int) -> subprocess.Popen:
        log = str(tmp_path / f"log{i}")
        args = [sys.executable, "-c", CONVERTER, str(events), str(release), log]
        pipe = subprocess.PIPE
        return subprocess.Popen(args, env=env, stdout=pipe, stderr=pipe, text=True)

    procs = [start(0), start(1)]  # at once: whichever locks first converts
    try:
        _wait_for(lambda: "start" in _read(events), "a converter to start")
        # the other must be waiting on the lock while the first converts
        _wait_for(lambda: any("waiting" in _read(tmp_path / f"log{i}") for i in (0, 1)),
                  "the other to wait")  # fmt: skip
        release.touch()
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        release.touch()
        for p in procs:
            p.kill()
    first, second = procs
    assert [p.returncode for p in (first, second)] == [0, 0], [e for _, e in outs]
    assert [o.strip() for o, _ in outs] == [str(root / NAME)] * 2
    lines = events.read_text().split()
    assert lines.count("start") == 1 and lines.count("end") == 1  # converted once
    assert temp_dirs(root) == []


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""
