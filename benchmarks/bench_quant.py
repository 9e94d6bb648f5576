"""Decode over a compressed (fp8 / int8) KV pool vs bf16, and vs FlashInfer's fp8-KV decode.

    PYTHONPATH=src python benchmarks/bench_quant.py [--shapes 64x4096,128x16384]
                                                    [--formats fp8,int8] [--no-flashinfer]

Hq 32, Hkv 8, D 128, block 16, blocks in random order (as bench_attention.py). Per shape:
pagedkv Triton decode (a DecodePlan replayed in a CUDA graph, and eager) over a bf16 pool
and over each compressed pool (per-(block, head) scales, dequantized in registers); the
speed-up over bf16; FlashInfer BatchDecodeWithPagedKVCacheWrapper over the same fp8
payload (``kv_data_type=float8_e4m3fn``, one per-tensor ``k_scale`` / ``v_scale``, as
vLLM calls it: it has no per-block scales) and over the bf16 pool. Accuracy: each output
against the torch reference (float64 for a compressed pool) over the same stored bytes,
first 8 sequences. Also the cost of write_kv into
a compressed pool vs bf16 (B tokens per step, one layer).

Writes bench_quant.json to benchmarks/out/ and to $OUT when set. Acceptance (issue 17):
fp8 >= 1.7x faster than bf16 and not slower than FlashInfer's fp8 decode at B=64 ctx 4096
and B=128 ctx 16384.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))  # runs uninstalled
from bench_attention import bench_graph, d2d_bandwidth, do_bench, rotations  # noqa: E402
from pagedkv import ops  # noqa: E402
from pagedkv._kv_formats import parse_kv_dtype  # noqa: E402
from pagedkv.storage import KVLayout, KVPool  # noqa: E402

DEV = torch.device("cuda")
BF = torch.bfloat16
HQ, HKV, D, BS = 32, 8, 128, 16
RES: dict = {"decode": [], "write": []}


def make_pools(B: int, L: int, kv_dtype, nrot: int):
    """``nrot`` pools (L2 rotation) of B sequences x L tokens, random block order, filled
    through write_kv in block-sized chunks (real dynamic scales for a compressed pool)."""
    nb = B * -(-L // BS)
    lay = KVLayout(1, HKV, D, BS, BF, kv_dtype=kv_dtype)
    pools = []
    for r in range(nrot):
        p = KVPool(lay, nb, DEV)
        g = torch.Generator(device=DEV).manual_seed(r)
        step = 1 << 16  # tokens per write: bounded scratch
        for a in range(0, nb * BS, step):
            n = min(step, nb * BS - a)
            k = torch.randn(n, HKV, D, dtype=BF, device=DEV, generator=g)
            v = torch.randn(n, HKV, D, dtype=BF, device=DEV, generator=g)
            p.write(0, torch.arange(a, a + n, device=DEV), k, v)
        pools.append(p)
    perm = torch.randperm(nb, device=DEV).to(torch.int32)
    return pools, perm.view(B, -1), torch.full((B,), L, dtype=torch.int32, device=DEV)


REF_SEQS = 8  # sequences checked against the reference (it is slow and large)


def reference(q, pool, tables, lens):
    """The torch reference over the first REF_SEQS sequences: float64 over the dequantized
    stored bytes for a compressed pool, in q's dtype (float32 inside) for bf16."""
    b = slice(0, REF_SEQS)
    qq = q[b].double() if pool.layout.quantized else q[b]
    return ops.decode_attention(
        qq, pool.k(0), pool.v(0), tables[b], lens[b], k_scales=pool.k_scales(0),
        v_scales=pool.v_scales(0), backend="reference",
    ).double()  # fmt: skip


def rel(x, ref) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def flashinfer_run(tables, lens, kv_dtype, k, v, q, k_scale=None, v_scale=None):
    """A planned FlashInfer decode over (k, v); returns (fn, output) or raises."""
    import flashinfer

    B, nbps = tables.shape
    indptr = torch.arange(0, B * nbps + 1, nbps, dtype=torch.int32, device=DEV)
    last = ((lens - 1) % BS + 1).to(torch.int32)
    ws = torch.zeros(256 * 2**20, dtype=torch.uint8, device=DEV)
    best = None
    for tc in (False, True):
        try:
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
            w.plan(indptr, tables.reshape(-1), last, HQ, HKV, D, BS, pos_encoding_mode="NONE",
                   q_data_type=BF, kv_data_type=kv_dtype)  # fmt: skip
            fo = torch.empty_like(q)
            kw = {} if k_scale is None else dict(k_scale=k_scale, v_scale=v_scale)

            def fn(w=w, fo=fo, kw=kw):
                w.run(q, (k, v), out=fo, **kw)

            fn()
            t = do_bench(fn)
            if best is None or t < best[0]:
                best = (t, fn, fo, tc)
        except Exception as e:
            RES.setdefault("flashinfer_errors", []).append(f"tc={tc} {kv_dtype}: {e!r}"[:300])
    if best is None:
        raise RuntimeError("no FlashInfer decode variant ran")
    RES["flashinfer"] = flashinfer.__version__
    return best


