"""The migration benchmark runs on two CPU engines (a few tiny requests): every request,
migrated or not, token-identical to the run where nothing moves, and its numbers written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_migrate  # noqa: E402


@pytest.mark.slow
def test_bench_migrate_runs_on_two_cpu_engines(tmp_path, capsys, monkeypatch, single_thread):
    monkeypatch.delenv("OUT", raising=False)
    out = tmp_path / "migrate.json"
    argv = ["--pairs", "cpu>cpu", "--move", "2", "--requests", "4", "--requests-b", "2",
            "--prompt", "12", "--new-tokens", "12", "--warm", "1", "--block-size", "4",
            "--out", str(out)]  # fmt: skip
    bench_migrate.main(argv)  # raises SystemExit if a token differs
    (row,) = json.loads(out.read_text())["pairs"]
    assert (row["pair"], row["move"], row["route"], row["identity_expected"]) == (
        "cpu>cpu", 2, "host", True
    )  # fmt: skip
    assert row["moved_identical"] == 2 and row["others_identical"] == row["others"] == 4
    assert row["blocks_background"] + row["blocks_final"] > 0 and row["pause_ms_max"] > 0
    assert row["tok_s_without"] > 0 and row["tok_s_during"] > 0
    assert "pause ms" in capsys.readouterr().out
