"""KV memory of windowed layers (benchmarks/kv_memory_windows.py): the numbers it reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import kv_memory_windows as kvm  # noqa: E402


def test_gemma3_like_memory_at_16k(tmp_path, capsys):
    assert kvm.main(["--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "kv_memory_windows.json").read_text())["rows"]
    today, grouped, full = rows
    per_token_layer = 2 * 8 * 256 * 2  # K+V x 8 KV heads x 256 dims x bf16
    # 8 global layers need all 16384 tokens, 40 windowed layers their last 1024
    assert today["needed_bytes"] == (8 * 16384 + 40 * 1024) * per_token_layer
    # one table for every layer: all 1024 blocks held in every layer, as full attention
    assert today["held_bytes"] == full["held_bytes"] == 48 * 16384 * per_token_layer
    assert abs(today["ratio"] - 786432 / 172032) < 1e-12  # 4.571
    assert grouped["held_bytes"] == grouped["needed_bytes"]  # the window is block-aligned
    assert "held/needed" in capsys.readouterr().out


def test_unaligned_windows_hold_at_most_one_extra_block_per_layer():
    cfg = kvm.gemma3_like_config(window=1000, layers=12)
    today, grouped, _ = kvm.measure(cfg, context=16000, block_size=16)
    windowed = 10
    extra = grouped.held_bytes - grouped.needed_bytes
    assert 0 < extra <= windowed * 16 * 2 * 8 * 256 * 2
    assert kvm.window_blocks(16000, 1000, 16) == 63  # [15000, 15999]: blocks 937..999
    assert kvm.window_blocks(100, 1000, 16) == 7  # shorter than the window: every block
