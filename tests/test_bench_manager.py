"""The manager benchmark runs from a fresh clone and agrees with the trace's reference."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "benchmarks" / "trace.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_manager  # noqa: E402

# sha256 of the standard trace generator (shared/bench/trace.py) that other engines'
# managers are measured on: the copy must stay verbatim for the numbers to compare.
STANDARD_TRACE_SHA256 = "9b5195db581c0e8954531a63dcb78a6439a5824031474a765227c14c6d5a2b21"


def test_trace_is_a_verbatim_copy_of_the_standard_generator():
    header, body = TRACE.read_bytes().split(b"\n", 1)
    assert header.startswith(b"# A verbatim copy of the standard trace generator")
    assert hashlib.sha256(body).hexdigest() == STANDARD_TRACE_SHA256
    assert bench_manager.DEFAULT_TRACE == TRACE


def test_replay_matches_reference_simulation(tmp_path, capsys):
    args = ["--requests", "800", "--repeat", "1", "--out", str(tmp_path), "--no-plot"]
    assert bench_manager.main(args) == 0
    result = json.loads((tmp_path / "bench_manager.json").read_text())
    ref = result["reference"]
    for row in result["pagedkv"]:
        # Same semantics as the reference pool: same hits and same evictions.
        assert row["hit_tokens"] == ref["hit_tokens"]
        assert row["evictions"] == ref["evicted_blocks"]
        assert row["us_per_free"] > 0
    assert ref["evicted_blocks"] > 0  # the pool was under pressure: eviction order mattered
    out = capsys.readouterr().out
    assert "admitted" in out and "hit rate" in out
    assert not (tmp_path / "bench_manager.png").exists()  # --no-plot


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_manager.main(["--repeat", "0"])
    assert exc.value.code == 2
    assert "--repeat" in capsys.readouterr().err
