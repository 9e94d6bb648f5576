"""Pieces of benchmarks/bench_quant_sweep.py: random quantized caches laid out as a
KVPool's views, CUDA-graph timing, FlashInfer's fp8 decode, parallel compiling."""

from __future__ import annotations

import statistics
import time

import torch

from pagedkv.ops import decode_splits, reference_quant

HEADS = {"big": (32, 8, 128), "smol": (9, 3, 64)}
BS = 16
L2_ROTATE = 256 * 2**20  # keep the bytes a graph replays beyond L2 (50 MB on an H200)
KV = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


# ---- tensors -------------------------------------------------------------------------------
def make_cache(nb: int, hkv: int, d: int, fmt: str, dev, seed: int):
    """(k, v, k_scales, v_scales) laid out as a one-layer KVPool's views (random payload:
    fp8 below 2 in magnitude, no NaN code; int8 in [-127, 127]; bf16 normal)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    shape = (2, nb, BS, hkv, d)
    if fmt == "bf16":
        kv = torch.empty(shape, dtype=torch.bfloat16, device=dev).normal_(generator=g)
        return kv[0], kv[1], None, None
    if fmt == "int8":
        kv = torch.randint(-127, 128, shape, dtype=torch.int8, device=dev, generator=g)
    else:  # exponent field <= 7: |x| < 2, and never the NaN code
        kv = torch.randint(0, 256, shape, dtype=torch.uint8, device=dev, generator=g)
        kv = (kv & 0xBF).view(KV[fmt])
    sc = torch.rand(2, nb, hkv, device=dev, generator=g) * 0.05 + 0.01
    return kv[0], kv[1], sc[0], sc[1]


def dequantized(cache, tables: torch.Tensor):
    """The blocks of ``tables`` as a compact bf16 cache (+ its tables)."""
    k, v, ks, vs = cache
    idx = tables.reshape(-1).long()
    kd = reference_quant.dequantize(k[idx], ks[idx], torch.float32).to(torch.bfloat16)
    vd = reference_quant.dequantize(v[idx], vs[idx], torch.float32).to(torch.bfloat16)
    bt = torch.arange(idx.numel(), dtype=torch.int32, device=k.device).view(tables.shape)
    return kd, vd, bt


def rotations(nbytes: int, quick: bool) -> int:
    return 1 if quick or nbytes >= L2_ROTATE else max(2, min(64, -(-L2_ROTATE // nbytes)))


# ---- timing --------------------------------------------------------------------------------
def time_call(fns: list, quick: bool, replays: int = 5) -> float:
    """Seconds per call of ``fns`` (cycled: one per rotated cache): k calls captured in a
    CUDA graph, replays timed with events (on CPU: wall clock of one call)."""
    if quick:
        t = time.perf_counter()
        fns[0]()
        return time.perf_counter() - t
    for f in fns[:2]:
        f()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for i in range(3):
        fns[i % len(fns)]()
    b.record()
    b.synchronize()
    est = a.elapsed_time(b) / 3e3
    k = max(len(fns), min(64, int(3e-3 / max(est, 1e-6))))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fns[0]()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(k):
            fns[i % len(fns)]()
    graph.replay()
    ts = []
    for _ in range(replays):
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3 / k)
    del graph
    return statistics.median(ts)


def copy_time(nbytes: int, dev, quick: bool) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return time_call([lambda: dst.copy_(src)], quick)


def flashinfer_fp8(q, cache, tables, lens, hq, hkv, d, quick: bool):
    """FlashInfer's fp8-KV decode over the same payload (scale 1; None when unavailable)."""
    import flashinfer

    k, v = cache[0], cache[1]
    B, nbps = tables.shape
    dev = q.device
    indptr = torch.arange(0, B * nbps + 1, nbps, dtype=torch.int32, device=dev)
    last = ((lens - 1) % BS + 1).to(torch.int32)
    ws = torch.zeros(256 * 2**20, dtype=torch.uint8, device=dev)
    best = None
    for tc in (False, True):
        try:
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
            w.plan(indptr, tables.reshape(-1), last, hq, hkv, d, BS, pos_encoding_mode="NONE",
                   q_data_type=q.dtype, kv_data_type=k.dtype)  # fmt: skip
            out = torch.empty_like(q)
            t = time_call([lambda w=w, out=out: w.run(q, (k, v), out=out, k_scale=1.0,
                                                      v_scale=1.0)], quick)  # fmt: skip
            best = t if best is None else min(best, t)
        except Exception:  # one wrapper kind may not support these heads
            continue
    return best


# ---- compiling in parallel ------------------------------------------------------------------
def _compile_job(job: tuple) -> tuple:
    """(job, error or None, seconds): compile (by launching on an empty batch) the direct
    and the split kernel of one config, or (cfg None) the merge variants of one head shape."""
    heads, fmt, items = job
    cfg = None if items is None else dict(items)
    t0 = time.time()
    try:
        from pagedkv.ops import triton_decode as td

        hq, hkv, d = HEADS[heads]
        dev = torch.device("cuda")
        k, v, ks, vs = make_cache(2, hkv, d, fmt, dev, 0)
        q = torch.zeros(1, hq, d, dtype=torch.bfloat16, device=dev)
        bt = torch.zeros(1, 2, dtype=torch.int32, device=dev)
        sl = torch.zeros(1, dtype=torch.int32, device=dev)
        kern = td.kernels(q, k, v, bt, sl, None, False, False, cfg, ks, vs)
        scal = td.scalars(d**-0.5, None, None)
        counts = (1, 2) if cfg is not None else (2, 3, 5, 9, 17, 33, 65, 129)
        for c in counts:  # seq_len 0: no key is read
            kern.run(
                q,
                k,
                v,
                bt,
                sl,
                None,
                scal,
                None,
                k_scales=ks,
                v_scales=vs,
                splits=decode_splits.SplitPlan(decode_splits.MIN_SPLIT_TOKENS, c, False),
            )
        torch.cuda.synchronize()
        return job, None, time.time() - t0
    except Exception as e:
        return job, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300], 0.0


def precompile(jobs: list[tuple], workers: int, deadline: float) -> dict:
    """Run :func:`_compile_job` over ``jobs`` in ``workers`` processes; {job: error}."""
    import multiprocessing as mp

    errors: dict = {}
    if workers <= 0 or not jobs:
        return errors
    with mp.get_context("spawn").Pool(workers) as pool:
        it = pool.imap_unordered(_compile_job, jobs)
        for _ in jobs:
            left = deadline - time.time()
            if left <= 0:
                print("compile: out of time, the rest compiles on first use", flush=True)
                break
            try:
                job, err, _secs = it.next(timeout=left)
            except mp.TimeoutError:
                break
            if err:
                errors[job] = err
        pool.terminate()
    return errors
