"""Batch-invariant GEMM and row kernels vs torch (cuBLAS / torch CUDA) on one GPU.

    PYTHONPATH=src python benchmarks/bench_invariant.py [--quick] [--sweep]

GEMM: ``pagedkv.ops.invariant.linear`` (the persistent Triton kernel) vs ``F.linear``, bf16,
for every projection shape of SmolLM2-135M and of a Llama-3.2-1B-shaped model, at
M = 1 ... 4096 rows. Times are device times of calls replayed in a CUDA graph (what the
engine's decode graphs see), and eager ``do_bench`` times (with Python dispatch). Each
row also checks the invariance bits (row 0 at this M == row 0 at M = 1) for ours and
for cuBLAS. Per model: the ratio for one transformer layer's seven projections at each
M. Row kernels: RMSNorm's mean over the hidden size and softmax over the vocabulary.
``--sweep`` times a few other tile configurations and says whether each gives the same
bits as the default (if all agree, a configuration chosen by M would stay invariant).
Writes JSON to benchmarks/out/ and to $OUT when set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from pagedkv.ops import invariant as inv  # noqa: E402
from pagedkv.ops import triton_matmul  # noqa: E402
from pagedkv.ops.triton_matmul import GemmConfig  # noqa: E402

DEV = torch.device("cuda")
BF = torch.bfloat16
# (name, K, N, count per layer); lm_head once per model
MODELS = {
    "smollm2-135m": [
        ("q/o", 576, 576, 2), ("k/v", 576, 192, 2), ("gate/up", 576, 1536, 2),
        ("down", 1536, 576, 1), ("lm_head", 576, 49152, 0),
    ],
    "llama-1b": [
        ("q/o", 2048, 2048, 2), ("k/v", 2048, 512, 2), ("gate/up", 2048, 8192, 2),
        ("down", 8192, 2048, 1), ("lm_head", 2048, 128256, 0),
    ],
}  # fmt: skip
MS = (1, 4, 16, 64, 256, 1024, 4096)
SWEEP = [
    GemmConfig(64, 128, 64, num_warps=4, num_stages=3),
    GemmConfig(128, 256, 64, num_warps=8, num_stages=3),
    GemmConfig(64, 64, 64, num_warps=4, num_stages=4),
    GemmConfig(128, 128, 64, num_warps=4, num_stages=4),
]
RES: dict = {"device": None, "gemm": [], "layer": [], "rows": [], "sweep": []}


def eager_time(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=40, return_mode="median") / 1e3


def graph_time(fn, out_elems: int = 0, replays: int = 5) -> float:
    """Device seconds per call: several calls captured in one CUDA graph (each keeps its
    output in the graph's pool, so fewer for large outputs), best of a few replays."""
    calls = 20 if out_elems <= 2**24 else 3
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    best = float("inf")
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / calls)
    return best


def bench_gemm(ms, quick: bool) -> None:
    print(f"{'model':13} {'proj':8} {'K':>5} {'N':>6} {'M':>5} | {'cuBLAS µs':>9} {'ours µs':>8} "
          f"{'ratio':>5} | {'eager ours':>10} | bits ours/cuBLAS")  # fmt: skip
    for model, shapes in MODELS.items():
        per_m = {m: [0.0, 0.0] for m in ms}
        for name, k, n, count in shapes:
            torch.manual_seed(k * n)
            w = torch.randn(n, k, device=DEV, dtype=BF) / k**0.5
            x_all = torch.randn(max(ms), k, device=DEV, dtype=BF)
            ours1, theirs1 = inv.linear(x_all[:1], w)[0], F.linear(x_all[:1], w)[0]
            for m in ms:
                x = x_all[:m]
                t_torch = graph_time(lambda x=x, w=w: F.linear(x, w), m * n)
                t_ours = graph_time(lambda x=x, w=w: inv.linear(x, w), m * n)
                t_eager = (
                    eager_time(lambda x=x, w=w: inv.linear(x, w)) if not quick else float("nan")
                )
                bits = (
                    torch.equal(inv.linear(x, w)[0], ours1),
                    torch.equal(F.linear(x, w)[0], theirs1),
                )
                print(f"{model:13} {name:8} {k:5} {n:6} {m:5} | {t_torch * 1e6:9.1f} "
                      f"{t_ours * 1e6:8.1f} {t_ours / t_torch:5.2f} | {t_eager * 1e6:10.1f} | "
                      f"{'ok' if bits[0] else 'DIFF'} / {'ok' if bits[1] else 'diff'}")  # fmt: skip
                RES["gemm"].append(dict(
                    model=model, proj=name, K=k, N=n, M=m, torch_us=t_torch * 1e6,
                    ours_us=t_ours * 1e6, ratio=t_ours / t_torch, ours_eager_us=t_eager * 1e6,
                    ours_invariant=bits[0], torch_invariant=bits[1],
                ))  # fmt: skip
                per_m[m][0] += count * t_torch
                per_m[m][1] += count * t_ours
        for m, (tt, to) in per_m.items():
            RES["layer"].append(dict(model=model, M=m, torch_us=tt * 1e6, ours_us=to * 1e6,
                                     ratio=to / tt))  # fmt: skip
    print("\none layer's 7 projections (q, k, v, o, gate, up, down): ours / cuBLAS")
    for model in MODELS:
        cells = [f"M={r['M']}: {r['ratio']:.2f}" for r in RES["layer"] if r["model"] == model]
        print(f"  {model:13} " + "  ".join(cells))


