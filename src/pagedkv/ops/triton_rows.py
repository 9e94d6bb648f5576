"""Batch-invariant row reductions for CUDA: sum / mean, softmax / log-softmax, cumsum over
the last dim of a contiguous [R, N] tensor.

Every reduction has an order fixed by construction, never left to the compiler:

- lanes: a row is read in slices of BLOCK columns, slice 0 first; lane j accumulates
  columns j, j + BLOCK, ... in float32 (elementwise ops: the same in any layout);
- across lanes, :func:`_tree_sum` adds halves (``x[:h] + x[h:]``) until one value is
  left: explicit two-operand adds, the same tree in any register layout (the tree of
  the CPU path's ``tree_sum`` too). A plain ``tl.sum`` of BLOCK lanes would reduce in the order
  of the register layout Triton picks, and that layout follows the loads' vector width,
  i.e. the specialization on N and on the pointers' alignment: a row padded with 27
  zeros (N = 64, divisible by 16) summed differently from the same row at N = 37 on an
  H200. Zeros appended to a row (padding, masked keys) add exact zeros to lanes, and a
  tree over a zero-padded width equals the tree over the narrower one (the softmax's
  per-chunk values are padded to a power of two);
- maxima are exact in any order; extracting one element is a sum of it with zeros.

BLOCK and the softmax CHUNK are constants — not functions of N or R — so a row's bits
depend on its own values only: not on how many rows share the call, where the row is,
nor on zeros / -inf appended after it. torch's CUDA reductions pick their thread layout
and split factor from the shape, which is why they are not used here.

Softmax runs CHUNK columns per program (enough programs for one vocabulary row): pass 1
keeps a running (max, sum of exp) per lane, combines them into one (max, sum) per chunk;
pass 2 combines a row's chunks in chunk order (the same fixed tree), then writes the
chunk's ``exp(x - max) / sum`` (or ``x - max - log(sum)``). A chunk whose max equals the
row's max is taken as it is (no ``exp(0)`` factor), so a one-chunk row and the same row
padded with -inf chunks agree exactly.
"""

from __future__ import annotations

import torch

from pagedkv._extras import optional_imports

with optional_imports(__name__):
    import triton
    import triton.language as tl

from pagedkv.ops._config import interpreting

BLOCK = 1024  # lanes of a sum / softmax program
CHUNK = 2048  # softmax columns per program
SCAN_BLOCK = 2048  # cumsum columns per step of its sequential walk
NUM_WARPS = 4
_LOG2 = {1 << i: i for i in range(31)}


def sizes() -> tuple[int, int, int]:
    """(BLOCK, CHUNK, SCAN_BLOCK): the constants above on a GPU, smaller ones in the
    interpreter (whose cost is per operation; its results are only compared with its own)."""
    return (256, 512, 256) if interpreting() else (BLOCK, CHUNK, SCAN_BLOCK)


@triton.jit
def _tree_sum(x, WIDTH: tl.constexpr, LOG: tl.constexpr):
    """x: [WIDTH] float32 (a power of two, LOG = log2 WIDTH) -> its sum by a fixed tree:
    halves added elementwise (x[:h] + x[h:]), LOG times."""
    for i in tl.static_range(LOG):
        lo, hi = tl.split(tl.permute(tl.reshape(x, [2, WIDTH >> (i + 1)]), [1, 0]))
        x = lo + hi
    return tl.sum(x, axis=0)  # one element


@triton.jit
def _scan(x, WIDTH: tl.constexpr, LOG: tl.constexpr):
    """Inclusive prefix sums of x [WIDTH] in a fixed order (Sklansky): at level i every
    block of 2^(i+1) elements adds its lower half's last sum to its upper half."""
    for i in tl.static_range(LOG):
        y = tl.permute(tl.reshape(x, [WIDTH >> (i + 1), 2, 1 << i]), [0, 2, 1])
        lo, hi = tl.split(y)  # [groups, 2^i] each
        is_last = tl.arange(0, 1 << i)[None, :] == (1 << i) - 1
        last = tl.sum(tl.where(is_last, lo, 0.0), axis=1)  # one value plus zeros: exact
        x = tl.reshape(tl.permute(tl.join(lo, hi + last[:, None]), [0, 2, 1]), [WIDTH])
    return x


