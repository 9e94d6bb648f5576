"""The manager benchmark runs and agrees with the trace's reference simulation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared" / "bench" / "trace.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_manager  # noqa: E402


@pytest.mark.skipif(not TRACE.exists(), reason="shared/bench/trace.py is not beside the checkout")
def test_replay_matches_reference_simulation(tmp_path, capsys):
    assert bench_manager.main(["--requests", "800", "--repeat", "1", "--out", str(tmp_path)]) == 0
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
