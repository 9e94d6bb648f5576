"""Tile configurations of the batch-invariant GEMM, and the per-call choice among them.

A row of ``A @ B`` gets the same bits at every M as long as one compiled kernel computes
it with one sequence of float32 accumulations over K. Several tile shapes may still be
used — small tiles when M is small (decode: a memory-bound GEMV, which needs many
programs over N), large ones when M is large — if they perform the *same* sequence per
output element: on the GPU each ``tl.dot`` over a BLOCK_K slice lowers to MMA
instructions chained over K in steps of 16 (bf16/fp16; 8 for tf32, 1 for float32 FMA),
so BLOCK_M, BLOCK_N, BLOCK_K, warps and stages should not matter. "Should" is not
enough: whether two configurations agree is a property of the GPU and compiler, and only
the GPU can tell. So a configuration other than the dtype's default is used only after
:class:`GemmSelector` has computed one random [192, K] block (1.5 tallest tiles) with it and the
default on the real weight and found every bit equal, once per (device, dtype, N, K,
precision, weight layout, configuration). When they differ (or the candidate fails to
compile) the default is used for that shape at every M, and a warning is logged once.
During CUDA-graph capture no check can run (it synchronizes): an unverified candidate
is replaced by the default, which is always correct (run a warm-up forward first).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch

from pagedkv.ops._config import interpreting

log = logging.getLogger("pagedkv.ops")


class GemmConfig(NamedTuple):
    """One launch setting of the Triton GEMM. ``per_sm``: programs per SM of the persistent
    grid (more than one hides memory latency for small tiles)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    per_sm: int = 1

    @property
    def tag(self) -> str:
        return (
            f"{self.block_m}x{self.block_n}x{self.block_k}"
            f"w{self.num_warps}s{self.num_stages}p{self.per_sm}"
        )


# Each ladder: the default first (the arithmetic reference: Thinking Machines'
# batch_invariant_ops tile for bf16 on H100), then smaller tiles, largest area first.
# BLOCK_M 64 is the smallest tile of Hopper's wgmma (m64nNk16): all of these use the same
# MMA family; mma.sync tiles (BLOCK_M 16) are left to the benchmark's sweep.
_HALF = (
    GemmConfig(128, 128, 64, num_warps=8, num_stages=3),
    GemmConfig(64, 128, 64, num_warps=4, num_stages=4, per_sm=2),
    GemmConfig(64, 64, 64, num_warps=4, num_stages=4, per_sm=2),
    GemmConfig(64, 32, 128, num_warps=4, num_stages=4, per_sm=2),
    # decode GEMVs: few, long programs; 5 stages keep ~40 KB of the weight in flight per SM
    GemmConfig(64, 16, 256, num_warps=4, num_stages=5),
)
_TF32 = (
    GemmConfig(128, 128, 32, num_warps=8, num_stages=3),
    GemmConfig(64, 64, 32, num_warps=4, num_stages=4, per_sm=2),
    GemmConfig(64, 32, 64, num_warps=4, num_stages=4, per_sm=2),
    GemmConfig(64, 16, 64, num_warps=4, num_stages=4, per_sm=2),
)
_IEEE = (  # float32 products on CUDA cores (fma in K order)
    GemmConfig(64, 64, 32, num_warps=4, num_stages=2),
    GemmConfig(32, 32, 32, num_warps=4, num_stages=2, per_sm=2),
)
# The interpreter (tiny tests): its emulated dot accumulates in steps of min(16, BLOCK_K)
# like an MMA, so these agree with each other (and a BLOCK_K 8 config would not).
_INTERPRET = (
    GemmConfig(16, 16, 16, group_m=2, num_warps=1, num_stages=1),
    GemmConfig(16, 32, 32, group_m=2, num_warps=1, num_stages=1),
    GemmConfig(16, 8, 16, group_m=2, num_warps=1, num_stages=1, per_sm=2),
)


