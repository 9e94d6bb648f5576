"""What the tier tests share: a small bf16 layout, hand-made block hashes, and a
TieredStore attached to a pool of seeded random blocks."""

from __future__ import annotations

import hashlib

import torch

from pagedkv.storage import KVLayout, KVPool
from pagedkv.tiers import TieredStore

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.bfloat16)
BPB = LAYOUT.bytes_per_block


def hashes(n: int, tag: str = "a") -> list[bytes]:
    """``n`` distinct block hashes; another ``tag`` gives another ``n``."""
    return [hashlib.sha256(f"{tag}{i}".encode()).digest() for i in range(n)]


def make_pool(num_blocks: int = 32, seed: int = 0) -> KVPool:
    """A pool of :data:`LAYOUT` whose blocks hold random values drawn from ``seed``."""
    pool = KVPool(LAYOUT, num_blocks)
    g = torch.Generator().manual_seed(seed)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=g).to(pool.kv.dtype))
    return pool


def chain(
    tiers, pool: KVPool | None = None, fingerprint: str = "model-a", *, num_blocks: int = 32,
    seed: int = 0,
) -> TieredStore:  # fmt: skip
    """A TieredStore over ``tiers`` attached to ``pool`` (default: a fresh
    :func:`make_pool` of ``num_blocks`` from ``seed``)."""
    ts = TieredStore(tiers, LAYOUT, fingerprint)
    ts.attach(pool if pool is not None else make_pool(num_blocks, seed))
    return ts
