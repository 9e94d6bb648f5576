"""Move bandwidth: KVCacheGroup.move of scattered blocks vs one contiguous copy of the bytes.

For every pair of the devices here (``cpu``, each ``cuda:i``, and two pools on ``cuda:0``),
a sequence of scattered blocks (1 GiB by default; 8 GiB as well between two GPUs when
memory allows) is moved back and forth between two KVCaches of a group, and timed beside
one contiguous copy of the same number of bytes between the same two devices: pinned host
memory <-> device for cpu<->cuda, device -> device for two GPUs (peer to peer when
``torch.cuda.can_device_access_peer``; the table says whether it was) or one GPU, a
memcpy between two CPU pools. Targets: >= 80 % cpu<->cuda, >= 85 % GPU<->GPU.

cpu<->cuda moves are swept over the ways they can go (``--staging``): ``kernel``, the CPU
pool page-locked (and mapped) once and every block moved by one copy kernel on the GPU
through the mapping; ``direct``, the same lock and every block moved by a pitched copy on
the copy engine (the table's ``lock_s`` is what locking the pool took, outside the
timings); ``host``, the
pool left pageable and each chunk gathered / scattered by ``--threads`` host threads
through pinned rows of ``--chunk-mib``. The ``best`` table picks the fastest per pair and
direction. Bytes are checked bit-exact after every configuration.

Without a GPU it moves between two CPU members (a smaller size by default), so the script
can be tried anywhere. Layout 7B-like: 32 layers, 8 KV heads, head dim 128, block 16, bf16
(2 MiB per block); members run without prefix caching, so every move copies every block.
Prints the tables; writes JSON to benchmarks/out/move.json (and $OUT when set).

    python benchmarks/bench_move.py [--sizes-mib 1024] [--big-mib 8192] [--repeat 5]
        [--staging kernel,direct,host] [--threads 1,4,8,16] [--chunk-mib 16,64]
        [--devices cpu,cuda:0,cuda:0] [--out DIR]
"""

from __future__ import annotations

import argparse
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
from pagedkv.storage import cudart, pool_copy

HERE = Path(__file__).resolve().parent
LAYOUT_7B = KVLayout(32, 8, 128, 16, torch.bfloat16)
GB = 1e9
TARGETS = {"h2d": 0.80, "d2h": 0.80, "peer": 0.85}
LOCKED = ("kernel", "direct")  # the stagings that page-lock the CPU pool


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


def raw_seconds(ca: KVCache, cb: KVCache, nbytes: int, repeat: int) -> float:
    x, y = contiguous(ca, cb, nbytes)
    return timed(lambda: y.copy_(x, non_blocking=True), [ca.device, cb.device], repeat)


