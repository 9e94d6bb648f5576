"""Shared-prefix (cascade) decode benchmark on one CUDA GPU (one run, one table).

    PYTHONPATH=src python benchmarks/bench_cascade.py [--quick] [--no-flashinfer] [--sweep]
    PYTHONPATH=src python benchmarks/bench_cascade.py --prebuild-flashinfer   (JIT only)

B=256 decode rows behind one shared prefix of 1,024 / 4,096 tokens, private suffixes of
32, 512 or uniform 32-512 tokens (plus one batch of 8 groups x 32 rows), bf16, block 16,
blocks in random order, for Hq 32 / Hkv 8 / D 128 and the SmolLM2 shape Hq 9 / Hkv 3 /
D 64. Timed on the same pool: ``ops.cascade_decode`` (eager with check=False, and
replayed in a CUDA graph), the plain pagedkv decode (``DecodePlan``, the same two ways)
and FlashInfer's ``MultiLevelCascadeAttentionWrapper`` (2 levels: shared, unique; same
two ways), when importable. "unique GB/s" = the KV bytes a cascade must read (each
shared prefix once + every suffix) / time. Also the host cost of building a
``CascadePlan`` (once per step) vs FlashInfer's ``plan``. Writes JSON to
benchmarks/out/bench_cascade.json and to $OUT when set.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from bench_attention import bench_graph, d2d_bandwidth, do_bench, rotations  # noqa: E402
from pagedkv import ops  # noqa: E402
from pagedkv.ops import cascade_launch  # noqa: E402

DEV = torch.device("cuda")
BF = torch.bfloat16
BS = 16
SHAPES = {"llama": (32, 8, 128), "smollm2": (9, 3, 64)}  # (Hq, Hkv, D)
RES: dict = {"configs": [], "sweep": []}


def make_case(hkv, d, n_groups, rows_per_group, shared, private, nrot):
    """Pools (``nrot`` copies, same tables) where group g's rows share ``shared`` tokens of
    blocks, then ``private[b]`` tokens each; rows are numbered group by group."""
    sb = shared // BS
    pb = [-(-n // BS) for n in private]
    nb = n_groups * sb + sum(pb)
    perm = torch.randperm(nb).tolist()
    shared_ids = [perm[g * sb : (g + 1) * sb] for g in range(n_groups)]
    at, tables, priv_ids = n_groups * sb, [], []
    for b, n in enumerate(pb):
        ids = perm[at : at + n]
        at += n
        priv_ids.append(ids)
        tables.append(shared_ids[b // rows_per_group] + ids)
    width = max(len(t) for t in tables)
    bt = torch.zeros(len(tables), width, dtype=torch.int32)
    for b, t in enumerate(tables):
        bt[b, : len(t)] = torch.tensor(t, dtype=torch.int32)
    pools = [torch.randn(2, nb, BS, hkv, d, dtype=BF, device=DEV) for _ in range(nrot)]
    lens = torch.tensor([shared + n for n in private], dtype=torch.int32, device=DEV)
    groups = [(range(g * rows_per_group, (g + 1) * rows_per_group), sb) for g in range(n_groups)]
    return pools, bt.to(DEV), lens, groups, shared_ids, priv_ids


def fi_cascade(hq, hkv, d, shared_ids, priv_ids, private, rows_per_group):
    """A planned 2-level FlashInfer cascade wrapper, or an error string."""
    try:
        import flashinfer
    except Exception as e:  # not installed / not built: the columns stay empty
        return None, f"import: {e!r}"[:300]
    RES["flashinfer"] = getattr(flashinfer, "__version__", "?")
    i32 = dict(dtype=torch.int32, device=DEV)
    ng, b = len(shared_ids), len(priv_ids)
    try:
        ws = torch.zeros(256 << 20, dtype=torch.uint8, device=DEV)
        w = flashinfer.MultiLevelCascadeAttentionWrapper(2, ws, "NHD")
        qo = [torch.arange(0, b + 1, rows_per_group, **i32), torch.arange(b + 1, **i32)]
        kv_indptr = [
            torch.tensor([0, *torch.tensor([len(s) for s in shared_ids]).cumsum(0)], **i32),
            torch.tensor([0, *torch.tensor([len(p) for p in priv_ids]).cumsum(0)], **i32),
        ]
        kv_idx = [torch.tensor(sum(shared_ids, []), **i32), torch.tensor(sum(priv_ids, []), **i32)]
        last_unique = torch.tensor([(n - 1) % BS + 1 for n in private], **i32)
        last = [torch.full((ng,), BS, **i32), last_unique]

        def plan():
            w.plan(qo, kv_indptr, kv_idx, last, hq, hkv, d, BS, q_data_type=BF, kv_data_type=BF)

        plan()
        t0 = time.perf_counter()
        for _ in range(5):
            plan()
        RES.setdefault("fi_plan_us", []).append((time.perf_counter() - t0) / 5 * 1e6)
        return w, None
    except Exception as e:
        return None, f"plan: {e!r}"[:300]


def bench_config(shape, shared, private_kind, n_groups, use_fi, d2d):
    hq, hkv, d = SHAPES[shape]
    b = 256
    rng = random.Random(shared + b)
    private = {"32": [32] * b, "512": [512] * b}.get(private_kind)
    if private is None:
        private = [rng.randint(32, 512) for _ in range(b)]
    rows_per_group = b // n_groups
    tok_bytes = hkv * d * 2 * 2
    unique_bytes = (n_groups * shared + sum(private)) * tok_bytes
    plain_bytes = (b * shared + sum(private)) * tok_bytes
    nrot = rotations(unique_bytes)
    pools, bt, lens, groups, shared_ids, priv_ids = make_case(
        hkv, d, n_groups, rows_per_group, shared, private, nrot
    )
    q = torch.randn(b, hq, d, dtype=BF, device=DEV)
    rec = dict(shape=shape, Hq=hq, Hkv=hkv, D=d, B=b, shared=shared, private=private_kind)
    rec.update(groups=n_groups, unique_bytes=unique_bytes, plain_bytes=plain_bytes, n_rot=nrot)
    st = [0]

    def nxt():
        st[0] = (st[0] + 1) % nrot
        return pools[st[0]]

    max_len = shared + max(private)
    kw = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=BS, max_seq_len=max_len,
              dtype=BF, device=DEV)  # fmt: skip
    plan = ops.CascadePlan(groups, b, **kw)
    t0 = time.perf_counter()
    for _ in range(10):
        ops.CascadePlan(groups, b, **kw)
    rec["plan_build_us"] = (time.perf_counter() - t0) / 10 * 1e6
    la = plan.launch
    rec.update(shared_split=la.split1, shared_slots=la.slots1, tiles=la.n_tiles,
               private_splits=la.splits2, fused=la.fused)  # fmt: skip
    out = torch.empty_like(q)
    p0 = pools[0]
    ops.cascade_decode(q, p0[0], p0[1], bt, lens, plan, out=out)  # checked once
    plain = ops.decode_attention(q, p0[0], p0[1], bt, lens)
    rec["rel_err_vs_plain"] = ((out.float() - plain.float()).norm() / plain.float().norm()).item()

    def fn():
        p = nxt()
        ops.cascade_decode(q, p[0], p[1], bt, lens, plan, check=False, out=out)

    rec["t_s"] = do_bench(fn)
    rec["t_graph_s"] = bench_graph(fn, rec["t_s"])
    dplan = ops.DecodePlan(b, hq, hkv, d, BS, max_len, dtype=BF, device=DEV)

    def fn_plain():
        p = nxt()
        dplan.run(q, p[0], p[1], bt, lens, check=False)

    rec["plain_t_s"] = do_bench(fn_plain)
    rec["plain_t_graph_s"] = bench_graph(fn_plain, rec["plain_t_s"])
    rec["unique_GBps_graph"] = unique_bytes / rec["t_graph_s"] / 1e9
    rec["frac_d2d_graph"] = rec["unique_GBps_graph"] / d2d
    if use_fi:
        w, err = fi_cascade(hq, hkv, d, shared_ids, priv_ids, private, rows_per_group)
        if err:
            rec["fi_error"] = err
        else:
            try:
                fo = w.run(q, (p0[0], p0[1]))
                rec["fi_rel_err_vs_plain"] = (
                    (fo.float() - plain.float()).norm() / plain.float().norm()
                ).item()

                def ffn():
                    p = nxt()
                    w.run(q, (p[0], p[1]))

                rec["fi_t_s"] = do_bench(ffn)
                try:
                    rec["fi_t_graph_s"] = bench_graph(ffn, rec["fi_t_s"])
                except Exception as e:
                    rec["fi_graph_error"] = repr(e)[:300]
            except Exception as e:
                rec["fi_error"] = f"run: {e!r}"[:300]
    pools.clear()
    torch.cuda.empty_cache()
    return rec


def sweep(d2d):
    """Shared-level tile options (CUDA-graph time of the whole cascade) at two configs."""
    opts = [(bq, bn, nw, ns) for bq in (64, 128) for bn in (32, 64, 128)
            for nw, ns in ((4, 2), (4, 3), (8, 2), (8, 3))]  # fmt: skip
    for shape, shared in (("llama", 4096), ("smollm2", 1024)):
        hq, hkv, d = SHAPES[shape]
        private = [32] * 256
        pools, bt, lens, groups, _, _ = make_case(hkv, d, 1, 256, shared, private, 1)
        q = torch.randn(256, hq, d, dtype=BF, device=DEV)
        out = torch.empty_like(q)
        p = pools[0]
        kw = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=BS)
        plan = ops.CascadePlan(groups, 256, **kw, max_seq_len=shared + 32, dtype=BF, device=DEV)
        for bq, bn, nw, ns in opts:
            cfg = dict(BLOCK_Q=bq, BLOCK_N=bn, num_warps=nw, num_stages=ns)
            for splits in (None, 1):
                try:
                    plan.launch = cascade_launch.plan_launch(plan, splits and shared, None, cfg)

                    def fn(q=q, p=p, bt=bt, lens=lens, plan=plan, out=out):
                        ops.cascade_decode(q, p[0], p[1], bt, lens, plan, check=False, out=out)

                    tg = bench_graph(fn, 1e-4, budget_s=0.003, replays=5)
                    r = dict(shape=shape, shared=shared, **cfg, slots=plan.launch.slots1,
                             t_graph_s=tg)  # fmt: skip
                except Exception as e:
                    r = dict(shape=shape, shared=shared, **cfg, error=repr(e)[:200])
                RES["sweep"].append(r)
        mine = [r for r in RES["sweep"] if r["shape"] == shape and "t_graph_s" in r]
        if mine:
            print("sweep best", json.dumps(min(mine, key=lambda r: r["t_graph_s"])), flush=True)
        pools.clear()
        torch.cuda.empty_cache()


def prebuild_flashinfer():
    """Trigger FlashInfer's JIT build of the kernels the benchmark uses (both shapes)."""
    for shape in SHAPES:
        hq, hkv, d = SHAPES[shape]
        t = time.time()
        w, err = fi_cascade(hq, hkv, d, [[0, 1]], [[2]] * 4, [5] * 4, 4)
        if w is not None:
            kv = torch.randn(2, 3, BS, hkv, d, dtype=BF, device=DEV)
            w.run(torch.randn(4, hq, d, dtype=BF, device=DEV), (kv[0], kv[1]))
            torch.cuda.synchronize()
        print(f"flashinfer {shape}: {err or 'built'} in {time.time() - t:.1f} s", flush=True)


