"""What the KV-memory reports (kv_memory_released.py, kv_memory_windows.py) share: their
command line and where their JSON goes."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def parse_args(doc: str, argv: list[str] | None, context: int, window: int) -> argparse.Namespace:
    """``--context``, ``--window`` (defaults given), ``--block-size`` (16) and ``--out``
    (benchmarks/out); the description is ``doc``'s first line."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--context", type=int, default=context)
    ap.add_argument("--window", type=int, default=window)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=OUT)
    return ap.parse_args(argv)


def write_json(result: dict, out: Path, name: str) -> None:
    """``result`` as ``name`` in ``out`` and, when set, in ``$OUT`` (the GPU machine's)."""
    for d in [out] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else []):
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(json.dumps(result, indent=2))
