"""EngineConfig: the engine's options, validated once (the CLI reads the same fields)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedkv._kv_formats import parse_kv_dtype
from pagedkv.engine.preemption import PolicySpec, make_preemption_policy


@dataclass(frozen=True)
class EngineConfig:
    """Options of :class:`~pagedkv.Engine`.

    ``num_blocks``: KV blocks in the pool; ``None`` sizes it from free device memory x
    ``gpu_memory_fraction`` on CUDA, and from :attr:`cpu_kv_bytes` on CPU.
    ``max_batch_tokens``: tokens computed per step (chunked prefill budget).
    ``max_num_seqs``: requests running at once. ``preemption``: ``"recompute"`` or
    ``"swap"`` (needs tiers on the cache). ``preemption_policy``: which running requests
    give up their blocks when a request needs more than are free: ``"newest"``
    (default), ``"oldest"``, ``"lru"``, ``"fewest_blocks"``, ``"priority"``, or a
    function ``select_victims(running, blocks_needed)`` (see
    :mod:`pagedkv.engine.preemption`). ``cuda_graphs``: capture decode steps for
    fixed batch-size buckets on CUDA (eager otherwise). ``kv_dtype``: how the KV pool
    stores K and V, ``None`` (the model's dtype) or a compressed format, ``"fp8"``
    (e4m3), ``"fp8_e5m2"``, ``"int8"`` (:class:`~pagedkv.storage.KVLayout`); a pool sized
    from memory then holds about twice the blocks (each is about half the bytes).
    """

    num_blocks: int | None = None
    gpu_memory_fraction: float = 0.8
    block_size: int = 16
    max_batch_tokens: int = 8192
    max_num_seqs: int = 256
    prefix_caching: bool = True
    preemption: str = "recompute"
    preemption_policy: PolicySpec = "newest"
    cuda_graphs: bool = True
    cpu_kv_bytes: int = 512 * 2**20
    kv_dtype: str | torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1 (or None to size it), got {self.num_blocks}")
        if not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise ValueError(
                f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}"
            )
        for name in ("block_size", "max_batch_tokens", "max_num_seqs", "cpu_kv_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.preemption not in ("recompute", "swap"):
            raise ValueError(f"preemption must be 'recompute' or 'swap', got {self.preemption!r}")
        make_preemption_policy(self.preemption_policy)  # raises for an unknown name or type
        if self.kv_dtype is not None:
            parse_kv_dtype(self.kv_dtype)  # raises for an unknown format

    def resolve_num_blocks(self, bytes_per_block: int, device: torch.device) -> int:
        """Blocks to allocate: ``num_blocks`` or what the device memory allows."""
        if self.num_blocks is not None:
            return self.num_blocks
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * self.gpu_memory_fraction)
        else:
            budget = self.cpu_kv_bytes
        n = budget // bytes_per_block
        if n < 2:
            raise ValueError(
                f"only {budget} bytes available for KV blocks of {bytes_per_block} bytes; "
                "pass num_blocks= or raise gpu_memory_fraction"
            )
        return int(n)