def dump():
    for d in (os.path.join(os.path.dirname(__file__), "out"), os.environ.get("OUT")):
        if d:
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "bench_cascade.json"), "w") as f:
                json.dump(RES, f, indent=1)


def us(x):
    return "       -" if x is None else f"{x * 1e6:8.1f}"


def ratio(a, b):
    return "     -" if a is None or b is None else f"{a / b:6.2f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-flashinfer", action="store_true")
    ap.add_argument("--prebuild-flashinfer", action="store_true")
    args = ap.parse_args()
    if args.prebuild_flashinfer:
        prebuild_flashinfer()
        return
    RES.update(device=torch.cuda.get_device_name(), torch=torch.__version__)
    RES["date"] = time.strftime("%F")
    d2d = d2d_bandwidth()
    RES["d2d_GBps_read_plus_write"] = d2d
    print(f"device {RES['device']}  d2d copy {d2d:.0f} GB/s (read+write)", flush=True)
    privates = ("32", "32-512", "512")
    configs = [(s, sh, p, 1) for s in SHAPES for sh in (1024, 4096) for p in privates]
    configs.append(("llama", 4096, "32-512", 8))
    if args.quick:
        configs = [("llama", 1024, "32", 1), ("smollm2", 1024, "32", 1)]
    print(f"{'shape':>8} {'shared':>6} {'priv':>6} {'grp':>3} | {'casc us':>8} {'graph':>8} "
          f"{'plain gr':>8} {'x plain':>7} {'FI us':>8} {'FI gr':>8} {'FI/pk':>6} {'FIgr/gr':>7} "
          f"{'GB/s gr':>7} {'err':>7}", flush=True)  # fmt: skip
    for shape, shared, priv, ng in configs:
        try:
            r = bench_config(shape, shared, priv, ng, not args.no_flashinfer, d2d)
        except Exception as e:
            r = dict(shape=shape, shared=shared, private=priv, groups=ng, error=repr(e)[:300],
                     tb=traceback.format_exc()[-800:])  # fmt: skip
            print(r, flush=True)
            RES["configs"].append(r)
            continue
        RES["configs"].append(r)
        dump()
        print(f"{shape:>8} {shared:>6} {priv:>6} {ng:>3} | {us(r['t_s'])} {us(r['t_graph_s'])} "
              f"{us(r['plain_t_graph_s'])} {r['plain_t_graph_s'] / r['t_graph_s']:7.2f} "
              f"{us(r.get('fi_t_s'))} {us(r.get('fi_t_graph_s'))} "
              f"{ratio(r.get('fi_t_s'), r['t_s'])} "
              f"{ratio(r.get('fi_t_graph_s'), r['t_graph_s']):>7} "
              f"{r['unique_GBps_graph']:7.0f} {r['rel_err_vs_plain']:7.1e}"
              + (f"  FI: {r['fi_error']}" if "fi_error" in r else ""), flush=True)  # fmt: skip
    pb, fp = RES["configs"][0].get("plan_build_us"), RES.get("fi_plan_us")
    if pb is not None:
        print(f"host: CascadePlan build {pb:.0f} us"
              + (f", FlashInfer plan {min(fp):.0f} us" if fp else ""), flush=True)  # fmt: skip
    if args.sweep:
        sweep(d2d)
    dump()


if __name__ == "__main__":
    main()