@triton.jit
def _sum_kernel(X, Out, N, stride_x, divisor, BLOCK: tl.constexpr, LOG: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        x = tl.load(X + row * stride_x + start + offs, mask=start + offs < N, other=0.0)
        acc += x.to(tl.float32)
    total = _tree_sum(acc, BLOCK, LOG) / divisor
    tl.store(Out + row, total.to(Out.dtype.element_ty))


@triton.jit
def _softmax_stats_kernel(
    X, Stats, N, stride_x, n_chunks,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, LOG: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    x_row = X + row * stride_x
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)  # running max per lane
    s = tl.zeros([BLOCK], dtype=tl.float32)  # sum of exp(x - m) per lane
    for j in tl.static_range(CHUNK // BLOCK):
        cols = chunk * CHUNK + j * BLOCK + offs
        x = tl.load(x_row + cols, mask=cols < N, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        base = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: adds 0
        s = tl.where(m == m_new, s, s * tl.exp(m - base)) + tl.exp(x - base)
        m = m_new
    top = tl.max(m, axis=0)
    base = tl.where(top == float("-inf"), 0.0, top)
    s = tl.where(m == top, s, s * tl.exp(m - base))
    at = Stats + (row * n_chunks + chunk) * 2
    tl.store(at, top)
    tl.store(at + 1, _tree_sum(s, BLOCK, LOG))


@triton.jit
def _softmax_out_kernel(
    X, Stats, Out, N, stride_x, stride_o, n_chunks,
    LOG_SOFTMAX: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    CPOW: tl.constexpr, CLOG: tl.constexpr,
):  # fmt: skip
    # CPOW: the chunks' values padded to BLOCK lanes (or more), so that they spread over
    # the threads as in the other reductions (a [64] vector would be held whole by each)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    ci = tl.arange(0, CPOW)
    at = Stats + row * n_chunks * 2 + ci * 2
    mc = tl.load(at, mask=ci < n_chunks, other=float("-inf"))
    sc = tl.load(at + 1, mask=ci < n_chunks, other=0.0)
    top = tl.max(mc, axis=0)
    base = tl.where(top == float("-inf"), 0.0, top)
    total = _tree_sum(tl.where(mc == top, sc, sc * tl.exp(mc - base)), CPOW, CLOG)
    log_total = tl.log(total)
    offs = tl.arange(0, BLOCK)
    for j in tl.static_range(CHUNK // BLOCK):
        cols = chunk * CHUNK + j * BLOCK + offs
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if LOG_SOFTMAX:
            y = x - base - log_total
        else:
            y = tl.exp(x - base) / total
        tl.store(Out + row * stride_o + cols, y.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _cumsum_kernel(X, Out, N, stride_x, stride_o, BLOCK: tl.constexpr, LOG: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    carry = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), axis=0)
    for start in range(0, N, BLOCK):
        mask = start + offs < N
        x = tl.load(X + row * stride_x + start + offs, mask=mask, other=0.0).to(tl.float32)
        c = _scan(x, BLOCK, LOG) + carry
        tl.store(Out + row * stride_o + start + offs, c.to(Out.dtype.element_ty), mask=mask)
        carry = tl.sum(tl.where(offs == BLOCK - 1, c, 0.0), axis=0)  # c[-1], exactly


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def row_sum(x: torch.Tensor, divisor: float, out_dtype: torch.dtype) -> torch.Tensor:
    """x: [R, N] -> [R] of ``out_dtype``: each row's float32 sum divided by ``divisor``."""
    x = _rows(x)
    r, n = x.shape
    out = torch.empty(r, dtype=out_dtype, device=x.device)
    block = sizes()[0]
    if r:
        _sum_kernel[(r,)](
            x, out, n, x.stride(0), float(divisor), BLOCK=block, LOG=_LOG2[block],
            num_warps=NUM_WARPS,
        )  # fmt: skip
    return out


def softmax(x: torch.Tensor, log: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """x: [R, N] -> softmax (or log-softmax) of each row, [R, N] of ``out_dtype``."""
    x = _rows(x)
    r, n = x.shape
    out = torch.empty((r, n), dtype=out_dtype, device=x.device)
    if not (r and n):
        return out
    block, chunk, _ = sizes()
    chunks = triton.cdiv(n, chunk)
    cpow = max(block, triton.next_power_of_2(chunks))
    stats = torch.empty((r, chunks, 2), dtype=torch.float32, device=x.device)
    grid = (r, chunks)
    _softmax_stats_kernel[grid](
        x, stats, n, x.stride(0), chunks, CHUNK=chunk, BLOCK=block, LOG=_LOG2[block],
        num_warps=NUM_WARPS,
    )  # fmt: skip
    _softmax_out_kernel[grid](
        x, stats, out, n, x.stride(0), out.stride(0), chunks, LOG_SOFTMAX=log, CHUNK=chunk,
        BLOCK=block, CPOW=cpow, CLOG=_LOG2[cpow], num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


def cumsum(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x: [R, N] -> inclusive float32 prefix sums of each row, [R, N] of ``out_dtype``."""
    x = _rows(x)
    r, n = x.shape
    out = torch.empty((r, n), dtype=out_dtype, device=x.device)
    scan = sizes()[2]
    if r and n:
        _cumsum_kernel[(r,)](
            x, out, n, x.stride(0), out.stride(0), BLOCK=scan, LOG=_LOG2[scan],
            num_warps=8,
        )  # fmt: skip
    return out
