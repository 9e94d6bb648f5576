"""Batch-invariant GEMM and row kernels vs torch (cuBLAS / torch CUDA) on one GPU.

    PYTHONPATH=src python benchmarks/bench_invariant.py [--quick] [--sweep] [--eager]

GEMM: ``pagedkv.ops.invariant.linear`` (the persistent Triton kernel, configuration chosen
per shape among those verified bit-identical to the default) vs ``F.linear``, bf16, for
every projection shape of SmolLM2-135M and of a Llama-3.2-1B-shaped model, at M = 1 ...
4096 rows. Times are device times of calls replayed in a CUDA graph (what the engine's
decode graphs see); ``--eager`` adds ``do_bench`` times with Python dispatch. Each row
also checks the invariance bits (row 0 at this M == row 0 at M = 1) for ours and for
cuBLAS, and names the configuration used. Per model: the ratio for one transformer
layer's seven projections at each M. Row kernels: RMSNorm's mean over the hidden size,
softmax / log-softmax over the vocabulary, cumsum (top-p) over it.

``--sweep`` times every candidate configuration (the ladder the selector chooses from,
plus a few others: 16-row mma.sync tiles, 128x256) at each shape and M, with its ratio to
cuBLAS and whether its output is bit-identical to the default configuration's; per shape
and M the fastest identical configuration and what the selector picked. One run decides
the ladder (gemm_select.py). Writes JSON to benchmarks/out/ and to $OUT when set.
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
from pagedkv.ops import gemm_select as gs  # noqa: E402
from pagedkv.ops import invariant as inv  # noqa: E402
from pagedkv.ops import triton_matmul as tm  # noqa: E402
from pagedkv.ops.gemm_select import GemmConfig  # noqa: E402

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
MS = (1, 16, 64, 256, 1024, 4096)
EXTRA = (  # candidates outside the ladder (BLOCK_M 16: mma.sync instead of wgmma)
    GemmConfig(128, 256, 64, num_warps=8, num_stages=3),
    GemmConfig(128, 64, 64, num_warps=4, num_stages=4, per_sm=2),
    GemmConfig(64, 16, 128, num_warps=4, num_stages=4, per_sm=2),
    GemmConfig(64, 8, 256, num_warps=4, num_stages=4),
    GemmConfig(16, 64, 128, num_warps=4, num_stages=4, per_sm=2),
    GemmConfig(16, 16, 256, num_warps=4, num_stages=6, per_sm=2),
)
RES: dict = {"device": None, "gemm": [], "layer": [], "rows": [], "sweep": [], "best": []}


def eager_time(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=40, return_mode="median") / 1e3


def graph_time(fn, work: float) -> float:
    """Device seconds per call: several calls captured in one CUDA graph (fewer for big
    problems; ``work`` ~ flops), best of three replays."""
    calls = int(max(2, min(20, 4e10 / max(work, 1.0))))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # compiles, and lets the selector check its pick (no check inside a capture)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / calls)
    del g
    return best


def _weights(k: int, n: int, m_max: int):
    torch.manual_seed(k * n)
    w = torch.randn(n, k, device=DEV, dtype=BF) / k**0.5
    return w, torch.randn(m_max, k, device=DEV, dtype=BF)


def bench_gemm(ms, eager: bool) -> None:
    print(f"{'model':13} {'proj':8} {'K':>5} {'N':>6} {'M':>5} | {'cuBLAS µs':>9} {'ours µs':>8} "
          f"{'ratio':>5} {'config':>18} | {'eager':>7} | bits ours/cuBLAS")  # fmt: skip
    sms = tm.num_sms(DEV)
    for model, shapes in MODELS.items():
        per_m = {m: [0.0, 0.0] for m in ms}
        for name, k, n, count in shapes:
            w, x_all = _weights(k, n, max(ms))
            ours1, theirs1 = inv.linear(x_all[:1], w)[0], F.linear(x_all[:1], w)[0]
            for m in ms:
                x = x_all[:m]
                work = 2.0 * m * n * k
                t_torch = graph_time(lambda x=x, w=w: F.linear(x, w), work)
                t_ours = graph_time(lambda x=x, w=w: inv.linear(x, w), work)
                t_eager = eager_time(lambda x=x, w=w: inv.linear(x, w)) if eager else float("nan")
                picked = gs.pick(gs.ladder(BF, "native"), 1, m, n, sms)
                key = ("cuda:0", str(BF), n, k, "native", "k-contiguous", picked.tag)
                used = picked.tag if tm.SELECTOR.verdicts().get(key, True) else "default"
                bits = (
                    torch.equal(inv.linear(x, w)[0], ours1),
                    torch.equal(F.linear(x, w)[0], theirs1),
                )
                print(f"{model:13} {name:8} {k:5} {n:6} {m:5} | {t_torch * 1e6:9.1f} "
                      f"{t_ours * 1e6:8.1f} {t_ours / t_torch:5.2f} {used:>18} | "
                      f"{t_eager * 1e6:7.1f} | {'ok' if bits[0] else 'DIFF'} / "
                      f"{'ok' if bits[1] else 'diff'}")  # fmt: skip
                RES["gemm"].append(dict(
                    model=model, proj=name, K=k, N=n, M=m, torch_us=t_torch * 1e6,
                    ours_us=t_ours * 1e6, ratio=t_ours / t_torch, config=used,
                    ours_eager_us=t_eager * 1e6, ours_invariant=bits[0], torch_invariant=bits[1],
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
    print("selector verdicts (config checked bit-identical to the default):")
    for key, same in tm.SELECTOR.verdicts().items():
        print(f"  N={key[2]:6} K={key[3]:5} {key[-1]:18} {'identical' if same else 'OTHER BITS'}")
    RES["verdicts"] = [dict(N=k[2], K=k[3], config=k[-1], identical=v)
                       for k, v in tm.SELECTOR.verdicts().items()]  # fmt: skip


def _row_cases():
    return [
        ("rms mean", 576, (1, 256, 4096), lambda x: inv.reduce_mean(x, -1, keepdim=True),
         lambda x: x.mean(-1, keepdim=True)),
        ("rms mean", 2048, (1, 256, 4096), lambda x: inv.reduce_mean(x, -1, keepdim=True),
         lambda x: x.mean(-1, keepdim=True)),
        ("softmax", 49152, (1, 64, 256), lambda x: inv.softmax(x, -1),
         lambda x: torch.softmax(x, -1)),
        ("softmax", 128256, (1, 64, 256), lambda x: inv.softmax(x, -1),
         lambda x: torch.softmax(x, -1)),
        ("log_softmax", 128256, (1, 64), lambda x: inv.log_softmax(x, -1),
         lambda x: torch.log_softmax(x, -1)),
        ("cumsum", 128256, (1, 64), lambda x: inv.cumsum(x, -1), lambda x: x.cumsum(-1)),
    ]  # fmt: skip


def bench_rows() -> None:
    print("\nrow kernels (graph µs)         torch    ours  ratio  bits ours/torch")
    for name, n, ms, ours, theirs in _row_cases():
        for m in ms:
            x = torch.randn(m, n, device=DEV)
            t_t = graph_time(lambda x=x, f=theirs: f(x), 4e6 * m * n / 2**20)
            t_o = graph_time(lambda x=x, f=ours: f(x), 4e6 * m * n / 2**20)
            bits = (torch.equal(ours(x)[0], ours(x[:1])[0]),
                    torch.equal(theirs(x)[0], theirs(x[:1])[0]))  # fmt: skip
            print(f"  {name:11} n={n:6} M={m:4}  {t_t * 1e6:7.1f} {t_o * 1e6:7.1f} "
                  f"{t_o / t_t:6.2f}  {'ok' if bits[0] else 'DIFF'} / "
                  f"{'ok' if bits[1] else 'diff'}")  # fmt: skip
            RES["rows"].append(dict(op=name, N=n, M=m, torch_us=t_t * 1e6, ours_us=t_o * 1e6,
                                    ours_invariant=bits[0], torch_invariant=bits[1]))  # fmt: skip


def bench_sweep(ms) -> None:
    ladder = gs.ladder(BF, "native")
    default = ladder[0]
    configs = list(dict.fromkeys(ladder + EXTRA))
    sms = tm.num_sms(DEV)
    print(f"\nsweep: graph µs / ratio to cuBLAS per configuration; '*' = other bits than the "
          f"default {default.tag}; 'x' = failed")  # fmt: skip
    for model, shapes in MODELS.items():
        for name, k, n, _ in shapes:
            w, x_all = _weights(k, n, max(ms))
            b = w.t()[None]
            for m in ms:
                x = x_all[None, :m]
                work = 2.0 * m * n * k
                t_cublas = graph_time(lambda x=x, w=w: F.linear(x[0], w), work)
                f32 = torch.float32  # bits compared on the accumulators (as the selector)
                want = tm.gemm(x, b, config=default, out_dtype=f32)
                cells, rows = [], []
                for cfg in configs:
                    try:
                        t = graph_time(lambda x=x, b=b, c=cfg: tm.gemm(x, b, config=c), work)
                        same = torch.equal(tm.gemm(x, b, config=cfg, out_dtype=f32), want)
                    except Exception as e:  # a config this GPU cannot run (shared memory)
                        cells.append(f"{cfg.tag} x")
                        rows.append(dict(config=cfg.tag, error=f"{type(e).__name__}: {e}"))
                        continue
                    cells.append(f"{cfg.tag} {t * 1e6:.1f}/{t / t_cublas:.2f}"
                                 f"{'' if same else '*'}")  # fmt: skip
                    rows.append(dict(config=cfg.tag, us=t * 1e6, ratio=t / t_cublas,
                                     same_bits=same, in_ladder=cfg in ladder))  # fmt: skip
                for r in rows:
                    RES["sweep"].append(dict(model=model, proj=name, K=k, N=n, M=m,
                                             cublas_us=t_cublas * 1e6, **r))  # fmt: skip
                ok = [r for r in rows if r.get("same_bits")] or [dict(config="-", ratio=0.0)]
                best = min(ok, key=lambda r: r.get("us", 0.0))
                pick = gs.pick(ladder, 1, m, n, sms).tag
                picked = next((r for r in rows if r["config"] == pick), {})
                RES["best"].append(dict(model=model, proj=name, M=m, best=best["config"],
                                        best_ratio=best["ratio"], picked=pick,
                                        picked_ratio=picked.get("ratio")))  # fmt: skip
                print(f"  {model} {name} M={m} cuBLAS {t_cublas * 1e6:.1f} µs | best "
                      f"{best['config']} {best['ratio']:.2f}, picked {pick} "
                      f"{picked.get('ratio', float('nan')):.2f}")  # fmt: skip
                print("      " + " | ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="M = 1, 64, 1024 only")
    ap.add_argument("--sweep", action="store_true", help="also time every tile configuration")
    ap.add_argument("--eager", action="store_true", help="also time eager calls (do_bench)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_invariant.py needs a CUDA GPU")
    RES["device"] = torch.cuda.get_device_name()
    print(RES["device"], "torch", torch.__version__, time.strftime("%Y-%m-%d"))
    ms = (1, 64, 1024) if args.quick else MS
    t0 = time.time()
    bench_gemm(ms, args.eager)
    _save()  # after each part: a run cut short by a time limit keeps what it measured
    bench_rows()
    _save()
    if args.sweep:
        bench_sweep(ms)
        _save()
    print(f"\ndone in {time.time() - t0:.0f} s")


def _save() -> None:
    for d in {os.path.join(os.path.dirname(__file__), "out"), os.environ.get("OUT") or ""} - {""}:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "bench_invariant.json"), "w") as f:
            json.dump(RES, f, indent=1)


if __name__ == "__main__":
    main()
