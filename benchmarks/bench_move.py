"""Move bandwidth: KVCacheGroup.move of scattered blocks vs one contiguous copy of the bytes.

For every ordered pair of the devices here (``cpu`` and each ``cuda:i``), a sequence of
scattered blocks (1 GiB by default; 8 GiB as well between two GPUs when memory allows) is
moved back and forth between two KVCaches of a group, and timed beside one contiguous
copy of the same number of bytes between the same two devices: pinned host memory <->
device for cpu<->cuda (the CPU member's pool itself is ordinary pageable memory),
device -> device for two GPUs (peer to peer when ``torch.cuda.can_device_access_peer``;
the table says whether it was), a memcpy between two CPU pools. Targets: >= 80 %
cpu<->cuda, >= 85 % GPU<->GPU. Bytes are checked bit-exact after the runs.

Without a GPU it moves between two CPU members (a smaller size by default), so the script
can be tried anywhere. Layout 7B-like: 32 layers, 8 KV heads, head dim 128, block 16, bf16
(2 MiB per block); members run without prefix caching, so every move copies every block.
Prints a table; writes JSON to benchmarks/out/move.json (and $OUT when set).

    python benchmarks/bench_move.py [--sizes-mib 1024] [--big-mib 8192] [--repeat 5]
        [--chunk-mib 64] [--devices cpu,cuda:0,cuda:1] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pagedkv import KVCache, KVCacheGroup, KVLayout
from pagedkv.storage import pool_copy

HERE = Path(__file__).resolve().parent
LAYOUT_7B = KVLayout(32, 8, 128, 16, torch.bfloat16)
GB = 1e9
TARGETS = {"h2d": 0.80, "d2h": 0.80, "peer": 0.85}


def sync(*devices: torch.device) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def timed(fn: Callable[[], object], devices, repeat: int) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs after one warm-up run."""
    times = []
    for i in range(repeat + 1):
        sync(*devices)
        t0 = time.perf_counter()
        fn()
        sync(*devices)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def scattered_cache(layout: KVLayout, num_blocks: int, device: str, seed: int) -> KVCache:
    """A cache of random bytes whose free blocks come out in a random order."""
    cache = KVCache(layout, num_blocks, device=device, prefix_caching=False)
    cache.pool.kv.view(torch.uint8).random_()
    for b in range(num_blocks):
        cache.allocate(("fill", b), [1])
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    for b in order:
        cache.free(("fill", b))
    return cache


