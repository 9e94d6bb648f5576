"""benchmarks/bench_invariance.py runs on CPU with --tiny: the invariant engine gives one
completion for one prompt + seed over rounds of every cache state, and the 32-prompt
columns and the cost come out in its JSON (the GPU run is benchmarks/gpu_invariance.sh)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_invariance  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


def test_tiny_run_gives_one_completion_in_every_cache_state(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    argv = ["--tiny", "--runs", "16", "--default-runs", "4", "--max-batch", "8",
            "--parts", "runs,cost", "--out", str(tmp_path)]  # fmt: skip
    assert bench_invariance.main(argv) == 0
    res = json.loads((tmp_path / "bench_invariance.json").read_text())
    inv = res["runs"]["invariant"]
    assert inv["complete"] and inv["runs"] >= 16 and inv["unique_completions"] == 1
    assert set(inv["by_state"]) == {"cold", "device", "tier", "snapshot"}, inv["by_state"]
    assert inv["num_differing"] == 0 and res["runs"]["default"]["runs"] >= 4
    cost = res["cost"]
    for w in ("a", "b"):
        assert cost["default"][w]["tok_s"] > 0 and cost["invariant"][w]["tok_s"] > 0
    out = capsys.readouterr().out
    assert "unique completions" in out and "slowdown" in out
