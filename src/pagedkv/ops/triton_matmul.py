"""Batch-invariant GEMM for CUDA: ``C[b] = A[b] @ B[b] (+ bias)``, one persistent Triton kernel.

Why a row's bits do not depend on M: an output tile is computed by the same code whatever
the problem's M: its K loop walks BLOCK_K slices in order 0, 1, 2, ... accumulating in
float32 through ``tl.dot`` (MMA instructions chained over K), and K is never split
(cuBLAS splits K, and changes kernels, as M changes: that is what makes a sequence's
projections depend on its batch). The configuration depends on the shape, but only
among configurations verified to give identical bits (:mod:`pagedkv.ops.gemm_select`).
Rows past M and columns past N are masked (read as 0, not stored).

One compiled kernel per (dtype, configuration, weight shape and layout): M, the tile
count and the grid size are not specialized, and the activations are brought to one
layout before the launch (rows contiguous, stride K, 16-byte aligned; a copy otherwise),
so that the binary — and so the arithmetic — cannot change with M or with where a row
comes from. (The layout matters for speed too: the first version added a batch offset
of unknown alignment to every address, so Triton loaded A element by element, without
cp.async, and could not overlap loads with the MMAs: 4x slower than cuBLAS at any M.)
Only true bmm (a distinct B per batch item) lets Triton specialize the batch strides
(M * K for contiguous A): that changes the loads' vector width, not the MMA sequence;
tests/test_invariant_gpu.py checks a batched item against the same product alone.

Persistent: ``min(#SMs * per_sm, #tiles)`` programs, each walking tiles ``pid, pid + P,
...`` in grouped order (GROUP_M row tiles per column band, so that consecutive tiles
share B in L2), the tile and K loops flattened so loads of the next tile overlap the
MMAs of the current one. Several batch items with one B (``x @ W`` for 3-D x) fold into
rows; distinct B per item (bmm) make the batch index the slowest tile coordinate.
Offsets of rows are int64 (a row index times a stride can pass 2**31).
"""

from __future__ import annotations

import functools

import torch

from pagedkv._extras import optional_imports

with optional_imports(__name__):
    import triton
    import triton.language as tl

from pagedkv.ops._config import interpreting
from pagedkv.ops.gemm_select import GemmConfig, GemmSelector


