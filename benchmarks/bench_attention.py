"""Attention / KV-movement benchmark on one CUDA GPU (one run, one table).

    PYTHONPATH=src python benchmarks/bench_attention.py [--quick] [--sweep] [--no-flashinfer]
    PYTHONPATH=src python benchmarks/bench_attention.py --features  # window/softcap/sinks only

Decode: B in {1,16,64,128} x ctx in {512,4096,16384}, Hq 32, Hkv 8, D 128, bf16, block 16,
blocks in random order: pagedkv Triton (do_bench, and a DecodePlan replayed in a CUDA
graph), FlashInfer BatchDecodeWithPagedKVCacheWrapper on the same pool (if importable),
SDPA flash over a contiguous copy. Bandwidth = KV bytes read / time, as a fraction of the
device-to-device copy bandwidth (read + write) measured in the same run. Then prefill with
a cached prefix vs SDPA flash, batch-invariant cost, copy_blocks and swap gathers.
Writes JSON and a PNG (decode time over the shapes beside FlashInfer and SDPA, and the
pagedkv / FlashInfer ratio) to benchmarks/out/ and to $OUT when set;
``--replot bench_attention.json`` redraws the PNG of a saved run on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))  # runs uninstalled
from _plot import add_plot_arguments, bars, figure, plot_result, replot  # noqa: E402
from _progress import add_quiet_argument, steps  # noqa: E402
from pagedkv import ops  # noqa: E402
from pagedkv.ops import triton_decode  # noqa: E402
from pagedkv.storage import KVLayout, KVPool  # noqa: E402

DEV = torch.device("cuda")
BF = torch.bfloat16
HQ, HKV, D, BS = 32, 8, 128, 16
L2_ROTATE = 256 * 2**20
RES: dict = {"configs": [], "prefill": [], "invariant": [], "memory": [], "sweep": [],
             "features": []}  # fmt: skip


def do_bench(fn, warmup=25, rep=100) -> float:
    from triton.testing import do_bench as tdb

    return tdb(fn, warmup=warmup, rep=rep, return_mode="median") / 1e3


def bench_graph(fn, est_s, budget_s=0.01, replays=10) -> float:
    """Device time per call: k calls captured in one CUDA graph, replays timed."""
    k = max(1, min(64, int(budget_s / max(est_s, 1e-6))))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(k):
            fn()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3 / k)
    del g
    return statistics.median(ts)


def rotations(nbytes: int) -> int:
    return 1 if nbytes >= L2_ROTATE else max(2, min(64, -(-L2_ROTATE // nbytes)))


def d2d_bandwidth() -> float:
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    t = do_bench(lambda: dst.copy_(src))
    return 2 * n / t / 1e9  # read + write


def make_pools(B, L, nrot):
    """Pools with B sequences of L tokens in random block order; same tables for all."""
    nb = B * -(-L // BS)
    pools = [KVPool(KVLayout(1, HKV, D, BS, BF), nb, DEV) for _ in range(nrot)]
    for p in pools:
        p.kv.normal_()
    perm = torch.randperm(nb, device=DEV).to(torch.int32)
    tables = perm.view(B, -1)
    lens = torch.full((B,), L, dtype=torch.int32, device=DEV)
    return pools, tables, lens


def fi_wrappers(tables, lens):
    try:
        import flashinfer
    except Exception as e:  # not installed / not built: the column stays empty
        RES["flashinfer_error"] = repr(e)[:300]
        return {}
    B, nbps = tables.shape
    indptr = torch.arange(0, B * nbps + 1, nbps, dtype=torch.int32, device=DEV)
    last = ((lens - 1) % BS + 1).to(torch.int32)
    out = {}
    for tc in (False, True):
        try:
            ws = torch.zeros(256 * 2**20, dtype=torch.uint8, device=DEV)
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
            w.plan(indptr, tables.reshape(-1), last, HQ, HKV, D, BS, pos_encoding_mode="NONE",
                   q_data_type=BF, kv_data_type=BF)  # fmt: skip
            out[tc] = w
        except Exception as e:
            RES.setdefault("flashinfer_plan_errors", []).append(repr(e)[:300])
    RES["flashinfer"] = flashinfer.__version__
    return out


def bench_decode(B, L, d2d, use_fi):
    kv_bytes = B * L * HKV * D * 2 * 2
    nrot = rotations(kv_bytes)
    pools, tables, lens = make_pools(B, L, nrot)
    q = torch.randn(B, HQ, D, dtype=BF, device=DEV)
    rec = dict(B=B, L=L, kv_bytes=kv_bytes, n_rot=nrot)
    st = [0]

    def nxt():
        st[0] = (st[0] + 1) % nrot
        return pools[st[0]]

    out = ops.decode_attention(q, pools[0].k(0), pools[0].v(0), tables, lens)
    ref = None
    if kv_bytes <= 2**31:  # the float32 reference needs ~5x the KV bytes
        ref = ops.decode_attention(
            q, pools[0].k(0), pools[0].v(0), tables, lens, backend="reference"
        )
        rec["rel_err"] = ((out.float() - ref.float()).norm() / ref.norm()).item()

    def fn():
        p = nxt()
        ops.decode_attention(q, p.k(0), p.v(0), tables, lens, check=False)

    t = do_bench(fn)
    plan = ops.DecodePlan(B, HQ, HKV, D, BS, L, dtype=BF, device=DEV)

    def fn_plan():
        p = nxt()
        plan.run(q, p.k(0), p.v(0), tables, lens, check=False)

    tg = bench_graph(fn_plan, t)
    rec.update(t_s=t, t_graph_s=tg, frac_d2d=kv_bytes / t / 1e9 / d2d, split=plan.split_tokens,
               frac_d2d_graph=kv_bytes / tg / 1e9 / d2d)  # fmt: skip
    if use_fi:
        for tc, w in fi_wrappers(tables, lens).items():
            fo = torch.empty_like(q)
            try:
                w.run(q, (pools[0].k(0), pools[0].v(0)), out=fo)
                e = None if ref is None else ((fo.float() - ref.float()).norm() / ref.norm()).item()

                def ffn(w=w, fo=fo):
                    p = nxt()
                    w.run(q, (p.k(0), p.v(0)), out=fo)

                tf = do_bench(ffn)
                tfg = bench_graph(ffn, tf)
                rec[f"fi_tc{int(tc)}"] = dict(t_s=tf, t_graph_s=tfg, rel_err=e)
            except Exception as ex:
                rec[f"fi_tc{int(tc)}_error"] = repr(ex)[:300]
        fis = [v for k, v in rec.items() if k.startswith("fi_tc") and isinstance(v, dict)]
        if fis:
            rec["fi_best_s"] = min(f["t_s"] for f in fis)
            rec["fi_best_graph_s"] = min(f["t_graph_s"] for f in fis)
    pools.clear()
    try:  # SDPA flash over a contiguous cache (GQA folded into query rows)
        nr = rotations(kv_bytes)
        ks = [torch.randn(B, HKV, L, D, dtype=BF, device=DEV) for _ in range(nr)]
        vs = [torch.randn(B, HKV, L, D, dtype=BF, device=DEV) for _ in range(nr)]
        qs = q.view(B, HKV, HQ // HKV, D)

        def sfn():
            st[0] = (st[0] + 1) % nr
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(qs, ks[st[0] % nr], vs[st[0] % nr])

        rec["sdpa_s"] = do_bench(sfn)
    except Exception as ex:
        rec["sdpa_error"] = repr(ex)[:200]
    torch.cuda.empty_cache()
    return rec


def bench_prefill(B, prefix, new):
    L = prefix + new
    pools, tables, lens = make_pools(B, L, 1)
    p = pools[0]
    q = torch.randn(B * new, HQ, D, dtype=BF, device=DEV)
    cu = torch.arange(0, B * new + 1, new, dtype=torch.int32, device=DEV)
    out = ops.prefill_attention(q, cu, p.k(0), p.v(0), tables, lens, max_q_len=new)
    t = do_bench(lambda: ops.prefill_attention(q, cu, p.k(0), p.v(0), tables, lens,
                                               max_q_len=new, check=False))  # fmt: skip
    # SDPA flash on contiguous K/V of the same lengths; bottom-right causal mask
    k, v = p.gather(0, tables[0], L)
    kc = k.transpose(0, 1)[None].expand(B, HKV, L, D).contiguous()
    vc = v.transpose(0, 1)[None].expand(B, HKV, L, D).contiguous()
    qc = q.view(B, new, HQ, D).transpose(1, 2).contiguous()
    rec = dict(B=B, prefix=prefix, new=new, t_s=t)
    flops = 4 * B * HQ * D * new * (prefix + (new + 1) / 2)
    rec["tflops"] = flops / t / 1e12
    try:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(new, L) if prefix else None

        def sfn():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(
                    qc, kc, vc, attn_mask=mask, is_causal=not prefix, enable_gqa=True
                )

        so = sfn()
        ref0 = so[0].transpose(0, 1)
        err = (out[:new].float() - ref0.float()).norm() / ref0.float().norm()
        rec["rel_err_vs_sdpa"] = err.item()
        rec["sdpa_s"] = do_bench(sfn)
        rec["ratio_sdpa_over_pagedkv"] = rec["sdpa_s"] / t
    except Exception as ex:
        rec["sdpa_error"] = repr(ex)[:300]
    pools.clear()
    torch.cuda.empty_cache()
    return rec


def bench_invariant(B, L, d2d):
    pools, tables, lens = make_pools(B, L, rotations(B * L * HKV * D * 4))
    q = torch.randn(B, HQ, D, dtype=BF, device=DEV)
    rec = dict(B=B, L=L)
    for inv in (False, True):
        plan = ops.DecodePlan(B, HQ, HKV, D, BS, L, dtype=BF, device=DEV, batch_invariant=inv)

        def fn(plan=plan, st=[0]):  # noqa: B006 (a counter that lives with the closure)
            st[0] = (st[0] + 1) % len(pools)
            plan.run(q, pools[st[0]].k(0), pools[st[0]].v(0), tables, lens, check=False)

        rec["t_invariant_s" if inv else "t_default_s"] = bench_graph(fn, do_bench(fn))
    rec["cost"] = rec["t_invariant_s"] / rec["t_default_s"]
    pools.clear()
    torch.cuda.empty_cache()
    return rec


def bench_memory(d2d):
    lay = KVLayout(32, 8, 128, 16, BF)  # a 32-layer model: 2 MiB per block
    pool = KVPool(lay, 2048, DEV)
    pool.kv.normal_()
    n = 512
    ids = torch.randperm(2048, device=DEV)[: 2 * n]
    pairs = torch.stack([ids[:n], ids[n:]], 1).cpu()
    src, dst = pairs[:, 0].to(DEV), pairs[:, 1].to(DEV)
    nbytes = n * lay.bytes_per_block
    recs = []
    t = do_bench(lambda: ops.copy_blocks(pool.kv, src, dst))
    recs.append(dict(op="copy_blocks", blocks=n, bytes=nbytes, t_s=t,
                     frac_d2d=2 * nbytes / t / 1e9 / d2d))  # fmt: skip
    t = do_bench(lambda: ops.gather_blocks(pool.kv, src))
    recs.append(dict(op="gather_blocks (device staging)", bytes=nbytes, t_s=t,
                     frac_d2d=2 * nbytes / t / 1e9 / d2d))  # fmt: skip
    out = torch.empty(n, lay.bytes_per_block, dtype=torch.uint8, pin_memory=True)
    flat = torch.empty(nbytes, dtype=torch.uint8, device=DEV)

    def timed(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    t_raw = timed(lambda: out.view(-1).copy_(flat, non_blocking=True))
    t = timed(lambda: pool.read_blocks(src, out=out, non_blocking=True))
    recs.append(dict(op="read_blocks D2H pinned", bytes=nbytes, t_s=t, t_contiguous_s=t_raw,
                     frac_contiguous=t_raw / t, GBps=nbytes / t / 1e9))  # fmt: skip
    t_raw = timed(lambda: flat.copy_(out.view(-1), non_blocking=True))
    t = timed(lambda: pool.write_blocks(dst, out, non_blocking=True))
    recs.append(dict(op="write_blocks H2D pinned", bytes=nbytes, t_s=t, t_contiguous_s=t_raw,
                     frac_contiguous=t_raw / t, GBps=nbytes / t / 1e9))  # fmt: skip
    torch.cuda.empty_cache()
    return recs


def bench_host():
    """Host time per eager call at B=1 ctx 512 (GPU time ~7 us): launch overhead."""
    pools, tables, lens = make_pools(1, 512, 1)
    k, v = pools[0].k(0), pools[0].v(0)
    q = torch.randn(1, HQ, D, dtype=BF, device=DEV)
    plan = ops.DecodePlan(1, HQ, HKV, D, BS, 512, dtype=BF, device=DEV)
    direct = dict(split_tokens=512, out=torch.empty_like(q))
    fns = {
        "ops.decode_attention(check=False)": lambda: ops.decode_attention(
            q, k, v, tables, lens, check=False
        ),
        "ops.decode_attention(check=True)": lambda: ops.decode_attention(q, k, v, tables, lens),
        "triton_decode.decode, 2 kernels": lambda: triton_decode.decode(
            q, k, v, tables, lens, 0.1, split_tokens=64
        ),
        "triton_decode.decode, 1 kernel": lambda: triton_decode.decode(
            q, k, v, tables, lens, 0.1, **direct
        ),
        "DecodePlan.run(check=False)": lambda: plan.run(q, k, v, tables, lens, check=False),
    }
    fi = fi_wrappers(tables, lens) if not RES.get("no_flashinfer") else {}
    if fi:
        fo = torch.empty_like(q)
        fns["flashinfer run"] = lambda: fi[True].run(q, (k, v), out=fo)
    rec = {}
    for name, fn in fns.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(300):
            fn()
        torch.cuda.synchronize()
        rec[name] = (time.perf_counter() - t0) / 300
        print(f"host {name:40s} {rec[name] * 1e6:7.1f} us/call", flush=True)
    RES["host_us_per_call"] = {k_: v_ * 1e6 for k_, v_ in rec.items()}


def sweep(d2d):
    """Decode tile / split options at a few shapes (CUDA-graph time, fraction of d2d)."""
    for B, L in ((64, 4096), (1, 512), (1, 16384), (128, 16384)):
        kv_bytes = B * L * HKV * D * 4
        pools, tables, lens = make_pools(B, L, rotations(kv_bytes))
        q = torch.randn(B, HQ, D, dtype=BF, device=DEV)
        out = torch.empty_like(q)
        for bn in (32, 64, 128):
            for nw, ns in ((4, 2), (4, 3), (8, 3)):
                for split in sorted({64, 256, 512, 1024, 2048, L} & set(range(64, L + 1))):
                    if B * HKV * (L // split) > 16384 or (bn == 128 and split < 128):
                        continue
                    cfg = dict(BLOCK_N=bn, num_warps=nw, num_stages=ns)

                    def fn(pools=pools, q=q, tables=tables, lens=lens, out=out, split=split,
                           cfg=cfg, st=[0]):  # noqa: B006  # fmt: skip
                        st[0] = (st[0] + 1) % len(pools)
                        p = pools[st[0]]
                        triton_decode.decode(q, p.k(0), p.v(0), tables, lens, D**-0.5,
                                             split_tokens=split, out=out, cfg=cfg)  # fmt: skip

                    try:
                        tg = bench_graph(fn, 1e-4, budget_s=0.003, replays=5)
                        r = dict(B=B, L=L, **cfg, split=split, t_graph_s=tg,
                                 frac_d2d=kv_bytes / tg / 1e9 / d2d)  # fmt: skip
                    except Exception as e:
                        r = dict(B=B, L=L, **cfg, split=split, error=repr(e)[:200])
                    RES["sweep"].append(r)
        mine = [r for r in RES["sweep"] if r["B"] == B and r["L"] == L and "t_graph_s" in r]
        best = min(mine, key=lambda r: r["t_graph_s"]) if mine else None
        print("sweep best", json.dumps(best), flush=True)
        pools.clear()
        torch.cuda.empty_cache()


# ---- sliding window / softcap / sinks (issue 13): `--features` --------------------------------
FEAT_B, FEAT_CTX, FEAT_WINDOW, FEAT_CAP = 64, 16384, 1024, 50.0
FEATURES_JSON = "bench_attention_features.json"


def fi_feature_wrapper(tables, lens, window, softcap):
    """A FlashInfer decode wrapper planned with window_left / logits_soft_cap (one JIT
    build per variant, hence only the CUDA-core decode kernel); None + reason if n/a."""
    try:
        import flashinfer
    except Exception as e:
        return None, f"flashinfer not importable: {e!r}"[:200]
    B, nbps = tables.shape
    indptr = torch.arange(0, B * nbps + 1, nbps, dtype=torch.int32, device=DEV)
    last = ((lens - 1) % BS + 1).to(torch.int32)
    try:
        ws = torch.zeros(256 * 2**20, dtype=torch.uint8, device=DEV)
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=False)
        t0 = time.perf_counter()
        w.plan(indptr, tables.reshape(-1), last, HQ, HKV, D, BS, pos_encoding_mode="NONE",
               window_left=-1 if window is None else window - 1, logits_soft_cap=softcap,
               q_data_type=BF, kv_data_type=BF)  # fmt: skip
        RES.setdefault("fi_plan_s", []).append(time.perf_counter() - t0)
        return w, None
    except Exception as e:
        return None, f"plan failed: {e!r}"[:300]


def bench_features(use_fi):
    """Decode at B=64, ctx 16384 (Hq 32, Hkv 8, D 128, bf16): full attention vs a 1024-token
    window (target: >= 8x faster), softcap 50, window + softcap (Gemma 2 local layers),
    window + sinks (gpt-oss), each eager and as a DecodePlan in a CUDA graph, beside
    FlashInfer's window_left / logits_soft_cap decode on the same pool (no sinks there:
    only its trtllm-gen backend has them). Then windowed prefill with a cached prefix."""
    B, L, W, cap = FEAT_B, FEAT_CTX, FEAT_WINDOW, FEAT_CAP
    pools, tables, lens = make_pools(B, L, 1)
    k, v = pools[0].k(0), pools[0].v(0)
    q = torch.randn(B, HQ, D, dtype=BF, device=DEV)
    sinks = torch.randn(HQ, device=DEV)
    variants = [("full", None, None, False), ("window", W, None, False),
                ("softcap", None, cap, False), ("window+softcap", W, cap, False),
                ("window+sinks", W, None, True)]  # fmt: skip
    fi_builds = None
    if use_fi:  # FlashInfer JIT-builds one module per variant: in the background (nvcc)
        from concurrent.futures import ThreadPoolExecutor

        pool_ex = ThreadPoolExecutor(1)
        fi_builds = {n: pool_ex.submit(fi_feature_wrapper, tables, lens, w, c)
                     for n, w, c, s in variants if not s}  # fmt: skip
    recs, outs = [], {}
    for name, window, softcap, with_sinks in variants:
        kw = dict(window=window, softcap=softcap, sinks=sinks if with_sinks else None)
        rec = dict(variant=name, B=B, L=L, window=window, softcap=softcap, sinks=with_sinks)
        try:
            out = outs[name] = ops.decode_attention(q, k, v, tables, lens, **kw)
            if window is not None:  # the reference reads only the window: cheap enough
                ref = ops.decode_attention(q, k, v, tables, lens, backend="reference", **kw)
                rec["rel_err"] = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            rec["t_s"] = do_bench(
                lambda kw=kw: ops.decode_attention(q, k, v, tables, lens, check=False, **kw)
            )
            plan = ops.DecodePlan(B, HQ, HKV, D, BS, L, dtype=BF, device=DEV, window=window,
                                  softcap=softcap)  # fmt: skip
            rec["split"], rec["num_splits"] = plan.split_tokens, plan.num_splits
            sk = kw["sinks"]
            rec["t_graph_s"] = bench_graph(
                lambda plan=plan, sk=sk: plan.run(q, k, v, tables, lens, sinks=sk, check=False),
                rec["t_s"],
            )
        except Exception as e:
            rec["error"] = repr(e)[:300]
            rec["tb"] = traceback.format_exc()[-800:]
        recs.append(rec)
    full = recs[0]
    print(f"features decode B={B} ctx={L} window={W} cap={cap}: pagedkv", flush=True)
    print(f"{'variant':>15} {'us':>8} {'graph':>8} {'x full':>7} {'x full gr':>9} "
          f"{'splits':>6} {'rel err':>8}", flush=True)  # fmt: skip
    nan = float("nan")
    for rec in recs:
        if "t_s" in rec and "t_s" in full:
            rec["speedup_vs_full"] = full["t_s"] / rec["t_s"]
            rec["speedup_vs_full_graph"] = full["t_graph_s"] / rec["t_graph_s"]
        RES["features"].append(rec)
        if "error" in rec:
            print(rec["variant"], rec["error"], flush=True)
            continue
        print(f"{rec['variant']:>15} {us(rec['t_s'])} {us(rec['t_graph_s'])} "
              f"{rec.get('speedup_vs_full', nan):7.2f} "
              f"{rec.get('speedup_vs_full_graph', nan):9.2f} {rec['num_splits']:>6} "
              f"{rec.get('rel_err', nan):8.1e}", flush=True)  # fmt: skip
    dump(FEATURES_JSON)
    for B_, prefix, new in ((4, 15360, 1024), (1, 0, 8192)):  # before FlashInfer's builds end
        rec = bench_prefill_window(B_, prefix, new, W)
        RES["features"].append(rec)
        print("features prefill", json.dumps(rec), flush=True)
        dump(FEATURES_JSON)
    print(f"{'FlashInfer':>15} {'us':>8} {'graph':>8} {'pk/FI':>6} {'pk/FI gr':>8} {'diff':>8}",
          flush=True)  # fmt: skip
    for rec in recs:
        name = rec["variant"]
        if fi_builds is None:
            rec["fi"] = "skipped (--no-flashinfer)"
        elif name not in fi_builds:
            rec["fi"] = "n/a (sinks: FlashInfer has them in its trtllm-gen backend only)"
        elif name in outs:
            try:
                w, why = fi_builds[name].result()
                if w is None:
                    rec["fi"] = why
                else:
                    fo = torch.empty_like(q)
                    w.run(q, (k, v), out=fo)
                    out = outs[name].float()
                    rec["fi_diff"] = ((fo.float() - out).norm() / out.norm()).item()
                    rec["fi_t_s"] = do_bench(lambda w=w, fo=fo: w.run(q, (k, v), out=fo))
                    rec["fi_t_graph_s"] = bench_graph(
                        lambda w=w, fo=fo: w.run(q, (k, v), out=fo), rec["fi_t_s"]
                    )
            except Exception as e:
                rec["fi"] = f"error {e!r}"[:300]
        dump(FEATURES_JSON)
        if "fi_t_s" in rec and "t_s" in rec:
            print(f"{name:>15} {us(rec['fi_t_s'])} {us(rec['fi_t_graph_s'])} "
                  f"{rec['t_s'] / rec['fi_t_s']:6.2f} "
                  f"{rec['t_graph_s'] / rec['fi_t_graph_s']:8.2f} {rec['fi_diff']:8.1e}",
                  flush=True)  # fmt: skip
        else:
            print(f"{name:>15} n/a: {rec.get('fi', 'no pagedkv result')}", flush=True)
    pools.clear()
    torch.cuda.empty_cache()


def bench_prefill_window(B, prefix, new, window):
    """Prefill of `new` tokens after a cached `prefix`, full attention vs a window."""
    pools, tables, lens = make_pools(B, prefix + new, 1)
    k, v = pools[0].k(0), pools[0].v(0)
    q = torch.randn(B * new, HQ, D, dtype=BF, device=DEV)
    cu = torch.arange(0, B * new + 1, new, dtype=torch.int32, device=DEV)
    rec = dict(variant="prefill", B=B, prefix=prefix, new=new, window=window)
    for name, w in (("full", None), ("window", window)):

        def fn(w=w):
            ops.prefill_attention(q, cu, k, v, tables, lens, window=w, max_q_len=new, check=False)

        fn()
        rec[f"t_{name}_s"] = do_bench(fn)
    rec["speedup_vs_full"] = rec["t_full_s"] / rec["t_window_s"]
    pools.clear()
    torch.cuda.empty_cache()
    return rec


def json_paths(name: str = "bench_attention.json") -> list[str]:
    dirs = (os.path.join(os.path.dirname(__file__), "out"), os.environ.get("OUT"))
    return [os.path.join(d, name) for d in dirs if d]


def dump(name: str = "bench_attention.json"):
    for path in json_paths(name):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(RES, f, indent=1)


def plot(res: dict):
    """Decode time per shape (log µs) for pagedkv, FlashInfer and SDPA; the ratio below."""
    rows = [r for r in res.get("configs", []) if "t_s" in r]
    if not rows:
        raise ValueError("no decode rows in this result to plot")
    us_ = lambda r, k: None if r.get(k) is None else r[k] * 1e6  # noqa: E731
    shapes = [f"B={r['B']}\nctx {r['L']}" for r in rows]
    fig, (top, bottom) = figure(2, 1, size=(max(8.0, 1.1 * len(rows)), 4.0), title=(
        f"paged decode attention, Hq {HQ} / Hkv {HKV}, D {D}, bf16, block {BS}: "
        f"{res.get('device', '?')}, {res.get('date', '?')}"))  # fmt: skip
    series = {
        "pagedkv, CUDA graph": [us_(r, "t_graph_s") for r in rows],
        "FlashInfer, CUDA graph": [us_(r, "fi_best_graph_s") for r in rows],
        "pagedkv, eager": [us_(r, "t_s") for r in rows],
        "FlashInfer, eager": [us_(r, "fi_best_s") for r in rows],
        "SDPA flash, contiguous KV (eager)": [us_(r, "sdpa_s") for r in rows],
    }
    colors = dict(zip(series, ["#1f77b4", "#ff7f0e", "#9ecae1", "#fdd0a2", "#8c8c8c"]))
    bars(top, shapes, series, ylabel="µs per decode call (log)", log=True,
         fmt="{:.0f}".format, colors=colors)  # fmt: skip
    top.set_title("time per call (lower is better)", fontsize=10)
    ratios = {
        "CUDA graph": [r["t_graph_s"] / r["fi_best_graph_s"] if r.get("fi_best_graph_s")
                       else None for r in rows],
        "eager": [r["t_s"] / r["fi_best_s"] if r.get("fi_best_s") else None for r in rows],
    }  # fmt: skip
    if any(v is not None for vs in ratios.values() for v in vs):
        bars(bottom, shapes, ratios, ylabel="pagedkv time / FlashInfer time (log)", log=True,
             fmt="{:.2f}".format, colors={"CUDA graph": "#1f77b4", "eager": "#9ecae1"})  # fmt: skip
        bottom.axhline(1.0, color="k", lw=1, ls="--", label="parity (below: pagedkv faster)")
        bottom.legend(fontsize=8)
        bottom.set_title("pagedkv vs FlashInfer on the same pool and block tables", fontsize=10)
    else:
        bottom.text(0.5, 0.5, "FlashInfer did not run: " + res.get("flashinfer_error", "?")[:90],
                    ha="center", va="center", transform=bottom.transAxes)  # fmt: skip
        bottom.set_axis_off()
    return fig


def us(x):
    return "-" if x is None else f"{x * 1e6:8.1f}"


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 shapes instead of 12")
    ap.add_argument("--sweep", action="store_true", help="also the decode tile/split sweep")
    ap.add_argument("--no-flashinfer", action="store_true")
    ap.add_argument("--features", action="store_true",
                    help="only the sliding-window / softcap / sinks cases (issue 13)")  # fmt: skip
    add_plot_arguments(ap)
    add_quiet_argument(ap)
    args = ap.parse_args(argv)
    if args.replot:
        raise SystemExit(replot(plot, args.replot))
    RES.update(device=torch.cuda.get_device_name(), torch=torch.__version__)
    RES["date"] = time.strftime("%F")
    d2d = d2d_bandwidth()
    RES["d2d_GBps_read_plus_write"] = d2d
    print(f"device {RES['device']}  d2d copy {d2d:.0f} GB/s (read+write)", flush=True)
    RES["no_flashinfer"] = args.no_flashinfer
    if args.features:
        return bench_features(not args.no_flashinfer)
    try:
        bench_host()
    except Exception as e:
        print("host bench error", repr(e), flush=True)
    if args.sweep:
        sweep(d2d)
        dump()
    batches, lens = ((1, 64), (512, 4096)) if args.quick else ((1, 16, 64, 128), (512, 4096, 16384))
    print(f"{'B':>4} {'ctx':>6} {'us':>8} {'graph':>8} {'%d2d':>5} {'%gr':>5} {'FI us':>8} "
          f"{'FI gr':>8} {'pk/FI':>6} {'gr/FIgr':>7} {'sdpa':>8}", flush=True)  # fmt: skip
    total = len(batches) * len(lens) + 3 + 2 + 1  # decode shapes, prefill, invariant, memory
    with steps(total, "attention benchmark", quiet=args.quiet) as bar:
        for B in batches:
            for L in lens:
                try:
                    r = bench_decode(B, L, d2d, not args.no_flashinfer)
                except Exception as e:
                    r = dict(B=B, L=L, error=repr(e)[:300], tb=traceback.format_exc()[-800:])
                    print(r, flush=True)
                    bar.done()
                    continue
                RES["configs"].append(r)
                dump()
                fi, fi_graph = r.get("fi_best_s"), r.get("fi_best_graph_s")
                ratio = r["t_s"] / fi if fi else float("nan")
                ratio_graph = r["t_graph_s"] / fi_graph if fi_graph else float("nan")
                print(f"{B:>4} {L:>6} {us(r['t_s'])} {us(r['t_graph_s'])} "
                      f"{100 * r['frac_d2d']:5.1f} {100 * r['frac_d2d_graph']:5.1f} {us(fi)} "
                      f"{us(fi_graph)} {ratio:6.2f} {ratio_graph:7.2f} {us(r.get('sdpa_s'))}",
                      flush=True)  # fmt: skip
                bar.done()
        for B, prefix, new in ((1, 0, 4096), (4, 3072, 1024), (8, 1536, 512)):
            try:
                r = bench_prefill(B, prefix, new)
            except Exception as e:
                r = dict(B=B, prefix=prefix, new=new, error=repr(e)[:300])
            RES["prefill"].append(r)
            print("prefill", json.dumps(r), flush=True)
            bar.done()
        for B, L in ((1, 4096), (64, 4096)):
            r = bench_invariant(B, L, d2d)
            RES["invariant"].append(r)
            print("invariant", json.dumps(r), flush=True)
            bar.done()
        try:
            for r in bench_memory(d2d):
                RES["memory"].append(r)
                print("memory", json.dumps(r), flush=True)
        except Exception as e:
            RES["memory_error"] = repr(e)[:300]
            print("memory error", repr(e), flush=True)
        bar.done()
    dump()
    if args.plot:
        plot_result(plot, RES, json_paths())


if __name__ == "__main__":
    main()
