"""Snapshot throughput and dedup vs raw sequential I/O of the same bytes on the same disk.

Measures, on a CPU KVCache filled with random bf16 KV:

- save GB/s (read blocks from the pool, sha256, write new pages as pack files,
  manifest) vs a raw sequential ``write`` of the same bytes into one file in the
  same directory;
- load GB/s (read + verify every page, allocate, write into a fresh pool) vs a raw
  sequential ``read`` of that file;
- verify GB/s;
- bytes a fork adds when it shares 90 % of its parent's prefix, as a fraction of
  the parent's bytes;
- dedup of pages holding a block's K and V together vs K and V as separate pages.

Each measurement is repeated (``--repeats``) and interleaved with its raw
counterpart; the best of each is reported (the machine may be shared). Prints a
table and writes ``benchmarks/out/bench_snapshot.json`` and a PNG plot beside it.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_snapshot.py [--size-mb 512] [--dir PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from _plot import RAW, add_plot_arguments, figure, load, plot_result, replot
from _progress import add_quiet_argument, steps
from pagedkv.cache import KVCache
from pagedkv.snapshot import SnapshotStore
from pagedkv.storage import KVLayout
from pagedkv.testing import SyntheticPager


def make_cache(layout: KVLayout, num_blocks: int) -> KVCache:
    return KVCache(layout, num_blocks, model_fingerprint="bench-model@1")


def fill(cache: KVCache, seq_id, start_block: int = 0, seed: int = 0) -> None:
    """Random KV into the blocks of ``seq_id`` from ``start_block`` on."""
    gen = torch.Generator().manual_seed(seed)
    blocks = cache.block_table(seq_id)[start_block:]
    if not blocks:
        return
    ids = torch.tensor(blocks)
    shape = cache.pool.kv[:, :, ids].shape
    cache.pool.kv[:, :, ids] = torch.randn(shape, generator=gen).to(cache.layout.dtype)


def raw_write(path: Path, data: memoryview, fsync: bool) -> float:
    t = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - t


def raw_read(path: Path) -> float:
    t = time.perf_counter()
    with open(path, "rb") as f:
        f.read()
    return time.perf_counter() - t


def kv_split_dedup(rows: torch.Tensor, layout: KVLayout) -> tuple[int, int]:
    """Unique bytes with (K+V per page, K and V as separate pages) over these block rows."""
    together, split = set(), set()
    for row in rows.numpy():
        per_layer = row.reshape(layout.num_layers, 2, -1)
        together.add(hashlib.sha256(row).digest())
        split.add(b"K" + hashlib.sha256(per_layer[:, 0].copy()).digest())
        split.add(b"V" + hashlib.sha256(per_layer[:, 1].copy()).digest())
    bpb = layout.bytes_per_block
    return len(together) * bpb, len(split) * bpb // 2


def plot(result: dict):
    """Save and load GB/s beside a raw sequential write / read of the same bytes."""
    gbps = result["best_gbps"]
    durable = ", durable (fsync)" if result["fsync"] else ", page cache"
    fig, axes = figure(1, 2, size=(5.8, 4.4), title=(
        f"snapshot save / load of {result['bytes'] / 2**20:,.0f} MiB "
        f"({result['page_bytes'] / 2**20:g} MiB pages){durable}\n{result['device']}"
        f"{load(result)}, "
        f"{result['date']}"))  # fmt: skip
    panels = (
        ("save", "raw_write", "raw write\n(one file)", ["save", "save_syn"]),
        ("load", "raw_read", "raw read\n(one file)", ["load", "load_syn", "verify"]),
    )
    names = {"save": "save\nKVCache", "save_syn": "save\nSyntheticPager",
             "load": "load\nKVCache", "load_syn": "load\nSyntheticPager",
             "verify": "verify\n(read + sha256)"}  # fmt: skip
    for ax, (what, raw, raw_name, keys) in zip(axes, panels):
        labels = [raw_name, *(names[k] for k in keys)]
        values = [gbps[raw], *(gbps[k] for k in keys)]
        drawn = ax.bar(labels, values, color=[RAW] + ["#1f77b4"] * len(keys))
        texts = [f"{values[0]:.2f}"] + [
            f"{v:.2f}\n{v / values[0]:.0%} of raw" if k != "verify" else f"{v:.2f}"
            for k, v in zip(keys, values[1:])
        ]
        ax.bar_label(drawn, labels=texts, fontsize=8)
        ax.axhline(0.7 * values[0], color="k", ls="--", lw=1, label="target: 70 % of raw")
        ax.set_ylabel("GB/s (best of repeats)")
        ax.set_title(f"{what} vs {raw_name.splitlines()[0]}", fontsize=10)
        ax.margins(y=0.2)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    return fig


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=512, help="KV bytes saved per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="directory on the disk to test (default: tmp)")
    ap.add_argument(
        "--fsync",
        action="store_true",
        help="durable runs: raw write + fsync vs SnapshotStore(durable=True)",
    )
    ap.add_argument("--threads", type=int, default=2, help="digest threads")
    ap.add_argument(
        "--writers", type=int, default=None, help="packs written in parallel (default: store's)"
    )
    ap.add_argument("--chunk-mb", type=int, default=None, help="MiB in flight per save chunk")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "bench_snapshot.json"))
    add_plot_arguments(ap)
    add_quiet_argument(ap)
    args = ap.parse_args(argv)
    if args.replot:
        raise SystemExit(replot(plot, args.replot))
    if args.size_mb < 32:  # the fork measure needs 4 sequences of >= 8 blocks
        ap.error(
            f"--size-mb must be >= 32 (4 sequences of >= 8 one-MiB blocks), got {args.size_mb}"
        )
    if args.repeats < 1 or args.threads < 1 or args.torch_threads < 1:
        ap.error("--repeats, --threads and --torch-threads must be >= 1")
    torch.set_num_threads(args.torch_threads)

    # 16 layers x 8 KV heads x 128 dim, bf16, 16-token blocks: 1 MiB pages (an 8B-class model)
    layout = KVLayout(16, 8, 128, 16, torch.bfloat16)
    bpb = layout.bytes_per_block
    num_seqs = 4
    blocks_per_seq = max(1, args.size_mb * (1 << 20) // bpb // num_seqs)
    tokens_per_seq = blocks_per_seq * layout.block_size
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-snapshot-"))
    root.mkdir(parents=True, exist_ok=True)

    src = make_cache(layout, num_seqs * blocks_per_seq + blocks_per_seq // 5 + 8)
    for i in range(num_seqs):
        src.allocate(i, [i * 1_000_000 + t for t in range(tokens_per_seq)])
        fill(src, i, seed=i)
    all_blocks = [b for i in range(num_seqs) for b in src.block_table(i)]
    raw_bytes = src.read_blocks(all_blocks).numpy()
    nbytes = raw_bytes.nbytes
    view = memoryview(raw_bytes).cast("B")

    # the same bytes in a SyntheticPager: one numpy copy per read, so the snapshot
    # layer's own cost shows apart from KVPool's CPU gather/scatter
    n_blocks = num_seqs * blocks_per_seq + blocks_per_seq // 5 + 8
    syn = SyntheticPager(layout, n_blocks, fingerprint=src.fingerprint)
    for i in range(num_seqs):
        syn.allocate(i, src.token_ids(i))
        syn.write_blocks(syn.block_table(i), src.read_blocks(src.block_table(i)))

    keys = ("raw_write", "save", "save_syn", "raw_read", "load", "load_syn", "verify", "pool_read")
    res: dict[str, list[float]] = {k: [] for k in keys}
    with steps(2 * args.repeats + 1, "save / load / verify", quiet=args.quiet) as bar:
        for r in range(args.repeats):
            t = time.perf_counter()
            src.read_blocks(all_blocks)
            res["pool_read"].append(time.perf_counter() - t)
            for pager, suffix in ((src, ""), (syn, "_syn")):
                run_dir = root / f"run{r}{suffix}"
                shutil.rmtree(run_dir, ignore_errors=True)
                run_dir.mkdir()
                res["raw_write"].append(raw_write(run_dir / "raw.bin", view, args.fsync))
                chunk = {} if args.chunk_mb is None else {"chunk_bytes": args.chunk_mb << 20}
                with SnapshotStore(
                    run_dir / "store",
                    durable=args.fsync,
                    threads=args.threads,
                    writers=args.writers,
                    **chunk,
                ) as store:
                    info = store.save(pager, name="s")
                    assert info.written_bytes == nbytes, (info.written_bytes, nbytes)
                    res["save" + suffix].append(info.seconds)
                    res["raw_read"].append(raw_read(run_dir / "raw.bin"))
                    if pager is src:
                        dst = make_cache(layout, n_blocks)
                    else:
                        dst = SyntheticPager(layout, n_blocks, fingerprint=src.fingerprint)
                    loaded = store.load(dst, "s")
                    res["load" + suffix].append(loaded.seconds)
                    for old, new in loaded.items():  # spot-check bit-exactness
                        a, b = pager.block_table(old)[-1], dst.block_table(new)[-1]
                        assert torch.equal(pager.read_blocks([a]), dst.read_blocks([b]))
                    del dst
                    if pager is src:
                        rep = store.verify("s")
                        assert rep.ok
                        res["verify"].append(rep.seconds)
                shutil.rmtree(run_dir, ignore_errors=True)
                bar.done("fork" if r == args.repeats - 1 and pager is syn else None)

        # fork sharing 90 % of its prefix: a new sequence whose first 90 % of blocks hit
        # the prefix cache (shared blocks), the rest is new KV
        fork_dir = root / "fork"
        shutil.rmtree(fork_dir, ignore_errors=True)
        with SnapshotStore(fork_dir, threads=args.threads) as store:
            parent = store.save(src, [0], name="parent")
            shared = round(blocks_per_seq * 0.9)
            tokens = src.token_ids(0)[: shared * layout.block_size]
            tokens += [7_000_000 + t for t in range(tokens_per_seq - len(tokens))]
            src.allocate("child", tokens)
            assert src.block_table("child")[:shared] == src.block_table(0)[:shared]
            fill(src, "child", start_block=shared, seed=99)
            child = store.save(src, ["child"], name="child")
            fork_frac = child.written_bytes / parent.unique_bytes
            child_rows = src.read_blocks(src.block_table("child"))
            parent_rows = src.read_blocks(src.block_table(0))
            together, split = kv_split_dedup(torch.cat([parent_rows, child_rows]), layout)
        shutil.rmtree(fork_dir, ignore_errors=True)
        bar.done()
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)

    best = {k: min(v) for k, v in res.items()}
    gbps = {k: nbytes / s / 1e9 for k, s in best.items()}
    table = Table(title=f"snapshot vs raw I/O, {nbytes / 2**20:.0f} MiB, {bpb >> 10} KiB pages")
    for col in ("measure", "best s", "GB/s", "vs raw", "target"):
        table.add_column(col, justify="right" if col != "measure" else "left")

    def row(label: str, key: str, base: str | None = None) -> None:
        ratio = f"{gbps[key] / gbps[base]:.0%}" if base else ""
        target = ">= 70%" if base else ""
        table.add_row(label, f"{best[key]:.3f}", f"{gbps[key]:.2f}", ratio, target)

    row("raw write (one file)", "raw_write")
    row("save, KVCache (CPU pool)", "save", "raw_write")
    row("save, SyntheticPager", "save_syn", "raw_write")
    row("raw read (one file)", "raw_read")
    row("load, KVCache (verify+install)", "load", "raw_read")
    row("load, SyntheticPager", "load_syn", "raw_read")
    row("verify", "verify")
    row("KVCache.read_blocks alone", "pool_read")
    table.add_row("fork sharing 90% adds", "", "", f"{fork_frac:.1%}", "<= 12%")
    table.add_row(
        "K+V pages vs K, V apart (unique)",
        "",
        "",
        f"{together / 2**20:.0f} vs {split / 2**20:.0f} MiB",
        "",
    )
    Console().print(table)

    out = {
        "bench": "snapshot",
        "date": time.strftime("%Y-%m-%d"),
        "device": f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "disk_dir": str(root),
        "fsync": args.fsync,
        "bytes": nbytes,
        "page_bytes": bpb,
        "repeats": args.repeats,
        "threads": args.threads,
        "writers": args.writers,
        "seconds": res,
        "best_gbps": gbps,
        "save_vs_raw_write": gbps["save"] / gbps["raw_write"],
        "load_vs_raw_read": gbps["load"] / gbps["raw_read"],
        "save_syn_vs_raw_write": gbps["save_syn"] / gbps["raw_write"],
        "load_syn_vs_raw_read": gbps["load_syn"] / gbps["raw_read"],
        "load_avg_1min": os.getloadavg()[0],
        "fork90_added_fraction": fork_frac,
        "unique_bytes_kv_together": together,
        "unique_bytes_kv_split": split,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    if args.plot:
        plot_result(plot, out, [args.out])


if __name__ == "__main__":
    main()
