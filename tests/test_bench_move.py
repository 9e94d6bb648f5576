"""The move benchmark runs (two CPU members, a few blocks) and checks its moves bit-exact;
its sweep of cpu<->cuda configurations is what the GPU run picks the staging from."""

from __future__ import annotations

import argparse
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
        assert (r["blocks"], r["route"], r["peer"], r["ok"], r["staging"]) == (
            3, "host", "-", "-", "-"
        )  # fmt: skip
        assert r["move_GBps"] > 0 and r["contiguous_GBps"] > 0
    assert result["best"] == rows  # one configuration per direction
    out = capsys.readouterr().out
    assert "contiguous copy" in out and "best configuration" in out


def test_the_sweep_covers_the_locked_ways_and_every_host_setting():
    args = argparse.Namespace(staging=["kernel", "direct", "host"], threads=[1, 4], chunks=[16, 64])
    got = [
        (c["staging"], c["host_threads"], c["chunk_mib"]) for c in bench_move.configs("h2d", args)
    ]
    assert got == [
        ("kernel", 1, 64), ("direct", 1, 64),
        ("host", 1, 16), ("host", 1, 64), ("host", 4, 16), ("host", 4, 64),
    ]  # fmt: skip
    assert [c["staging"] for c in bench_move.configs("peer", args)] == ["auto"]


def test_pairs_take_each_pair_of_devices_once():
    names, devices = ["cpu", "cuda:0#0", "cuda:0#1"], ["cpu", "cuda:0", "cuda:0"]
    assert bench_move.pairs_of(names, devices) == [("cpu", "cuda:0#0"), ("cuda:0#0", "cuda:0#1")]


def test_best_rows_pick_the_fastest_configuration():
    rows = [
        {"from": "cpu", "to": "cuda:0", "MiB": 8, "ratio": 0.5, "staging": "host"},
        {"from": "cpu", "to": "cuda:0", "MiB": 8, "ratio": 0.9, "staging": "direct"},
        {"from": "cuda:0", "to": "cpu", "MiB": 8, "ratio": 0.7, "staging": "host"},
    ]
    assert [r["staging"] for r in bench_move.best_rows(rows)] == ["direct", "host"]