def bench_format(B: int, L: int, fmt: str, q: torch.Tensor, use_fi: bool, d2d: float) -> dict:
    """Decode over a pool of ``fmt`` ("bf16", "fp8", "int8", ...): graph and eager time,
    error against the reference, FlashInfer on the same payload (bf16 / fp8)."""
    kv = None if fmt == "bf16" else parse_kv_dtype(fmt)
    kv_bytes = B * L * HKV * D * 2 * (2 if kv is None else 1)
    pools, tables, lens = make_pools(B, L, kv, rotations(kv_bytes))
    p0 = pools[0]
    plan = ops.DecodePlan(B, HQ, HKV, D, BS, L, dtype=BF, device=DEV, kv_dtype=kv)
    st = [0]

    def nxt() -> tuple:
        st[0] = (st[0] + 1) % len(pools)
        p = pools[st[0]]
        return (q, p.k(0), p.v(0), tables, lens), dict(
            k_scales=p.k_scales(0), v_scales=p.v_scales(0), check=False
        )

    def fn() -> None:
        a, kw = nxt()
        plan.run(*a, **kw)

    def eager() -> None:
        a, kw = nxt()
        ops.decode_attention(*a, **kw)

    t = do_bench(eager)
    tg = bench_graph(fn, t)
    r = dict(t_s=t, t_graph_s=tg, kv_bytes=kv_bytes, frac_d2d_graph=kv_bytes / tg / 1e9 / d2d)
    ref = reference(q, p0, tables, lens)
    out = plan.run(q, p0.k(0), p0.v(0), tables, lens, k_scales=p0.k_scales(0),
                   v_scales=p0.v_scales(0))[:REF_SEQS].clone()  # fmt: skip
    r["rel_err_vs_reference_same_bytes"] = rel(out, ref)
    if use_fi and fmt in ("bf16", "fp8"):
        try:
            # FlashInfer has one scale per tensor: it runs on the same fp8 payload with
            # scale 1 (its cost; the per-block scales it cannot apply are ours)
            kw = {} if kv is None else dict(k_scale=1.0, v_scale=1.0)
            tf, ffn, _, tc = flashinfer_run(tables, lens, kv or BF, p0.k(0), p0.v(0), q, **kw)
            r["flashinfer"] = dict(t_s=tf, t_graph_s=bench_graph(ffn, tf), tensor_cores=tc)
        except Exception as e:
            r["flashinfer_error"] = repr(e)[:300]
    pools.clear()
    torch.cuda.empty_cache()
    fi = f"  FI {r['flashinfer']['t_graph_s'] * 1e6:8.1f} us" if "flashinfer" in r else ""
    print(f"B={B} L={L} {fmt:5s} graph {tg * 1e6:8.1f} us  eager {t * 1e6:8.1f} us  "
          f"{r['frac_d2d_graph']:.2f} of d2d  err {r['rel_err_vs_reference_same_bytes']:.1e}"
          f"{fi}", flush=True)  # fmt: skip
    return r


def bench_shape(B: int, L: int, formats: list[str], use_fi: bool, d2d: float) -> dict:
    rec: dict = dict(B=B, L=L)
    q = torch.randn(B, HQ, D, dtype=BF, device=DEV)
    for fmt in ["bf16", *formats]:
        rec[fmt] = bench_format(B, L, fmt, q, use_fi, d2d)
    base = rec["bf16"]["t_graph_s"]
    for fmt in formats:
        rec[fmt]["speedup_vs_bf16"] = base / rec[fmt]["t_graph_s"]
    fi = rec.get("fp8", {}).get("flashinfer")
    if fi:
        rec["fp8"]["ratio_flashinfer_fp8_over_pagedkv"] = fi["t_graph_s"] / rec["fp8"]["t_graph_s"]
    return rec


def bench_write(formats: list[str]) -> None:
    """write_kv of B new tokens (one per sequence, as a decode step) into one layer."""
    for B in (64, 128):
        for fmt in ["bf16", *formats]:
            kv = None if fmt == "bf16" else parse_kv_dtype(fmt)
            pool = KVPool(KVLayout(1, HKV, D, BS, BF, kv_dtype=kv), B * 64, DEV)
            slots = torch.arange(B, device=DEV) * 64 * BS + 5  # one append per sequence
            k = torch.randn(B, HKV, D, dtype=BF, device=DEV)
            t = do_bench(lambda p=pool, s=slots, k=k: p.write(0, s, k, k, check=False))
            RES["write"].append(dict(B=B, fmt=fmt, t_s=t))
            print(f"write_kv B={B} {fmt:5s} {t * 1e6:7.1f} us", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="64x4096,128x16384")
    ap.add_argument("--formats", default="fp8,int8")
    ap.add_argument("--no-flashinfer", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    RES.update(device=torch.cuda.get_device_name(DEV), torch=torch.__version__,
               date=time.strftime("%Y-%m-%d"))  # fmt: skip
    d2d = d2d_bandwidth()
    RES["d2d_GBps"] = d2d
    formats = [f for f in args.formats.split(",") if f]
    for shape in args.shapes.split(","):
        B, L = (int(x) for x in shape.split("x"))
        try:
            RES["decode"].append(bench_shape(B, L, formats, not args.no_flashinfer, d2d))
        except Exception:
            RES["decode"].append(dict(B=B, L=L, error=traceback.format_exc()[-800:]))
            print(RES["decode"][-1]["error"], flush=True)
    try:
        bench_write(formats)
    except Exception:
        RES["write_error"] = traceback.format_exc()[-800:]
    outs = [os.path.join(os.path.dirname(__file__), "out")]
    if os.environ.get("OUT"):
        outs.append(os.environ["OUT"])
    for d in outs:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "bench_quant.json"), "w") as f:
            json.dump(RES, f, indent=1)
    for r in RES["decode"]:
        if "error" not in r:
            fp8 = r.get("fp8", {})
            ratio = fp8.get("ratio_flashinfer_fp8_over_pagedkv", float("nan"))
            print(f"B={r['B']} L={r['L']}: fp8 {fp8.get('speedup_vs_bf16', 0):.2f}x bf16; "
                  f"FlashInfer fp8 time / pagedkv fp8 time {ratio:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
