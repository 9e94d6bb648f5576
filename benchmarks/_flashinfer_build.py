"""Warm FlashInfer's JIT build of its paged decode kernels, in the background of a
gpu_*.sh script while its tests run (the benchmark then finds them compiled).

    python3 benchmarks/_flashinfer_build.py [--fp8]   (--fp8: the fp8-KV kernels too)
"""

from __future__ import annotations

import sys
import time

import flashinfer
import torch


def main(argv: list[str]) -> int:
    t = time.time()
    ws = torch.zeros(64 << 20, dtype=torch.uint8, device="cuda")
    i32 = dict(dtype=torch.int32, device="cuda")
    kv_dtypes = [torch.bfloat16] + ([torch.float8_e4m3fn] if "--fp8" in argv else [])
    for kvd in kv_dtypes:
        pool = torch.randn(4, 2, 16, 8, 128, device="cuda").to(kvd)
        for tc in (False, True):
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
            w.plan(torch.tensor([0, 4], **i32), torch.arange(4, **i32), torch.tensor([16], **i32),
                   32, 8, 128, 16, pos_encoding_mode="NONE", q_data_type=torch.bfloat16,
                   kv_data_type=kvd)  # fmt: skip
            w.run(torch.randn(1, 32, 128, dtype=torch.bfloat16, device="cuda"), pool)
            torch.cuda.synchronize()
            print("flashinfer built", kvd, "tc", tc, round(time.time() - t, 1), "s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
