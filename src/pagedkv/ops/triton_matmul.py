"""Batch-invariant GEMM for CUDA: ``C[b] = A[b] @ B[b] (+ bias)``, one persistent Triton kernel.

Why a row's bits do not depend on M: every output tile is computed by the same code
whatever the problem's M: a BLOCK_M x BLOCK_N tile whose K loop walks the BLOCK_K slices
in order 0, 1, 2, ... accumulating into float32 with the same MMA instructions. The tile
configuration is a function of the dtype and of (N, K) — the weight's shape, fixed per
layer — never of M, and K is never split (cuBLAS splits K, and changes kernels, as M
changes, which is what makes a sequence's projections depend on its batch). More rows
only mean more tiles; rows past M inside a tile are clamped to row 0 and not stored.

Persistent: ``min(#SMs, #tiles)`` programs, each walking tiles ``pid, pid + P, ...`` in
grouped order (GROUP_M row tiles per column band, so that consecutive tiles share B in L2).
A batch index (for bmm) is the slowest tile coordinate; a batch stride of 0 broadcasts
an operand (``x @ W`` for every batch item).

Offsets are int64 (a row index times a stride can pass 2**31 for large activations).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from pagedkv._extras import optional_imports

with optional_imports(__name__):
    import triton
    import triton.language as tl

from pagedkv.ops._config import interpreting


class GemmConfig(NamedTuple):
    """One tile configuration of :func:`gemm` (a Triton launch setting)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


# Thinking Machines' batch_invariant_ops uses 128 x 128 x 64 (bf16) on H100; it is our
# default until benchmarks/bench_invariant.py --sweep says otherwise for the H200.
_HALF = GemmConfig(128, 128, 64)
_TF32 = GemmConfig(128, 128, 32)
_IEEE = GemmConfig(64, 64, 32, num_warps=4, num_stages=2)  # float32 on CUDA cores
_INTERPRET = GemmConfig(16, 16, 16, group_m=2, num_warps=1, num_stages=1)  # tiny tests


def default_config(dtype: torch.dtype, n: int, k: int, precision: str) -> GemmConfig:
    """The configuration for a [*, K] @ [K, N] product of ``dtype`` (never a function of M:
    that is the point). ``n`` and ``k`` are accepted so that a per-weight-shape choice can be
    added without changing callers."""
    if interpreting():
        return _INTERPRET
    if dtype == torch.float32:
        return _IEEE if precision == "ieee" else _TF32
    return _HALF


def float32_precision() -> str:
    """``"ieee"`` (exact float32 products, torch's default ``"highest"``) or ``"tf32"``,
    following ``torch.set_float32_matmul_precision``."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@functools.lru_cache(maxsize=16)
def _num_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, so the persistent loop is exercised
    return torch.cuda.get_device_properties(device).multi_processor_count


# M and everything derived from it are not specialized: one compiled kernel serves every M
# (Triton would otherwise compile variants for M == 1 and M % 16 == 0).
@triton.jit(
    do_not_specialize=["M", "num_tiles", "num_programs", "stride_ab", "stride_cb", "stride_zb"]
)
def _gemm_kernel(
    A, B, C, Bias,
    M, N, K, num_tiles, num_programs,
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_cb, stride_cm, stride_cn,
    stride_zb, stride_zm, stride_zn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_batch = tiles_m * tiles_n
    per_group = GROUP_M * tiles_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in range(pid, num_tiles, num_programs):
        bt = (tile // per_batch).to(tl.int64)
        t = tile % per_batch
        first_m = (t // per_group) * GROUP_M
        size_m = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (t % per_group) % size_m
        pid_n = (t % per_group) // size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
        rn = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
        a_ptrs = A + bt * stride_ab + rm[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = B + bt * stride_bb + offs_k[:, None] * stride_bk + rn[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(0, k_tiles):
            k_left = K - kt * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)  # a: [BM, BK]
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)  # b: [BK, BN]
            if EMULATE:  # the interpreter: see emulate_dot
                prod = a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :]
                acc += tl.sum(prod, axis=1)
            elif PRECISION == "ieee":
                acc = tl.dot(a, b, acc, input_precision="ieee")
            elif PRECISION == "tf32":
                acc = tl.dot(a, b, acc, input_precision="tf32")
            else:  # 16-bit inputs
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        cm = offs_m.to(tl.int64)
        cn = offs_n.to(tl.int64)
        c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if HAS_BIAS:
            z_ptrs = Bias + bt * stride_zb + cm[:, None] * stride_zm + cn[None, :] * stride_zn
            acc += tl.load(z_ptrs, mask=c_mask, other=0.0).to(tl.float32)
        c_ptrs = C + bt * stride_cb + cm[:, None] * stride_cm + cn[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=c_mask)


def emulate_dot() -> bool:
    """Whether ``tl.dot`` is replaced by a broadcast product and a sum over K.

    In the Triton interpreter ``tl.dot`` is numpy's matmul (and wrong for bf16 in triton
    3.9): BLAS there sums a row differently depending on its position in the tile, which
    would make the interpreter tests fail for a reason the GPU does not have. The
    emulation accumulates each output element over K in order, like an MMA does."""
    return interpreting()


def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """``a @ b (+ bias)`` per batch item, float32 accumulation, rounded once to ``out_dtype``.

    a: [Bt, M, K]; b: [Bt, K, N] of a's dtype (any strides; a batch stride of 0
    broadcasts); bias: None or a [Bt, M, N] view (broadcast strides welcome: a Linear bias
    is ``bias.expand(Bt, M, N)``), added in float32 before the rounding. Returns a new
    contiguous [Bt, M, N] tensor of ``out_dtype`` (default a's dtype). Arguments are
    assumed checked (:mod:`pagedkv.ops.invariant` does it).
    """
    bt, m, k = a.shape
    n = b.shape[2]
    out = torch.empty((bt, m, n), dtype=out_dtype or a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    precision = float32_precision() if a.dtype == torch.float32 else "native"
    cfg = config or default_config(a.dtype, n, k, precision)
    num_tiles = bt * triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    programs = min(_num_programs(a.device), num_tiles)
    z = bias if bias is not None else out  # a placeholder pointer when there is no bias
    _gemm_kernel[(programs,)](
        a, b, out, z,
        m, n, k, num_tiles, programs,
        a.stride(0), a.stride(1), a.stride(2),
        b.stride(0), b.stride(1), b.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        z.stride(0), z.stride(1), z.stride(2),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        HAS_BIAS=bias is not None, PRECISION=precision,
        EMULATE=emulate_dot(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
