"""Measures for bench_e2e.py: first and steady runs, the physical floor of a workload, a
per-step device/host breakdown, and the same pagedkv runs on an older source tree.

The floor is the time decode would take if every step only streamed its bytes from
memory at the measured copy bandwidth: the weights once per step plus the KV every row
attends (``floor_no_sharing``), or with a shared prefix read once per step
(``floor_shared``, workload (a)). Prefill (compute bound) is not in it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def copy_bandwidth(dev: torch.device, nbytes: int | None = None, repeat: int = 5) -> float:
    """Bytes per second a device-to-device copy moves (read + write counted), best of
    ``repeat``: the practical memory bandwidth the floor divides by."""
    nbytes = nbytes or (2**30 if dev.type == "cuda" else 2**26)
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).fill_(1.0)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(repeat):
        sync(dev)
        t = time.perf_counter()
        b.copy_(a)
        sync(dev)
        best = min(best, time.perf_counter() - t)
    del a, b
    return 2 * nbytes / best


def floor(
    model, *, n_req: int, prefix: int, unique: int, new: int, shared: bool, bandwidth: float
) -> dict:
    """Decode floor of a workload of ``n_req`` prompts of ``prefix + unique`` tokens and
    ``new`` generated tokens each, all rows in one batch (see the module doc)."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elt = next(model.parameters()).element_size()
    kv_tok = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elt
    plain = with_sharing = 0.0
    for t in range(1, new):  # decode steps: token 0 comes from the prefill
        plain += weights + n_req * (prefix + unique + t) * kv_tok
        own = n_req * (unique + t) + prefix if shared else n_req * (prefix + unique + t)
        with_sharing += weights + own * kv_tok
    gen = n_req * new
    steps = max(1, new - 1)
    out = dict(
        bandwidth_GBps=round(bandwidth / 1e9, 1), weights_GB=round(weights / 1e9, 3),
        bytes_per_step_GB=round(plain / steps / 1e9, 3),
        floor_no_sharing_s=round(plain / bandwidth, 4),
        floor_no_sharing_tok_per_s=round(gen / (plain / bandwidth), 1),
    )  # fmt: skip
    if shared:
        out.update(
            bytes_per_step_shared_GB=round(with_sharing / steps / 1e9, 3),
            floor_shared_s=round(with_sharing / bandwidth, 4),
            floor_shared_tok_per_s=round(gen / (with_sharing / bandwidth), 1),
        )
    return out


def timed_runs(run: Callable[[], object], dev: torch.device, repeat: int) -> dict:
    """``run()`` 1 + ``repeat`` times: the first timed run and the median of the rest
    (steady state). Returns walls and the last run's result under ``"result"``."""
    walls, result = [], None
    for _ in range(1 + repeat):
        sync(dev)
        t = time.perf_counter()
        result = run()
        sync(dev)
        walls.append(time.perf_counter() - t)
    steady = statistics.median(walls[1:]) if repeat else walls[0]
    return dict(first_s=round(walls[0], 4), steady_s=round(steady, 4),
                walls_s=[round(w, 4) for w in walls], result=result)  # fmt: skip


def device_breakdown(run: Callable[[], object], dev: torch.device, steps: Callable[[], int]):
    """Profile one ``run()``: device busy seconds (kernel time summed, CUDA only), wall
    seconds under the profiler and the engine steps it took, per step. ``steps()``
    reads the engine's step counter."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    s0 = steps()
    sync(dev)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        run()
        sync(dev)
    wall = time.perf_counter() - t
    n = max(1, steps() - s0)
    busy = None
    if dev.type == "cuda":
        events = prof.key_averages()
        us = sum(e.self_device_time_total for e in events if e.device_type.name != "CPU")
        busy = us / 1e6 if us > 0 else None
    return dict(
        profiled_wall_s=round(wall, 4), steps=n, step_ms=round(1e3 * wall / n, 3),
        device_busy_s=None if busy is None else round(busy, 4),
        device_ms_per_step=None if busy is None else round(1e3 * busy / n, 3),
        host_or_idle_ms_per_step=None if busy is None else round(1e3 * (wall - busy) / n, 3),
        device_busy_pct=None if busy is None else round(100 * busy / wall, 1),
    )  # fmt: skip


def run_baseline(src: str, argv: list[str], timeout: float | None = None) -> dict:
    """This script's pagedkv runs (``--plan pk``) with ``src`` (an older ``src/`` tree)
    first on the import path, in a subprocess; its result JSON (or an error)."""
    src_dir = Path(src).resolve()
    if not (src_dir / "pagedkv" / "__init__.py").is_file():
        return dict(error=f"--baseline-src {src}: no pagedkv/__init__.py under it")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "baseline.json"
        cmd = [sys.executable, str(Path(__file__).with_name("bench_e2e.py")), *argv,
               "--plan", "pk", "--out", str(out), "--quiet"]  # fmt: skip
        env = dict(os.environ, PAGEDKV_BENCH_SRC=str(src_dir))
        env.pop("OUT", None)  # the child writes only its temporary file
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(error=f"baseline run timed out after {timeout} s")
        if not out.is_file():
            return dict(error=f"baseline run failed (rc {proc.returncode})",
                        stderr=proc.stderr[-3000:], stdout=proc.stdout[-2000:])  # fmt: skip
        return json.loads(out.read_text())


def strip_baseline_args(argv: list[str]) -> list[str]:
    """``argv`` without ``--baseline-src DIR`` / ``--plan X`` / ``--out X`` (and their
    ``=`` forms): what the baseline child is given besides its own."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in ("--baseline-src", "--plan", "--out", "--baseline-timeout"):
            skip = "=" not in a
            continue
        out.append(a)
    return out
