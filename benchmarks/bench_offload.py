"""Offload-tier bandwidth: swap GPU<->CPU, disk tier, Redis tier, each beside its raw ceiling.

- swap: ``TieredStore.swap_out``/``swap_in`` of N scattered blocks vs one contiguous
  copy of the same bytes (device -> pinned host and back; on CPU a plain memcpy).
- disk: demote N blocks into a DiskTier (until stored) and promote them back vs a raw
  sequential write / read of the same bytes in one file in the same directory.
  Neither side fsyncs: both measure the page cache path.
- redis: demote / promote N blocks through a RedisTier vs raw pipelined SET / MGET
  of values of the same size with redis-py, on a throw-away loopback redis-server.
- ttft: time to first token of a long prompt whose prefix sits in each tier vs
  recomputing it, through the engine (skipped, with the reason, when the engine or
  its model cannot be loaded).

Layout: 7B-like (32 layers, 8 KV heads, head dim 128, block 16, bf16: 2 MiB/block).
Prints a table; writes JSON to benchmarks/out/offload.json (and $OUT when set) and a PNG
of each tier's bandwidth against the batch size beside it.

    python benchmarks/bench_offload.py [--device cpu|cuda] [--swap-blocks 64,256]
        [--disk-blocks 16,64] [--redis-blocks 16,64] [--repeat 3] [--skip redis,ttft]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from _plot import add_plot_arguments, figure, load, plot_result, replot
from _progress import add_quiet_argument, steps
from pagedkv.storage import KVLayout, KVPool
from pagedkv.tiers import CPUTier, DiskTier, RedisTier, TieredStore

HERE = Path(__file__).resolve().parent
LAYOUT_7B = KVLayout(32, 8, 128, 16, torch.bfloat16)
GB = 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs after one warm-up run."""
    times = []
    for i in range(repeat + 1):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hashes(n: int, tag: str) -> list[bytes]:
    return [hashlib.sha256(f"{tag}-{i}".encode()).digest() for i in range(n)]


def make_pool(layout: KVLayout, num_blocks: int, device: torch.device) -> KVPool:
    pool = KVPool(layout, num_blocks, device)
    pool.kv.view(torch.uint8).random_(0, 256)  # in place: no second pool-sized buffer
    return pool


# -- swap --------------------------------------------------------------------------------


def _nothing() -> None:
    pass


def bench_swap(layout, sizes, device, repeat, done: Callable[[], None] = _nothing) -> list[dict]:
    rows = []
    bpb = layout.bytes_per_block
    pool = make_pool(layout, max(sizes) + 64, device)
    pinned = device.type == "cuda"
    for n in sizes:
        nbytes = n * bpb
        ts = TieredStore([CPUTier(bpb, swap_bytes=nbytes)], layout, "bench")
        ts.attach(pool)
        g = torch.Generator().manual_seed(n)
        perm = torch.randperm(pool.num_blocks, generator=g)
        src = perm[:n].tolist()
        # fresh blocks when the pool has room, else back into the same scattered blocks
        dst = perm[n : 2 * n].tolist() if 2 * n <= pool.num_blocks else src
        before = pool.read_blocks(src[:4]).clone()

        t_out, t_in = [], []
        for rep in range(repeat + 1):
            sync(device)
            t0 = time.perf_counter()
            ts.swap_out("s", src)
            sync(device)
            t1 = time.perf_counter()
            ts.swap_in("s", dst)
            sync(device)
            t2 = time.perf_counter()
            if rep:
                t_out.append(t1 - t0)
                t_in.append(t2 - t1)
        t_out, t_in = statistics.median(t_out), statistics.median(t_in)
        assert torch.equal(pool.read_blocks(dst[:4]), before), "swap is not bit-exact"
        ts.close()
        # raw ceiling: one contiguous copy of the same bytes (device -> pinned host, back)
        contiguous = pool.kv.view(torch.uint8).view(-1)[:nbytes]
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        if pinned and hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()  # give back the swap rows of smaller runs
        t_d2h = timed(lambda h=host, c=contiguous: h.copy_(c, non_blocking=pinned), device, repeat)
        t_h2d = timed(lambda h=host, c=contiguous: c.copy_(h, non_blocking=pinned), device, repeat)
        rows.append(
            {
                "blocks": n,
                "bytes": nbytes,
                "swap_out_GBps": nbytes / t_out / GB,
                "swap_in_GBps": nbytes / t_in / GB,
                "raw_d2h_GBps": nbytes / t_d2h / GB,
                "raw_h2d_GBps": nbytes / t_h2d / GB,
                "out_vs_raw": t_d2h / t_out,
                "in_vs_raw": t_h2d / t_in,
            }
        )
        done()
    return rows


