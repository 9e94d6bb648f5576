"""Sweep of the quantized (fp8 / int8) split decode kernel's variants on one CUDA GPU.

    PYTHONPATH=src python benchmarks/bench_quant_sweep.py [--shapes 64x4096:big,...]
        [--formats fp8,int8] [--configs JSON] [--flashinfer] [--quick]

Every formulation x tile config (``form`` dot / dot16 / fma, BLOCK_N, num_warps,
num_stages; :data:`pagedkv.ops.decode_splits.QUANT_CONFIGS` explains them) is timed on
every shape (B x ctx, heads "big" = Hq 32 / Hkv 8 / D 128 as bench_quant.py, "smol" =
SmolLM2-135M's 9 / 3 / 64; block 16, blocks in random order) in a CUDA graph, beside the
bf16 kernel over a bf16 pool of the same shape and a device-to-device copy of the same
bytes; then the best few of each shape again with other split sizings (programs_per_sm).
Each variant's output is checked against the bf16 kernel over the dequantized KV of the
same blocks (first 8 sequences; max abs error). A variant that fails to compile or to
launch is reported and skipped. Kernels compile first in parallel processes (the Triton
cache on disk is shared), then the timing runs; it stops early before LIMIT seconds (env,
default 230) and still prints and writes what it has. Prints a table per (shape, format)
sorted by time, the config with the best geometric mean over the shapes as the line to
put in QUANT_CONFIGS, and writes bench_quant_sweep.json to $OUT (default benchmarks/out).

``--quick`` runs on CPU through the Triton interpreter (TRITON_INTERPRET=1): tiny shapes,
a few configs, wall-clock timing (meaningless), the same checks and JSON: a test of this
script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))  # runs uninstalled
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _sweep_tools import (  # noqa: E402
    BS,
    HEADS,
    KV,
    copy_time,
    dequantized,
    flashinfer_fp8,
    make_cache,
    precompile,
    rotations,
    time_call,
)

SHAPES = "64x4096:big,128x16384:big,1x16384:smol,256x1056:smol,1x16384:big,256x1056:big"
CHECK_SEQS = 8
PPS = (1, 4, 8)  # split sizings re-timed for the best few configs of each shape
TOP = 3


def kernel_configs() -> list[dict]:
    """The tile configs timed at programs_per_sm 2 (each compiles a kernel)."""
    out = []
    for bn in (64, 128, 256):
        for w in (4, 8):
            for st in (1, 2, 3, 5):
                out.append(dict(form="dot16", BLOCK_N=bn, num_warps=w, num_stages=st))
    for bn in (64, 128):
        for st in (3, 5):
            out.append(dict(form="dot", BLOCK_N=bn, num_warps=4, num_stages=st))
    for bn, w in ((16, 2), (32, 4)):
        for st in (1, 2):
            out.append(dict(form="fma", BLOCK_N=bn, num_warps=w, num_stages=st))
    return [{**c, "programs_per_sm": 2} for c in out]


def name(cfg: dict) -> str:
    return (f"{cfg['form']:5s} n{cfg['BLOCK_N']:<3d} w{cfg['num_warps']} s{cfg['num_stages']} "
            f"p{cfg['programs_per_sm']}")  # fmt: skip


def cfg_key(cfg: dict) -> tuple:
    return tuple(sorted(cfg.items()))


# ---- the sweep -----------------------------------------------------------------------------
class Sweep:
    """One run: shapes x formats x configs, results in ``self.res`` (the JSON)."""

    def __init__(self, args, dev) -> None:
        self.args, self.dev, self.quick = args, dev, args.quick
        self.deadline = time.time() + float(os.environ.get("LIMIT", "230"))
        self.res: dict = dict(shapes=[], skipped=[], compile_errors={})
        self.failed: dict = {}  # (heads, fmt, cfg key) -> error

    def left(self) -> float:
        return self.deadline - time.time()

    def run_shape(self, B: int, L: int, heads: str, configs: list[dict]) -> dict:
        from pagedkv.ops import triton_decode as td

        hq, hkv, d = HEADS[heads]
        nb = B * -(-L // BS)
        dev, quick = self.dev, self.quick
        g = torch.Generator(device=dev).manual_seed(B * 7 + L)
        tables = torch.randperm(nb, device=dev, generator=g).to(torch.int32).view(B, -1)
        lens = torch.full((B,), L, dtype=torch.int32, device=dev)
        q = torch.randn(B, hq, d, device=dev, generator=g).to(torch.bfloat16)
        scal = td.scalars(d**-0.5, None, None)
        out = torch.empty_like(q)
        rec: dict = dict(B=B, L=L, heads=heads, hq=hq, hkv=hkv, d=d, formats={})
        bytes16 = nb * BS * hkv * d * 2 * 2
        rec["copy_bf16_bytes_s"] = copy_time(bytes16, dev, quick)
        rec["copy_half_bytes_s"] = copy_time(bytes16 // 2, dev, quick)
        caches = [make_cache(nb, hkv, d, "bf16", dev, r) for r in range(rotations(bytes16, quick))]
        kern = td.kernels(q, caches[0][0], caches[0][1], tables, lens, None, False, False)
        rec["bf16_s"] = self._time(kern, caches, q, tables, lens, scal, out, B, L)
        rec["bf16_config"] = name(td.config(d, torch.bfloat16))
        del caches
        print(f"== B={B} L={L} {heads} (Hq {hq} Hkv {hkv} D {d}): bf16 "
              f"{rec['bf16_s'] * 1e6:.1f} us, copy of its bytes "
              f"{rec['copy_bf16_bytes_s'] * 1e6:.1f} us, of half "
              f"{rec['copy_half_bytes_s'] * 1e6:.1f} us", flush=True)  # fmt: skip
        for fmt in self.args.formats.split(","):
            if self.left() < 5:
                break
            rec["formats"][fmt] = self.run_format(fmt, B, L, heads, configs, q, tables, lens,
                                                  scal, out)  # fmt: skip
            torch.cuda.empty_cache() if dev.type == "cuda" else None
        return rec

    def _time(self, kern, caches, q, tables, lens, scal, out, B, L) -> float:
        splits, s_pad = kern.plan(B, tables.shape[1], None, L)
        ws = (torch.empty(B, q.shape[1], splits.num_splits, q.shape[2], device=q.device),
              torch.empty(B, q.shape[1], splits.num_splits, device=q.device))  # fmt: skip
        fns = [lambda c=c: kern.run(q, c[0], c[1], tables, lens, None, scal, None, splits=splits,
                                    out=out, workspace=ws, k_scales=c[2], v_scales=c[3])
               for c in caches]  # fmt: skip
        return time_call(fns, self.quick)

    def run_format(self, fmt, B, L, heads, configs, q, tables, lens, scal, out) -> dict:
        from pagedkv.ops import triton_decode as td

        hq, hkv, d = HEADS[heads]
        nb = B * -(-L // BS)
        dev = self.dev
        nbytes = nb * BS * hkv * d * 2
        nrot = rotations(nbytes, self.quick)
        caches = [make_cache(nb, hkv, d, fmt, dev, 100 + r) for r in range(nrot)]
        n = min(B, CHECK_SEQS)
        kd, vd, btd = dequantized(caches[0], tables[:n])
        want = td.decode(q[:n], kd, vd, btd, lens[:n], d**-0.5).float()
        default = {**td.config(d, torch.bfloat16, KV[fmt])}
        rows: list[dict] = []
        seen: set = set()

        def measure(cfg: dict) -> None:
            key = (heads, fmt, cfg_key({**cfg, "programs_per_sm": 2}))
            if key in self.failed:
                rows.append(dict(config=name(cfg), cfg=cfg, error=self.failed[key]))
                return
            try:
                kern = td.kernels(q, *caches[0][:2], tables, lens, None, False, False, cfg,
                                  *caches[0][2:])  # fmt: skip
                splits, _ = kern.plan(B, tables.shape[1], None, L)
                if (cfg_key({**cfg, "programs_per_sm": 0}), splits.split_tokens) in seen:
                    return  # the same kernel and splits as one timed already
                seen.add((cfg_key({**cfg, "programs_per_sm": 0}), splits.split_tokens))
                t = self._time(kern, caches, q, tables, lens, scal, out, B, L)
                kern.run(q[:n], *caches[0][:2], tables[:n], lens[:n], None, scal, None,
                         out=out[:n], k_scales=caches[0][2], v_scales=caches[0][3],
                         splits=splits)  # fmt: skip
                err = (out[:n].float() - want).abs().max().item()
                rows.append(dict(config=name(cfg), cfg=cfg, t_s=t, splits=splits.num_splits,
                                 max_err_vs_bf16_dequantized=err,
                                 rel_err=err / max(want.abs().max().item(), 1e-30),
                                 default=cfg_key(cfg) == cfg_key(default)))  # fmt: skip
            except Exception as e:  # a variant that does not compile / launch: reported
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                self.failed[key] = msg
                rows.append(dict(config=name(cfg), cfg=cfg, error=msg))

        for cfg in [default, *configs]:
            if self.left() < 3:
                self.res["skipped"].append(f"B={B} L={L} {heads} {fmt}: out of time")
                break
            measure(cfg)
        timed = sorted((r for r in rows if "t_s" in r), key=lambda r: r["t_s"])
        for r in timed[:TOP]:  # other split sizings for the best few
            for pps in PPS:
                if self.left() < 3:
                    break
                measure({**r["cfg"], "programs_per_sm": pps})
        if self.args.flashinfer and fmt == "fp8" and not self.quick:
            try:
                fi = flashinfer_fp8(q, caches[0], tables, lens, hq, hkv, d, self.quick)
            except Exception as e:
                fi, self.res["flashinfer_error"] = None, repr(e)[:300]
            if fi:
                rows.append(dict(config="FlashInfer fp8 (scale 1)", t_s=fi))
        caches.clear()
        return dict(rows=rows, kv_bytes=nbytes)


def report(res: dict) -> None:
    """Tables per (shape, format), sorted by time; the best config by geometric mean."""
    scores: dict = {}
    for rec in res["shapes"]:
        base = rec["bf16_s"]
        for fmt, fr in rec["formats"].items():
            print(f"\n-- B={rec['B']} L={rec['L']} {rec['heads']} {fmt}: bf16 {base * 1e6:.1f} us"
                  f" ({rec['bf16_config']}), copy of the {fmt} bytes "
                  f"{rec['copy_half_bytes_s'] * 1e6:.1f} us")  # fmt: skip
            print(f"{'variant':26s} {'us':>9s} {'x bf16':>7s} {'copy/t':>7s} {'splits':>6s} "
                  f"{'max err':>8s} {'rel':>7s}")  # fmt: skip
            ok = sorted((r for r in fr["rows"] if "t_s" in r), key=lambda r: r["t_s"])
            for r in ok:
                mark = " (default)" if r.get("default") else ""
                if "cfg" not in r:  # FlashInfer
                    print(f"{r['config']:26s} {r['t_s'] * 1e6:9.1f} {base / r['t_s']:7.2f}")
                    continue
                err = r["max_err_vs_bf16_dequantized"]
                print(f"{r['config']:26s} {r['t_s'] * 1e6:9.1f} {base / r['t_s']:7.2f} "
                      f"{rec['copy_half_bytes_s'] / r['t_s']:7.2f} {r.get('splits', ''):>6} "
                      f"{err:8.1e} {r['rel_err']:7.1e}{mark}")  # fmt: skip
            for r in fr["rows"]:
                if "error" in r:
                    print(f"{r['config']:26s} FAILED {r['error']}")
            if ok and "cfg" in ok[0]:
                best = ok[0]["t_s"]
                for r in ok:
                    if "cfg" in r:
                        scores.setdefault(fmt, {}).setdefault(cfg_key(r["cfg"]), []).append(
                            r["t_s"] / best
                        )
    n_shapes = {fmt: sum(fmt in r["formats"] for r in res["shapes"]) for fmt in scores}
    res["best"] = {}
    for fmt, by in scores.items():
        full = {k: math.exp(sum(map(math.log, v)) / len(v)) for k, v in by.items()
                if len(v) == n_shapes[fmt]}  # fmt: skip
        if not full:
            continue
        key = min(full, key=full.get)
        cfg = dict(key)
        res["best"][fmt] = dict(cfg=cfg, geomean_over_best=full[key])
        line = ", ".join(f"{k}={v!r}" for k, v in cfg.items() if k != "form")
        print(f"\nbest {fmt} over all {n_shapes[fmt]} shapes (geometric mean "
              f"{full[key]:.3f} x the best per shape): put in QUANT_CONFIGS "
              f"(src/pagedkv/ops/decode_splits.py):\n    \"{fmt}\": dict({line}, "
              f"form={cfg['form']!r}),")  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=SHAPES, help="BxL:heads,... (heads: big, smol)")
    ap.add_argument("--formats", default="fp8,int8")
    ap.add_argument("--configs", default=None, help="JSON list of configs (default: the sweep)")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--flashinfer", action="store_true", help="also FlashInfer's fp8 decode")
    ap.add_argument("--quick", action="store_true", help="CPU / interpreter self-test")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(
        os.path.dirname(__file__), "out"))  # fmt: skip
    args = ap.parse_args(argv)
    if args.quick:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dev = torch.device("cpu" if args.quick else "cuda")
    sw = Sweep(args, dev)
    torch.manual_seed(0)
    if args.configs:
        configs = [{"programs_per_sm": 2, **c} for c in json.loads(args.configs)]
    elif args.quick:
        configs = [dict(form=f, BLOCK_N=32, num_warps=4, num_stages=1, programs_per_sm=2)
                   for f in ("dot", "dot16", "fma")]  # fmt: skip
    else:
        configs = kernel_configs()
    shapes = []
    for s in args.shapes.split(","):
        bl, heads = s.split(":") if ":" in s else (s, "big")
        shapes.append((*(int(x) for x in bl.split("x")), heads))
    sw.res.update(device="cpu (interpreter)" if args.quick else torch.cuda.get_device_name(dev),
                  torch=torch.__version__, date=time.strftime("%Y-%m-%d"), configs=configs,
                  limit_s=float(os.environ.get("LIMIT", "230")))  # fmt: skip
    if not args.quick:
        t0 = time.time()
        jobs = [(h, f, None) for h in {s[2] for s in shapes} for f in args.formats.split(",")]
        jobs += [(h, f, cfg_key(c)) for h in {s[2] for s in shapes}
                 for f in args.formats.split(",") for c in configs]  # fmt: skip
        errs = precompile(jobs, args.workers, time.time() + max(10.0, sw.left() * 0.4))
        # reported only: the timing tries each config again (cached kernels load fast), so a
        # worker's own trouble (its CUDA context) cannot drop a config
        sw.res["compile_errors"] = {f"{h} {f} {name(dict(i)) if i else 'merge'}": e
                                    for (h, f, i), e in errs.items()}  # fmt: skip
        print(f"compiled {len(jobs)} jobs in {time.time() - t0:.0f} s, {len(errs)} failed",
              flush=True)  # fmt: skip
    for B, L, heads in shapes:
        if sw.left() < 10:
            sw.res["skipped"].append(f"B={B} L={L} {heads}: out of time")
            continue
        try:
            sw.res["shapes"].append(sw.run_shape(B, L, heads, configs))
        except Exception:
            sw.res["shapes_failed"] = sw.res.get("shapes_failed", []) + [
                dict(B=B, L=L, heads=heads, error=traceback.format_exc()[-800:])
            ]
            print(sw.res["shapes_failed"][-1]["error"], flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    report(sw.res)
    for msg in sw.res["skipped"]:
        print("skipped:", msg)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_quant_sweep.json"), "w") as f:
        json.dump(sw.res, f, indent=1, default=str)
    return sw.res


if __name__ == "__main__":
    main()
