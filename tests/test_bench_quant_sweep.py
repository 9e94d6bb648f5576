"""The quantized-decode sweep (benchmarks/bench_quant_sweep.py) in its CPU mode: every
variant runs through the Triton interpreter, is checked against the bf16 kernel over the
dequantized KV, a config that cannot compile is reported without stopping the run, the
best config is printed as the QUANT_CONFIGS line, and the JSON is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

pytest.importorskip("triton")

import bench_quant_sweep  # noqa: E402


def test_sweep_quick_mode_checks_every_variant(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LIMIT", "600")
    configs = [dict(form=f, BLOCK_N=32, num_warps=4, num_stages=1) for f in ("dot16", "fma")]
    configs.append(dict(form="dot", BLOCK_N=24, num_warps=4, num_stages=1))  # not a power of 2
    argv = ["--quick", "--shapes", "2x40:smol", "--formats", "fp8,int8",
            "--configs", json.dumps(configs), "--out", str(tmp_path)]  # fmt: skip
    res = bench_quant_sweep.main(argv)
    assert json.loads((tmp_path / "bench_quant_sweep.json").read_text())["shapes"]
    (shape,) = res["shapes"]
    assert (shape["B"], shape["L"], shape["hq"], shape["hkv"], shape["d"]) == (2, 40, 9, 3, 64)
    assert shape["bf16_s"] > 0 and shape["copy_half_bytes_s"] > 0
    for fmt in ("fp8", "int8"):
        rows = shape["formats"][fmt]["rows"]
        timed = [r for r in rows if "t_s" in r]
        # the default config, then the two valid ones (and their other split sizings)
        assert {r["cfg"]["form"] for r in timed} >= {"dot16", "fma"}
        assert sum(r["default"] for r in timed) == 1
        for r in timed:
            assert r["rel_err"] < 2e-2, (fmt, r["config"], r["rel_err"])
        (bad,) = [r for r in rows if "error" in r]
        assert bad["cfg"]["BLOCK_N"] == 24
        assert res["best"][fmt]["cfg"]["BLOCK_N"] != 24
    out = capsys.readouterr().out
    assert "FAILED" in out and '"fp8": dict(BLOCK_N=' in out and '"int8": dict(' in out


def test_sweep_stops_before_its_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("LIMIT", "0")
    res = bench_quant_sweep.main(["--quick", "--shapes", "2x40:smol", "--out", str(tmp_path)])
    assert res["shapes"] == [] and res["skipped"] == ["B=2 L=40 smol: out of time"]
    assert (tmp_path / "bench_quant_sweep.json").exists()
