"""Print (JSON) the PTX and shared memory of the bf16 decode split kernel compiled for
sm_90, fused merge on and off (tests/test_ops_fused_merge.py reads it). Run without
TRITON_INTERPRET; exits 3 when this Triton cannot compile for CUDA here."""

from __future__ import annotations

import json
import sys


def compile_sm90(fused: bool):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pagedkv.ops import triton_decode as td

    const = dict(G=4, G_PAD=16, D=128, D_PAD=128, BS=16, BLOCK_N=64, DIRECT=False, IEEE=False,
                 UPCAST=False, ALIGNED=False, SOFTCAP=False, HAS_SINKS=False, QUANT=False,
                 FORM=td.FORMS["dot"], FUSED=fused, S_PAD=8)  # fmt: skip
    ptrs = dict(Q="*bf16", K="*bf16", V="*bf16", KS="*fp32", VS="*fp32", BT="*i32", SL="*i32",
                Sinks="*bf16", Out="*fp32", LSE="*fp32", Final="*bf16", Cnt="*i32")  # fmt: skip
    sig, attrs = {}, {}
    for i, name in enumerate(td._decode_split_kernel.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name], attrs[(i,)] = ptrs[name], [["tt.divisibility", 16]]
        else:
            sig[name] = {"qk_scale": "fp32", "cap_log2": "fp32", "lse_off": "i64"}.get(name, "i32")
    src = ASTSource(td._decode_split_kernel, sig, const, attrs)
    opts = dict(num_warps=4, num_stages=3)
    kern = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    return dict(ptx=kern.asm["ptx"], shared=kern.metadata.shared)


def can_compile() -> str | None:
    """Why this Triton cannot compile for CUDA here (None: it can): the NVIDIA backend
    and its ptxas must be installed. Any other failure is the kernel's and is raised."""
    from triton.backends import backends

    if "nvidia" not in backends:
        return "no NVIDIA backend in this Triton"
    try:
        from triton.knobs import nvidia

        nvidia.ptxas.path  # noqa: B018  (resolves the binary, raises when missing)
    except (ImportError, AttributeError, RuntimeError, FileNotFoundError) as e:
        return f"no ptxas: {e!r:.200}"
    return None


if __name__ == "__main__":
    why = can_compile()
    if why is not None:
        print(f"cannot compile for sm_90 here: {why}")
        sys.exit(3)
    json.dump({"fused": compile_sm90(True), "parts": compile_sm90(False)}, sys.stdout)