# -- disk --------------------------------------------------------------------------------


def _tier_round_trip(ts: TieredStore, src, dst, hs, device) -> tuple[float, float]:
    """Seconds to demote ``src`` until stored, then to promote it back into ``dst``."""
    sync(device)
    t0 = time.perf_counter()
    ts.demote(list(zip(src, hs)))
    ts.flush()
    t1 = time.perf_counter()
    loaded = ts.promote(hs, dst)
    sync(device)
    t2 = time.perf_counter()
    assert loaded == len(src), f"promoted {loaded} of {len(src)} blocks"
    pool = ts._transfer.pool
    assert torch.equal(pool.read_blocks(dst[:2]), pool.read_blocks(src[:2]))
    return t1 - t0, t2 - t1


def _ratios(n: int, nbytes: int, tier: list, raw: list, names: tuple[str, ...]) -> dict:
    w, r = statistics.median(t for t, _ in tier), statistics.median(t for _, t in tier)
    raw_w, raw_r = statistics.median(t for t, _ in raw), statistics.median(t for _, t in raw)
    tw, tr, rw, rr, qw, qr = names
    return {
        "blocks": n,
        "bytes": nbytes,
        tw: nbytes / w / GB,
        tr: nbytes / r / GB,
        rw: nbytes / raw_w / GB,
        rr: nbytes / raw_r / GB,
        qw: raw_w / w,
        qr: raw_r / r,
    }


def bench_disk(layout, sizes, device, repeat, root: Path, done=_nothing) -> list[dict]:
    """Tier and raw runs alternate, so both see the same page-cache / writeback state."""
    rows = []
    bpb = layout.bytes_per_block
    pool = make_pool(layout, 2 * max(sizes), device)
    for n in sizes:
        nbytes = n * bpb
        src, dst = list(range(n)), list(range(n, 2 * n))
        data = memoryview(pool.read_blocks(src).numpy()).cast("B")
        buf = bytearray(nbytes)
        tier, raw = [], []
        for rep in range(repeat + 1):
            d = root / f"tier-{n}-{rep}"
            ts = TieredStore([DiskTier(d, 2 * n * (bpb + 4096))], layout, "bench")
            ts.attach(pool)
            times = _tier_round_trip(ts, src, dst, hashes(n, f"disk{rep}"), device)
            ts.close()
            shutil.rmtree(d)
            path = root / f"raw-{n}-{rep}.bin"
            t0 = time.perf_counter()
            with open(path, "wb") as f:
                f.write(data)
            t1 = time.perf_counter()
            with open(path, "rb") as f:
                f.readinto(buf)
            t2 = time.perf_counter()
            path.unlink()
            if rep:
                tier.append(times)
                raw.append((t1 - t0, t2 - t1))
        names = ("tier_write_GBps", "tier_read_GBps", "raw_write_GBps", "raw_read_GBps")
        rows.append(_ratios(n, nbytes, tier, raw, (*names, "write_vs_raw", "read_vs_raw")))
        done()
    return rows


# -- redis -------------------------------------------------------------------------------