def ladder(dtype: torch.dtype, precision: str) -> tuple[GemmConfig, ...]:
    """The configurations for ``dtype`` (and float32 ``precision``), the default first."""
    if interpreting():
        return _INTERPRET
    if dtype == torch.float32:
        return _IEEE if precision == "ieee" else _TF32
    return _HALF


def tiles(cfg: GemmConfig, batch: int, m: int, n: int) -> int:
    return batch * -(-m // cfg.block_m) * -(-n // cfg.block_n)


def pick(configs: tuple[GemmConfig, ...], batch: int, m: int, n: int, sms: int) -> GemmConfig:
    """The largest tile that still gives every SM a program, among those no taller than M
    (rounded up to a power of two); else the one with the most tiles. A pure function of
    the shape: which configuration serves an M never changes the bits (see module doc)."""
    rows = max(min(c.block_m for c in configs), 1 << max(m - 1, 0).bit_length())
    fit = [c for c in configs if c.block_m <= rows]
    for c in fit:
        if tiles(c, batch, m, n) >= sms:
            return c
    return max(fit, key=lambda c: tiles(c, batch, m, n))


Runner = Callable[[torch.Tensor, torch.Tensor, GemmConfig], torch.Tensor]


class GemmSelector:
    """Chooses the configuration of each call, using a non-default one only once it is
    verified bit-identical to the default for that weight shape (see module doc).

    ``run(a [R, K], b [K, N], config) -> [R, N]`` computes a product with one given
    configuration. The verdicts are kept per process in this object (one instance,
    :data:`pagedkv.ops.triton_matmul.SELECTOR`, serves the library; tests make their own).
    """

    def __init__(self, run: Runner, configs: Callable = ladder) -> None:
        self._run = run
        self._configs = configs
        self._verdicts: dict[tuple, bool] = {}

    def verdicts(self) -> dict[tuple, bool]:
        """(device, dtype, N, K, precision, weight layout, config tag) -> identical bits."""
        return dict(self._verdicts)

    def choose(self, b: torch.Tensor, batch: int, m: int, precision: str, sms: int) -> GemmConfig:
        """The configuration for ``batch`` x [m, K] @ b [K, N] (b: one weight, any strides)."""
        k, n = b.shape
        configs = self._configs(b.dtype, precision)
        cfg = pick(configs, batch, m, n, sms)
        if cfg == configs[0]:
            return cfg
        layout = "k-contiguous" if b.stride(0) == 1 else "n-contiguous"
        key = (str(b.device), str(b.dtype), n, k, precision, layout, cfg.tag)
        same = self._verdicts.get(key)
        if same is None:
            if b.is_cuda and torch.cuda.is_current_stream_capturing():
                return configs[0]  # cannot synchronize now; the default is always right
            rows = 3 * max(c.block_m for c in configs) // 2  # whole and partial row tiles
            same = self._verify(b, rows, cfg, configs[0], key)
            self._verdicts[key] = same
        return cfg if same else configs[0]

    def _verify(self, b, rows: int, cfg: GemmConfig, default: GemmConfig, key) -> bool:
        gen = torch.Generator(device=b.device).manual_seed(0)
        a = torch.randn(rows, b.shape[0], generator=gen, device=b.device)
        a = a.to(b.dtype)
        want = self._run(a, b, default)
        try:
            got = self._run(a, b, cfg)
        except Exception as e:  # e.g. out of shared memory on this GPU: just not usable
            log.warning("batch-invariant GEMM: config %s failed for %s (%s: %s); using %s",
                        cfg.tag, key, type(e).__name__, e, default.tag)  # fmt: skip
            return False
        if torch.equal(got, want):
            return True
        diff = int((got != want).sum())
        log.warning(
            "batch-invariant GEMM: config %s gives other bits than %s for %s (%d of %d "
            "elements differ); using %s for this shape at every M",
            cfg.tag, default.tag, key, diff, want.numel(), default.tag,
        )  # fmt: skip
        return False
