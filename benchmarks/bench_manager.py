"""Replay the standard block-manager trace (shared/bench/trace.py) through BlockManager.

Prints µs per admitted block (allocate incl. prefix lookup and hashing), per append
and per free, the prefix hit rate and evictions, beside the trace's reference
simulation (same semantics, plain Python) run in the same process as the baseline;
writes JSON to benchmarks/out/ (and $OUT when set).

    python benchmarks/bench_manager.py [--trace PATH] [--requests N] [--repeat K]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

from pagedkv import BlockManager

HERE = Path(__file__).resolve().parent
DEFAULT_TRACE = HERE.parent.parent / "shared" / "bench" / "trace.py"


def load_trace_module(path: Path):
    if not path.exists():
        raise SystemExit(f"trace generator not found at {path}; pass --trace PATH/TO/trace.py")
    spec = importlib.util.spec_from_file_location("pagedkv_bench_trace", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


def replay(trace, *, hash_algo: str = "sha256", eviction: str = "lru") -> dict:
    """Replay every event; time each kind of operation separately."""
    p = trace.params
    m = BlockManager(trace.num_pool_blocks, p.block_size, eviction=eviction, hash_algo=hash_algo)
    t_admit = t_append = t_free = 0.0
    n_admit_blocks = n_append = n_free = 0
    clock = time.perf_counter
    allocate, append, free = m.allocate, m.append, m.free
    bs = p.block_size
    gc.disable()
    try:
        for ev in trace.events:
            kind = ev[0]
            if kind == "append":
                tok = [ev[2]]
                t0 = clock()
                append(ev[1], tok)
                t_append += clock() - t0
                n_append += 1
            elif kind == "admit":
                toks = ev[2]
                t0 = clock()
                allocate(ev[1], toks)
                t_admit += clock() - t0
                n_admit_blocks += -(-len(toks) // bs)
            else:
                t0 = clock()
                free(ev[1])
                t_free += clock() - t0
                n_free += 1
    finally:
        gc.enable()
    m.check_integrity()
    s = m.stats()
    return {
        "hash_algo": hash_algo,
        "eviction": eviction,
        "us_per_admitted_block": t_admit / n_admit_blocks * 1e6,
        "us_per_append": t_append / n_append * 1e6,
        "us_per_free": t_free / n_free * 1e6,
        "admitted_blocks": n_admit_blocks,
        "appends": n_append,
        "frees": n_free,
        "hit_rate": s.hit_rate,
        "hit_tokens": s.hit_tokens,
        "query_tokens": s.query_tokens,
        "evictions": s.evictions,
        "total_s": t_admit + t_append + t_free,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3, help="replays per configuration (best kept)")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    args = ap.parse_args(argv)

    tm = load_trace_module(args.trace)
    trace = tm.generate_trace(0, num_requests=args.requests)
    t0 = time.perf_counter()
    ref = tm.simulate_reference(trace)
    ref_s = time.perf_counter() - t0

    rows = []
    for algo in ("sha256", "xxh3_128"):
        runs = [replay(trace, hash_algo=algo) for _ in range(args.repeat)]
        rows.append(min(runs, key=lambda r: r["total_s"]))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"BlockManager on the standard trace ({len(trace.events)} events)")
    for col in ("config", "µs/admitted block", "µs/append", "µs/free", "hit rate", "evictions"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            f"pagedkv lru {r['hash_algo']}",
            f"{r['us_per_admitted_block']:.2f}",
            f"{r['us_per_append']:.2f}",
            f"{r['us_per_free']:.2f}",
            f"{r['hit_rate']:.1%}",
            str(r["evictions"]),
        )
    table.add_row("targets", "≤ 1.3", "≤ 2", "≤ 10", f"{ref['hit_rate']:.1%}", "")
    table.add_row(
        "reference sim (trace.py)",
        "",
        "",
        "",
        f"{ref['hit_rate']:.1%}",
        str(ref["evicted_blocks"]),
    )
    Console().print(table)
    print(
        f"reference simulation replayed the whole trace in {ref_s:.2f} s; "
        f"pagedkv (sha256) in {rows[0]['total_s']:.2f} s "
        f"({ref_s / rows[0]['total_s']:.1f}x faster)"
    )

    result = {
        "benchmark": "manager",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "python": platform.python_version(),
        "trace_digest": trace.digest(),
        "reference": {**ref, "seconds": ref_s},
        "pagedkv": rows,
    }
    for folder in filter(None, [args.out, os.environ.get("OUT")]):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "bench_manager.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