class LoopbackRedis:
    """A throw-away redis-server on 127.0.0.1 (no persistence)."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no"]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        import redis

        self.client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self.client.close()
        self.proc.kill()
        self.proc.wait()


def bench_redis(layout, sizes, device, repeat, server: LoopbackRedis, done=_nothing) -> list[dict]:
    """Tier and raw runs alternate; the raw run SETs / MGETs the same values, unframed."""
    rows = []
    bpb = layout.bytes_per_block
    pool = make_pool(layout, 2 * max(sizes), device)
    for n in sizes:
        nbytes = n * bpb
        src, dst = list(range(n)), list(range(n, 2 * n))
        data = pool.read_blocks(src).numpy()
        values = [memoryview(data[i]) for i in range(n)]
        names = [f"raw-{i}" for i in range(n)]
        tier, raw = [], []
        for rep in range(repeat + 1):
            server.client.flushall()
            ts = TieredStore([RedisTier(server.url, timeout_s=30.0)], layout, "bench")
            ts.attach(pool)
            times = _tier_round_trip(ts, src, dst, hashes(n, f"redis{rep}"), device)
            ts.close()
            server.client.flushall()
            t0 = time.perf_counter()
            pipe = server.client.pipeline(transaction=False)
            for k, v in zip(names, values):
                pipe.set(k, v)
            pipe.execute()
            t1 = time.perf_counter()
            got = server.client.mget(names)
            t2 = time.perf_counter()
            assert len(got) == n and len(got[-1]) == bpb
            if rep:
                tier.append(times)
                raw.append((t1 - t0, t2 - t1))
        cols = ("tier_put_GBps", "tier_get_GBps", "raw_set_GBps", "raw_get_GBps")
        row = _ratios(n, nbytes, tier, raw, (*cols, "put_vs_raw", "get_vs_raw"))
        row["tier_put_blocks_s"] = row["tier_put_GBps"] * GB / bpb
        row["tier_get_blocks_s"] = row["tier_get_GBps"] * GB / bpb
        rows.append(row)
        done()
    server.client.flushall()
    return rows


# -- time to first token -----------------------------------------------------------------


def bench_ttft(device, root: Path, redis_url: str | None, prompt_tokens: int) -> dict:
    """TTFT of a prompt whose prefix is in each tier vs recomputing it (needs the engine)."""
    try:
        from pagedkv.engine import Engine, SamplingParams
    except Exception as e:  # the engine is optional here
        return {"skipped": f"engine not importable: {type(e).__name__}: {e}"}
    one = SamplingParams(max_new_tokens=1)
    prompt = [(i * 7919) % 20000 + 100 for i in range(prompt_tokens)]
    filler = [[(i * 104729 + j) % 20000 + 100 for i in range(prompt_tokens)] for j in range(3)]
    configs = {"recompute": None, "cpu": lambda: [CPUTier(2 << 30)]}
    configs["disk"] = lambda: [DiskTier(root / "ttft-disk", 4 << 30)]
    if redis_url:
        configs["redis"] = lambda: [RedisTier(redis_url, timeout_s=30.0)]
    out = {"prompt_tokens": prompt_tokens}
    try:
        for name, make in configs.items():
            tiers = make() if make else None
            num_blocks = -(-prompt_tokens // 16) + 8  # room for one prompt: fillers evict it
            engine = Engine.from_pretrained(
                device=str(device), num_blocks=num_blocks, tiers=tiers, cuda_graphs=False
            )
            engine.generate([filler[2]], one)  # warm-up (kernels, allocator)
            engine.generate([prompt], one)
            for f in filler[:2]:
                engine.generate([f], one)  # evicts the prompt's blocks into the tier
            if engine.cache.tiers is not None:
                engine.cache.tiers.flush()
            sync(device)
            t0 = time.perf_counter()
            engine.generate([prompt], one)
            sync(device)
            out[f"{name}_ms"] = (time.perf_counter() - t0) * 1e3
            if engine.cache.tiers is not None:
                out[f"{name}_tier_hit_tokens"] = engine.cache.tier_stats()["tier_hit_tokens"]
                engine.cache.close()
    except Exception as e:
        out["skipped"] = f"engine run failed: {type(e).__name__}: {e}"
    return out


# -- main --------------------------------------------------------------------------------


def table(title: str, rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    width = {c: max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols}
    lines = [title, "  ".join(c.rjust(width[c]) for c in cols)]
    lines += ["  ".join(fmt(r[c]).rjust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


# section -> panel title, [(tier label, tier key, raw key, raw label)]
PANELS = {
    "swap": ("swap device <-> host (scattered blocks)", [
        ("swap-out", "swap_out_GBps", "raw_d2h_GBps", "one contiguous copy out"),
        ("swap-in", "swap_in_GBps", "raw_h2d_GBps", "one contiguous copy in"),
    ]),
    "disk": ("disk tier (page cache, no fsync)", [
        ("demote (write)", "tier_write_GBps", "raw_write_GBps", "raw sequential write"),
        ("promote (read)", "tier_read_GBps", "raw_read_GBps", "raw sequential read"),
    ]),
    "redis": ("Redis tier (loopback)", [
        ("put", "tier_put_GBps", "raw_set_GBps", "redis-py pipelined SET"),
        ("get", "tier_get_GBps", "raw_get_GBps", "redis-py MGET"),
    ]),
}  # fmt: skip


def plot(result: dict):
    """Each tier's GB/s against the batch size (solid) beside its raw ceiling (dashed)."""
    sections = [k for k in PANELS if isinstance(result.get(k), list) and result[k]]
    if not sections:
        raise ValueError("no swap, disk or redis rows in this result to plot")
    mib = result["bytes_per_block"] / 2**20
    fig, axes = figure(1, len(sections), size=(4.8, 4.2), title=(
        f"offload tiers, {result['device']} ({result['cpus']} CPUs{load(result)}), "
        f"{result['date']}; "
        f"{mib:g} MiB blocks"))  # fmt: skip
    for ax, key in zip(axes, sections):
        title, series = PANELS[key]
        rows = result[key]
        x = [r["blocks"] for r in rows]
        for i, (label, tier_key, raw_key, raw_label) in enumerate(series):
            color = ["#1f77b4", "#ff7f0e"][i]
            ax.plot(x, [r[tier_key] for r in rows], "o-", color=color, label=label)
            ax.plot(x, [r[raw_key] for r in rows], "s--", color=color, alpha=0.55,
                    label=raw_label, markersize=4)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{n}\n{n * mib:g} MiB" for n in x])
        ax.set_xlabel("batch size (blocks, and bytes)")
        ax.set_ylabel("GB/s (median)")
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return fig


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--swap-blocks", default=None, help="comma list; default by device")
    ap.add_argument("--disk-blocks", default=None)
    ap.add_argument("--redis-blocks", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ttft-tokens", type=int, default=1024)
    ap.add_argument("--skip", default="", help="comma list of swap,disk,redis,ttft")
    ap.add_argument("--dir", default=None, help="scratch directory for the disk runs")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="folder for offload.json")
    add_plot_arguments(ap)
    add_quiet_argument(ap)
    args = ap.parse_args(argv)
    if args.replot:
        raise SystemExit(replot(plot, args.replot))
    if args.repeat < 1 or args.ttft_tokens < 17:
        ap.error("--repeat must be >= 1 and --ttft-tokens >= 17 (more than one block)")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    ints = lambda s, d: [int(x) for x in (s or d).split(",")]  # noqa: E731
    swap_n = ints(args.swap_blocks, "64,256,1024,4096,16384" if cuda else "16,64,256")
    disk_n = ints(args.disk_blocks, "64,256,1024" if cuda else "16,64")
    redis_n = ints(args.redis_blocks, "64,256" if cuda else "16,64")
    skip = set(filter(None, args.skip.split(",")))
    if skip - {"swap", "disk", "redis", "ttft"} or min(swap_n + disk_n + redis_n) < 1:
        ap.error("--skip takes swap,disk,redis,ttft; block counts must be >= 1")
    layout = LAYOUT_7B
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU {platform.machine()}",
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "load_avg_1min": os.getloadavg()[0],  # the machine may be shared: read with care
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "layout": str(layout),
        "bytes_per_block": layout.bytes_per_block,
    }
    scratch = Path(tempfile.mkdtemp(prefix="pagedkv-bench-offload-", dir=args.dir))
    server = None
    total = sum(len(n) for k, n in (("swap", swap_n), ("disk", disk_n), ("redis", redis_n))
                if k not in skip) + ("ttft" not in skip)  # fmt: skip
    try:
        with steps(total, "offload tiers", quiet=args.quiet) as bar:
            if "swap" not in skip:
                result["swap"] = bench_swap(layout, swap_n, device, args.repeat, bar.done)
                print(table("swap GPU<->CPU (scattered blocks vs contiguous copy)", result["swap"]))
            if "disk" not in skip:
                result["disk"] = bench_disk(layout, disk_n, device, args.repeat, scratch, bar.done)
                print(table("\ndisk tier vs raw sequential file I/O (page cache)", result["disk"]))
            if "redis" not in skip or "ttft" not in skip:
                try:
                    server = LoopbackRedis(scratch)
                except Exception as e:
                    result["redis"] = {"skipped": f"{type(e).__name__}: {e}"}
            if "redis" not in skip and server is not None:
                result["redis"] = bench_redis(
                    layout, redis_n, device, args.repeat, server, bar.done
                )
                print(table("\nredis tier vs raw redis-py pipeline (loopback)", result["redis"]))
            if "ttft" not in skip:
                url = server.url if server is not None else None
                result["ttft"] = bench_ttft(device, scratch, url, args.ttft_tokens)
                print("\ntime to first token:", json.dumps(result["ttft"], indent=1))
                bar.done()
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(scratch, ignore_errors=True)
    text = json.dumps(result, indent=2)
    paths = [Path(d) / "offload.json" for d in filter(None, [args.out, os.environ.get("OUT")])]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"\nwrote {paths[0]}")
    if args.plot and any(isinstance(result.get(k), list) for k in PANELS):
        plot_result(plot, result, paths)


if __name__ == "__main__":
    main()
