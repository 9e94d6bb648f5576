"""What Triton makes of the split decode kernel on sm_90, without a GPU: registers, spills,
shared memory, K/V buffers of the software pipeline, and the SASS instruction mix of each
variant (formulation x tile config x KV dtype). Runs on any machine with triton (ptxas and
nvdisasm ship in its wheel).

    PYTHONPATH=src python benchmarks/decode_codegen.py [--kv fp8,int8,bf16] [--forms dot,dot16,fma]
        [--block-n 64,128] [--warps 4] [--stages 2,3] [--hq 32 --hkv 8 --d 128 --bs 16]

Why it helps: occupancy is registers per thread x warps; bytes in flight per program are
BLOCK_N x D x 2 x (1 or 2) times the K/V buffers (``async_wait num = 0`` in the loop means
one buffer: the next tile is fetched only after this one is consumed); F2F / I2F are
quarter-rate conversions on sm_90 (16 per clock per SM), so one per K/V element caps the
kernel near 16 elements per clock per SM whatever the memory does.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pagedkv.ops import triton_decode as td  # noqa: E402

KV_TYPES = {"fp8": "fp8e4nv", "fp8_e5m2": "fp8e5", "int8": "i8", "bf16": "bf16"}
OPS = ("F2F", "I2F", "F2FP", "HMMA", "FFMA", "FMUL", "LDS", "LDSM", "LDGSTS", "LDG", "BAR", "SHFL")


def compile_variant(kv: str, form: str, block_n: int, warps: int, stages: int, hq: int,
                    hkv: int, d: int, bs: int, direct: bool = True):  # fmt: skip
    """The compiled split kernel for bf16 q over a cache of ``kv`` (one Triton compile)."""
    quant = kv != "bf16"
    g = hq // hkv
    g_pad = triton.next_power_of_2(g) if form == "fma" else max(16, triton.next_power_of_2(g))
    const = dict(G=g, G_PAD=g_pad, D=d, D_PAD=triton.next_power_of_2(d), BS=bs, BLOCK_N=block_n,
                 DIRECT=direct, IEEE=False, UPCAST=False, ALIGNED=False, SOFTCAP=False,
                 HAS_SINKS=False, QUANT=quant, FORM=td.FORMS[form], FUSED=False,
                 S_PAD=0, stride_os=0)  # fmt: skip
    ptrs = dict(Q="*bf16", K=f"*{KV_TYPES[kv]}", V=f"*{KV_TYPES[kv]}", KS="*fp32", VS="*fp32",
                BT="*i32", SL="*i32", Sinks="*bf16", Out="*bf16" if direct else "*fp32",
                LSE="*fp32", Final="*bf16", Cnt="*i32")  # fmt: skip
    fn = td._decode_split_kernel
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "cap_log2"):
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name == "lse_off" else "i32"
            if name.startswith("stride_") and name not in td.DECODE_DYNAMIC:
                attrs[(i,)] = [["tt.divisibility", 16]]  # hd / block strides: multiples of 16
    src = ASTSource(fn, sig, const, attrs)
    opts = dict(num_warps=warps, num_stages=stages)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def stats(kernel) -> dict:
    """Registers, spills, shared memory, K/V buffers and SASS op counts of a compiled kernel."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        res = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", f.name],
                             capture_output=True, text=True).stdout  # fmt: skip
        sass = subprocess.run([os.path.join(bindir, "nvdisasm"), "-c", f.name],
                              capture_output=True, text=True).stdout  # fmt: skip
    out = dict(regs=int(re.search(r"REG:(\d+)", res).group(1)),
               spill_bytes=int(re.search(r"LOCAL:(\d+)", res).group(1)),
               smem=kernel.metadata.shared)  # fmt: skip
    bufs = re.findall(r"local_alloc : \(\) -> !ttg.memdesc<(\d+)x\d+x\d+x", kernel.asm["ttgir"])
    out["kv_buffers"] = max((int(b) for b in bufs), default=0)
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", sass, re.M)
    for op in OPS:
        out[op] = sum(1 for o in ops if o == op)
    out["sass"] = len(ops)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kv", default="bf16,fp8,int8")
    ap.add_argument("--forms", default="dot,dot16,fma")
    ap.add_argument("--block-n", default="64,128")
    ap.add_argument("--warps", default="4")
    ap.add_argument("--stages", default="3")
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--bs", type=int, default=16)
    a = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    cols = ["regs", "spill_bytes", "smem", "kv_buffers", *OPS, "sass"]
    print("kv     form   BN  w s " + " ".join(f"{c[:6]:>6}" for c in cols))
    for kv in a.kv.split(","):
        for form in a.forms.split(","):
            if form == "dot16" and kv == "bf16":
                continue
            for bn in ints(a.block_n):
                for w in ints(a.warps):
                    for st in ints(a.stages):
                        head = f"{kv:6s} {form:5s} {bn:4d} {w} {st}"
                        try:
                            s = stats(compile_variant(kv, form, bn, w, st, a.hq, a.hkv, a.d, a.bs))
                        except Exception as e:  # a variant that does not compile: say so
                            print(f"{head} failed: {str(e).splitlines()[0][:120]}", flush=True)
                            continue
                        print(head + " " + " ".join(f"{s[c]:6d}" for c in cols), flush=True)


if __name__ == "__main__":
    main()