def contiguous(a: KVCache, b: KVCache, nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, target) buffers of ``nbytes`` for the reference copy: the pools' first bytes
    on a GPU or between two CPU pools, pinned host memory for the CPU side of cpu<->cuda."""
    kinds = {a.device.type, b.device.type}

    def side(c: KVCache) -> torch.Tensor:
        if c.device.type == "cpu" and kinds == {"cpu", "cuda"}:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(7)
        return c.pool.kv.view(torch.uint8).view(-1)[:nbytes]

    return side(a), side(b)


def bench_pair(group: KVCacheGroup, a: str, b: str, nbytes: int, repeat: int) -> list[dict]:
    """Rows for a -> b and b -> a: the median move and the median contiguous copy."""
    ca, cb = group.member(a), group.member(b)
    bs, bpb = LAYOUT_7B.block_size, LAYOUT_7B.bytes_per_block
    n = nbytes // bpb
    group.allocate("m", list(range(n * bs)), device=a)
    probe = ca.read_blocks(group.block_table("m")[:: max(1, n // 8)]).clone()
    seconds = {a: [], b: []}
    route = {}
    for i in range(repeat + 1):  # the first round trip warms kernels and pinned memory
        for target in (b, a):
            r = group.move("m", target)
            route[target] = (r.route, r.peer)
            if i:
                seconds[target].append(r.seconds)
    assert torch.equal(ca.read_blocks(group.block_table("m")[:: max(1, n // 8)]), probe), (
        "move is not bit-exact"
    )
    group.free("m")
    rows = []
    for src, dst, cs, cd in ((a, b, ca, cb), (b, a, cb, ca)):
        x, y = contiguous(cs, cd, n * bpb)
        t_raw = timed(
            lambda x=x, y=y: y.copy_(x, non_blocking=True), [cs.device, cd.device], repeat
        )
        del x, y
        t_move = statistics.median(seconds[dst])
        how, peer = route[dst]
        ratio = t_raw / t_move
        target = TARGETS.get(how)
        rows.append(
            {
                "from": src,
                "to": dst,
                "MiB": n * bpb >> 20,
                "blocks": n,
                "route": how,
                "peer": "-" if peer is None else ("yes" if peer else "no"),
                "move_GBps": n * bpb / t_move / GB,
                "contiguous_GBps": n * bpb / t_raw / GB,
                "ratio": ratio,
                "target": "-" if target is None else f">= {target:.0%}",
                "ok": "-" if target is None else ("yes" if ratio >= target else "NO"),
            }
        )
    return rows


def fits_on_gpus(devices: list[str], nbytes: int) -> bool:
    """Room for a pool of ``nbytes`` (+ 1/8 margin) and staging on each GPU, 4 GiB spare."""
    for d in devices:
        free, _ = torch.cuda.mem_get_info(torch.device(d))
        if free < nbytes * 9 // 8 + (4 << 30):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    default_devices = ["cpu", *(f"cuda:{i}" for i in range(gpus))] if gpus else ["cpu", "cpu"]
    ap.add_argument("--devices", default=",".join(default_devices), help="comma list")
    ap.add_argument("--sizes-mib", default="1024" if gpus else "128", help="comma list, MiB")
    ap.add_argument("--big-mib", type=int, default=8192, help="extra size between two GPUs")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--chunk-mib", type=int, default=pool_copy.CHUNK_BYTES >> 20)
    ap.add_argument("--out", default=str(HERE / "out"), help="directory for move.json")
    args = ap.parse_args(argv)
    devices = args.devices.split(",")
    sizes = [int(s) << 20 for s in args.sizes_mib.split(",")]
    layout, bpb = LAYOUT_7B, LAYOUT_7B.bytes_per_block
    if len(devices) < 2:
        raise SystemExit("need two devices (on a machine without a GPU: --devices cpu,cpu)")

    caches = {}  # member name -> cache, sized for the largest move it takes part in
    names = [
        d if devices.count(d) == 1 else f"{d}#{devices[:i].count(d)}" for i, d in enumerate(devices)
    ]
    gpu_names = [n for n, d in zip(names, devices) if d.startswith("cuda")]
    big = (
        args.big_mib << 20
        if len(gpu_names) >= 2 and fits_on_gpus(gpu_names, args.big_mib << 20)
        else 0
    )
    for i, (name, dev) in enumerate(zip(names, devices)):
        largest = max(sizes + ([big] if big and name in gpu_names else []))
        n = largest // bpb
        caches[name] = scattered_cache(layout, n + n // 8 + 8, dev, seed=i)
    result = {
        "devices": [torch.cuda.get_device_name(i) for i in range(gpus)]
        or [platform.processor() or "cpu"],
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "layout": str(layout),
        "bytes_per_block": bpb,
        "chunk_bytes": args.chunk_mib << 20,
        "big_gpu_gpu_bytes": big,
        "rows": [],
    }
    for a, b in itertools.combinations(names, 2):
        group = KVCacheGroup({a: caches[a], b: caches[b]}, chunk_bytes=args.chunk_mib << 20)
        pair_sizes = sizes + ([big] if big and a in gpu_names and b in gpu_names else [])
        for nbytes in pair_sizes:
            result["rows"] += bench_pair(group, a, b, nbytes, args.repeat)
        group.check_integrity()
    print(table("KVCacheGroup.move of scattered blocks vs one contiguous copy", result["rows"]))
    text = json.dumps(result, indent=2)
    for d in filter(None, [args.out, os.environ.get("OUT")]):
        Path(d).mkdir(parents=True, exist_ok=True)
        (Path(d) / "move.json").write_text(text)
    print(f"\nwrote {Path(args.out) / 'move.json'}")
    return 0


def table(title: str, rows: list[dict]) -> str:
    if not rows:
        return title + ": no rows"
    cols = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    width = {c: max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols}
    lines = [title, "  ".join(c.rjust(width[c]) for c in cols)]
    lines += ["  ".join(fmt(r[c]).rjust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
