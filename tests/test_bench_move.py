"""The move benchmark runs (two CPU members, a few blocks) and checks its moves bit-exact."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_move  # noqa: E402


def test_bench_move_runs_on_two_cpu_members(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    argv = ["--devices", "cpu,cpu", "--sizes-mib", "6", "--repeat", "1", "--out", str(tmp_path)]
    assert bench_move.main(argv) == 0
    result = json.loads((tmp_path / "move.json").read_text())
    rows = result["rows"]
    assert [(r["from"], r["to"]) for r in rows] == [("cpu#0", "cpu#1"), ("cpu#1", "cpu#0")]
    for r in rows:
        assert (r["blocks"], r["route"], r["peer"], r["ok"]) == (3, "host", "-", "-")
        assert r["move_GBps"] > 0 and r["contiguous_GBps"] > 0
    assert "contiguous copy" in capsys.readouterr().out