def bench_rows(quick: bool) -> None:
    print("\nrow kernels (graph µs)      torch    ours  ratio  bits ours/torch")
    cases = [("rms mean", 576), ("rms mean", 2048), ("softmax", 49152), ("softmax", 128256)]
    for name, n in cases:
        for m in (1, 256, 4096) if name == "rms mean" else (1, 64, 256):
            x = torch.randn(m, n, device=DEV)
            if name == "rms mean":
                ours = lambda x=x: inv.reduce_mean(x, -1, keepdim=True)  # noqa: E731
                theirs = lambda x=x: x.mean(-1, keepdim=True)  # noqa: E731
            else:
                ours = lambda x=x: inv.softmax(x, -1)  # noqa: E731
                theirs = lambda x=x: torch.softmax(x, -1)  # noqa: E731
            t_t, t_o = graph_time(theirs, m * n), graph_time(ours, m * n)
            o1 = inv.softmax(x[:1], -1) if name == "softmax" else inv.reduce_mean(x[:1], -1, True)
            t1 = torch.softmax(x[:1], -1) if name == "softmax" else x[:1].mean(-1, keepdim=True)
            bits = (torch.equal(ours()[0], o1[0]), torch.equal(theirs()[0], t1[0]))
            print(f"  {name:9} n={n:6} M={m:4}  {t_t * 1e6:7.1f} {t_o * 1e6:7.1f} {t_o / t_t:6.2f}"
                  f"  {'ok' if bits[0] else 'DIFF'} / {'ok' if bits[1] else 'diff'}")  # fmt: skip
            RES["rows"].append(dict(op=name, N=n, M=m, torch_us=t_t * 1e6, ours_us=t_o * 1e6,
                                    ours_invariant=bits[0], torch_invariant=bits[1]))  # fmt: skip


def bench_sweep(ms) -> None:
    print("\nsweep: configurations other than the default (graph µs; 'same bits' = identical "
          "output to the default config)")  # fmt: skip
    default = triton_matmul.default_config(BF, 0, 0, "tf32")
    for model, shapes in MODELS.items():
        for name, k, n, _ in shapes:
            w = torch.randn(n, k, device=DEV, dtype=BF) / k**0.5
            for m in ms:
                x = torch.randn(1, m, k, device=DEV, dtype=BF)
                b = w.t()[None]
                ref = triton_matmul.gemm(x, b, config=default)
                t = graph_time(lambda x=x, b=b: triton_matmul.gemm(x, b, config=default), m * n)
                cells = [f"default {t * 1e6:.1f}"]
                for cfg in SWEEP:
                    t = graph_time(
                        lambda x=x, b=b, c=cfg: triton_matmul.gemm(x, b, config=c), m * n
                    )
                    same = torch.equal(triton_matmul.gemm(x, b, config=cfg), ref)
                    tag = "{}x{}x{}w{}s{}".format(*cfg[:3], cfg.num_warps, cfg.num_stages)
                    cells.append(f"{tag} {t * 1e6:.1f}{'' if same else ' (other bits)'}")
                    RES["sweep"].append(dict(model=model, proj=name, M=m, config=tag,
                                             us=t * 1e6, same_bits=same))  # fmt: skip
                print(f"  {model} {name} M={m}: " + " | ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer M, no eager timings")
    ap.add_argument("--sweep", action="store_true", help="also time other tile configurations")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_invariant.py needs a CUDA GPU")
    RES["device"] = torch.cuda.get_device_name()
    print(RES["device"], "torch", torch.__version__, time.strftime("%Y-%m-%d"))
    ms = (1, 16, 256, 4096) if args.quick else MS
    t0 = time.time()
    bench_gemm(ms, args.quick)
    bench_rows(args.quick)
    if args.sweep:
        bench_sweep((1, 64, 256, 4096))
    print(f"\ndone in {time.time() - t0:.0f} s")
    for d in {os.path.join(os.path.dirname(__file__), "out"), os.environ.get("OUT") or ""} - {""}:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "bench_invariant.json"), "w") as f:
            json.dump(RES, f, indent=1)


if __name__ == "__main__":
    main()