def move_seconds(group: KVCacheGroup, a: str, b: str, nbytes: int, repeat: int) -> dict:
    """Median seconds of moves a -> b and b -> a (after one warm-up round trip), and how
    they went; the moved bytes are checked bit-exact."""
    ca, n = group.member(a), nbytes // LAYOUT_7B.bytes_per_block
    group.allocate("m", list(range(n * LAYOUT_7B.block_size)), device=a)
    probe = ca.read_blocks(group.block_table("m")[:: max(1, n // 8)]).clone()
    seconds: dict = {a: [], b: []}
    how: dict = {}
    for i in range(repeat + 1):
        for target in (b, a):
            r = group.move("m", target)
            how[target] = r
            if i:
                seconds[target].append(r.seconds)
    assert torch.equal(ca.read_blocks(group.block_table("m")[:: max(1, n // 8)]), probe), (
        "move is not bit-exact"
    )
    group.free("m")
    return {t: (statistics.median(seconds[t]), how[t]) for t in (a, b)}


def configs(route: str, args) -> list[dict]:
    """The group options to sweep for a pair whose a -> b route is ``route``."""
    if route not in ("h2d", "d2h"):
        return [{"staging": "auto", "host_threads": 1, "chunk_mib": args.chunks[-1]}]
    out = []
    for staging in args.staging:
        if staging in ("kernel", "direct"):
            out.append({"staging": staging, "host_threads": 1, "chunk_mib": args.chunks[-1]})
        else:
            out += [
                {"staging": "host", "host_threads": t, "chunk_mib": c}
                for t in args.threads
                for c in args.chunks
            ]
    return out


def bench_pair(caches: dict, a: str, b: str, sizes: list[int], args) -> list[dict]:
    ca, cb = caches[a], caches[b]
    how = pool_copy.route(ca.device, cb.device)
    raws = {
        (nbytes, src): raw_seconds(caches[src], caches[dst], nbytes, args.repeat)
        for nbytes in sizes
        for src, dst in ((a, b), (b, a))
    }
    rows = []
    for cfg in configs(how, args):
        t0 = time.perf_counter()
        try:
            group = KVCacheGroup(
                {a: ca, b: cb}, chunk_bytes=cfg["chunk_mib"] << 20, staging=cfg["staging"],
                host_threads=cfg["host_threads"], pin_host=cfg["staging"] in LOCKED,
            )  # fmt: skip
        except (ValueError, RuntimeError) as e:
            print(f"{a} <-> {b} {cfg}: skipped ({e})")
            continue
        lock_s = time.perf_counter() - t0
        for nbytes in sizes:
            timing = move_seconds(group, a, b, nbytes, args.repeat)
            for src, dst in ((a, b), (b, a)):
                t_move, r = timing[dst]
                t_raw = raws[(nbytes, src)]
                rows.append(row(src, dst, nbytes, r, cfg, t_move, t_raw, lock_s))
        group.check_integrity()
        group.close()
    return rows


def row(src, dst, nbytes, r, cfg, t_move, t_raw, lock_s) -> dict:
    target = TARGETS.get(r.route)
    ratio = t_raw / t_move
    return {
        "from": src,
        "to": dst,
        "MiB": nbytes >> 20,
        "blocks": nbytes // LAYOUT_7B.bytes_per_block,
        "route": r.route,
        "staging": r.staging or "-",
        "threads": cfg["host_threads"] if r.staging == "host" else "-",
        "chunk_MiB": cfg["chunk_mib"] if r.staging not in LOCKED else "-",
        "peer": "-" if r.peer is None else ("yes" if r.peer else "no"),
        "lock_s": round(lock_s, 3) if r.staging in LOCKED else "-",
        "move_GBps": nbytes / t_move / GB,
        "contiguous_GBps": nbytes / t_raw / GB,
        "ratio": ratio,
        "target": "-" if target is None else f">= {target:.0%}",
        "ok": "-" if target is None else ("yes" if ratio >= target else "NO"),
    }


def best_rows(rows: list[dict]) -> list[dict]:
    """The fastest row of each (from, to, MiB)."""
    best: dict = {}
    for r in rows:
        key = (r["from"], r["to"], r["MiB"])
        if key not in best or r["ratio"] > best[key]["ratio"]:
            best[key] = r
    return list(best.values())


def fits_on_gpus(devices: list[str], nbytes: int) -> bool:
    """Room for a pool of ``nbytes`` (+ 1/8 margin) and staging on each GPU, 4 GiB spare."""
    for d in devices:
        free, _ = torch.cuda.mem_get_info(torch.device(d))
        if free < nbytes * 9 // 8 + (4 << 30):
            return False
    return True


def pairs_of(names: list[str], devices: list[str]) -> list[tuple[str, str]]:
    """Every pair of members, once per pair of devices (``cpu`` with the first pool on a
    GPU, not with its second)."""
    out, seen = [], set()
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            key = (devices[i], devices[j])
            if key not in seen:
                seen.add(key)
                out.append((names[i], names[j]))
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    default_devices = (
        ["cpu", *(f"cuda:{i}" for i in range(gpus)), "cuda:0"] if gpus else ["cpu"] * 2
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2
    threads = sorted({1, *(t for t in (4, 8, 16) if t <= cores), cores})
    ap.add_argument("--devices", default=",".join(default_devices), help="comma list")
    ap.add_argument("--sizes-mib", default="1024" if gpus else "128", help="comma list, MiB")
    ap.add_argument("--big-mib", type=int, default=8192, help="extra size between two GPUs")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--staging", default="kernel,direct,host", help="cpu<->cuda ways to sweep")
    ap.add_argument("--threads", default=",".join(map(str, threads)), help="host staging")
    ap.add_argument("--chunk-mib", default="16,64", help="host staging chunk sizes, MiB")
    ap.add_argument("--out", default=str(HERE / "out"), help="directory for move.json")
    args = ap.parse_args(argv)
    args.gpus = gpus
    args.staging = args.staging.split(",")
    args.threads = [int(t) for t in args.threads.split(",")]
    args.chunks = [int(c) for c in args.chunk_mib.split(",")]
    for s in args.staging:
        if s not in ("kernel", "direct", "host"):
            ap.error(f"--staging takes kernel, direct and/or host, got {s!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    devices = args.devices.split(",")
    sizes = [int(s) << 20 for s in args.sizes_mib.split(",")]
    layout, bpb = LAYOUT_7B, LAYOUT_7B.bytes_per_block
    if len(devices) < 2:
        raise SystemExit("need two devices (on a machine without a GPU: --devices cpu,cpu)")
    names = [
        d if devices.count(d) == 1 else f"{d}#{devices[:i].count(d)}" for i, d in enumerate(devices)
    ]
    gpu_names = [n for n, d in zip(names, devices) if d.startswith("cuda")]
    distinct_gpus = len({d for d in devices if d.startswith("cuda")})
    big = (
        args.big_mib << 20
        if distinct_gpus >= 2 and fits_on_gpus(gpu_names, args.big_mib << 20)
        else 0
    )
    caches = {}  # member name -> cache, sized for the largest move it takes part in
    for i, (name, dev) in enumerate(zip(names, devices)):
        n = max(sizes + ([big] if big and name in gpu_names else [])) // bpb
        caches[name] = scattered_cache(layout, n + n // 8 + 8, dev, seed=i)
    rt = cudart.runtime()
    result = {
        "devices": [torch.cuda.get_device_name(i) for i in range(args.gpus)]
        or [platform.processor() or "cpu"],
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cudart": None if rt is None else rt.path,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "layout": str(layout),
        "bytes_per_block": bpb,
        "big_gpu_gpu_bytes": big,
        "rows": [],
    }
    for a, b in pairs_of(names, devices):
        two_gpus = a in gpu_names and b in gpu_names and caches[a].device != caches[b].device
        result["rows"] += bench_pair(
            caches, a, b, sizes + ([big] if big and two_gpus else []), args
        )
    result["best"] = best_rows(result["rows"])
    print(table("KVCacheGroup.move of scattered blocks vs one contiguous copy", result["rows"]))
    print()
    print(table("best configuration per pair and direction", result["best"]))
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