def float32_precision() -> str:
    """``"ieee"`` (exact float32 products, torch's default ``"highest"``) or ``"tf32"``,
    following ``torch.set_float32_matmul_precision``."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@functools.lru_cache(maxsize=16)
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, so the persistent loop is exercised
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit(do_not_specialize=["M", "num_tiles", "num_programs"])
def _gemm_kernel(
    A, B, C, Bias,
    M, N, K, num_tiles, num_programs,
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_cb, stride_cm, stride_cn,
    stride_zb, stride_zm, stride_zn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, BATCHED: tl.constexpr,
    PRECISION: tl.constexpr, EMULATE: tl.constexpr, K_STEP: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_batch = tiles_m * tiles_n
    per_group = GROUP_M * tiles_n
    for tile in tl.range(pid, num_tiles, num_programs, flatten=True):
        if BATCHED:
            bt = (tile // per_batch).to(tl.int64)
            t = tile % per_batch
            a_base = A + bt * stride_ab
            b_base = B + bt * stride_bb
            c_base = C + bt * stride_cb
            z_base = Bias + bt * stride_zb
        else:
            t = tile
            a_base = A
            b_base = B
            c_base = C
            z_base = Bias
        first_m = (t // per_group) * GROUP_M
        size_m = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (t % per_group) % size_m
        pid_n = (t % per_group) // size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m = offs_m < M
        in_n = offs_n < N
        rm = offs_m.to(tl.int64)
        rn = offs_n.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if EMULATE:  # the interpreter: see emulate_dot
            offs_k = tl.arange(0, K_STEP)
            for k0 in range(0, K, K_STEP):
                a_ptrs = a_base + rm[:, None] * stride_am + (k0 + offs_k)[None, :] * stride_ak
                b_ptrs = b_base + (k0 + offs_k)[:, None] * stride_bk + rn[None, :] * stride_bn
                a = tl.load(a_ptrs, mask=in_m[:, None] & (offs_k[None, :] < K - k0), other=0.0)
                b = tl.load(b_ptrs, mask=(offs_k[:, None] < K - k0) & in_n[None, :], other=0.0)
                prod = a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :]
                acc += tl.sum(prod, axis=1)
        else:
            offs_k = tl.arange(0, BLOCK_K)
            for kt in range(0, tl.cdiv(K, BLOCK_K)):
                k0 = kt * BLOCK_K
                a_ptrs = a_base + rm[:, None] * stride_am + (k0 + offs_k)[None, :] * stride_ak
                b_ptrs = b_base + (k0 + offs_k)[:, None] * stride_bk + rn[None, :] * stride_bn
                a = tl.load(a_ptrs, mask=in_m[:, None] & (offs_k[None, :] < K - k0), other=0.0)
                b = tl.load(b_ptrs, mask=(offs_k[:, None] < K - k0) & in_n[None, :], other=0.0)
                if PRECISION == "ieee":
                    acc = tl.dot(a, b, acc, input_precision="ieee")
                elif PRECISION == "tf32":
                    acc = tl.dot(a, b, acc, input_precision="tf32")
                else:  # 16-bit inputs
                    acc = tl.dot(a, b, acc)
        c_mask = in_m[:, None] & in_n[None, :]
        if HAS_BIAS:
            z_ptrs = z_base + rm[:, None] * stride_zm + rn[None, :] * stride_zn
            acc += tl.load(z_ptrs, mask=c_mask, other=0.0).to(tl.float32)
        c_ptrs = c_base + rm[:, None] * stride_cm + rn[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=c_mask)


def emulate_dot() -> bool:
    """Whether ``tl.dot`` is replaced by a broadcast product and a sum over K.

    In the Triton interpreter ``tl.dot`` is numpy's matmul (and wrong for bf16 in some
    versions): BLAS there sums a row differently depending on its position in the tile,
    which would make the interpreter tests fail for a reason the GPU does not have. The
    emulation accumulates each output element over K in steps of ``min(16, BLOCK_K)``,
    as chained MMA instructions do, so that tile shapes with that step agree exactly."""
    return interpreting()


def _aligned_rows(a: torch.Tensor) -> torch.Tensor:
    """a: [R, K] -> the same values with stride (K, 1) at a 16-byte aligned address."""
    r, k = a.shape
    ok = a.stride(1) == 1 and (r <= 1 or a.stride(0) == k) and a.data_ptr() % 16 == 0
    return a if ok else a.clone(memory_format=torch.contiguous_format)


def _fold_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """t: [Bt, M, N] (a bias view) -> (tensor, row stride) addressing it as [Bt * M, N]."""
    bt, m, n = t.shape
    if bt == 1:
        return t, t.stride(1)
    if m == 1:
        return t, t.stride(0)
    if t.stride(0) == m * t.stride(1):  # includes one broadcast row: strides (0, 0, 1)
        return t, t.stride(1)
    return t.contiguous(), n


def _launch(a, b, c, z, z_strides, cfg: GemmConfig, precision: str, bt: int) -> None:
    """Batched (``bt`` > 1): a [Bt, M, K], b [Bt, K, N], c [Bt, M, N], z None or [Bt, M, N].
    Otherwise a [R, K] (stride (K, 1)), b [K, N], c [R, N], z with ``z_strides`` (row,
    column)."""
    batched = bt > 1
    m, k = a.shape[-2], a.shape[-1]
    n = b.shape[-1]
    num_tiles = bt * triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    programs = min(num_sms(a.device) * cfg.per_sm, num_tiles)
    zt = z if z is not None else c  # a placeholder pointer when there is no bias
    if batched:
        strides = (*a.stride(), *b.stride(), *c.stride(), *zt.stride())
    else:  # no batch strides: 0 keeps them out of the specialization
        zs = z_strides if z is not None else (0, 0)
        strides = (0, k, 1, 0, *b.stride(), 0, *c.stride(), 0, *zs)
    _gemm_kernel[(programs,)](
        a, b, c, zt,
        m, n, k, num_tiles, programs,
        *strides,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        HAS_BIAS=z is not None, BATCHED=batched, PRECISION=precision,
        EMULATE=emulate_dot(), K_STEP=min(16, cfg.block_k),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def _run_2d(a: torch.Tensor, b: torch.Tensor, cfg: GemmConfig) -> torch.Tensor:
    """[R, K] @ [K, N] with one configuration, no bias, the float32 accumulators unrounded
    (the selector's check: equal accumulators give equal bits in every output dtype)."""
    precision = float32_precision() if a.dtype == torch.float32 else "native"
    out = torch.empty((a.shape[0], b.shape[1]), dtype=torch.float32, device=a.device)
    _launch(_aligned_rows(a), b, out, None, None, cfg, precision, bt=1)
    return out


SELECTOR = GemmSelector(_run_2d)


def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    config: GemmConfig | None = None,
    selector: GemmSelector | None = None,
) -> torch.Tensor:
    """``a @ b (+ bias)`` per batch item, float32 accumulation, rounded once to ``out_dtype``.

    a: [Bt, M, K]; b: [Bt, K, N] of a's dtype (any strides; a batch stride of 0
    broadcasts); bias: None or a [Bt, M, N] view (broadcast strides welcome: a Linear bias
    is ``bias.expand(Bt, M, N)``), added in float32 before the rounding. Returns a new
    contiguous [Bt, M, N] tensor of ``out_dtype`` (default a's dtype). ``config`` forces a
    configuration (benchmarks, tests); by default ``selector`` (:data:`SELECTOR`) picks a
    verified one. Arguments are assumed checked (:mod:`pagedkv.ops.invariant` does it).
    """
    bt, m, k = a.shape
    n = b.shape[2]
    out = torch.empty((bt, m, n), dtype=out_dtype or a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    precision = float32_precision() if a.dtype == torch.float32 else "native"
    one_b = bt == 1 or b.stride(0) == 0
    if config is None:
        sel = selector or SELECTOR
        config = sel.choose(b[0], 1 if one_b else bt, bt * m if one_b else m, precision,
                            num_sms(a.device))  # fmt: skip
    if one_b:  # one weight: every batch item's rows are rows of one [Bt * M, K] product
        a2 = _aligned_rows(a.reshape(bt * m, k))
        z, z_rows = (None, None) if bias is None else _fold_rows(bias)
        zs = None if z is None else (z_rows, z.stride(2))
        _launch(a2, b[0], out.view(bt * m, n), z, zs, config, precision, bt=1)
    else:
        a3 = a if a.stride(2) == 1 else a.contiguous()
        _launch(a3, b, out, bias, None, config, precision, bt=bt)
    return out
