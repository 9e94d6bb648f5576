"""KVLayout: the shape of one device's KV cache, and what a block of it weighs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedkv._validate import check_int


@dataclass(frozen=True)
class KVLayout:
    """Geometry of a paged KV cache.

    A block holds ``block_size`` tokens of K and V for every layer and KV head.
    ``bytes_per_block`` counts all of them (layers x {K, V} x tokens x heads x dim);
    one block's bytes, as read by :meth:`KVPool.read_blocks`, are ordered
    (layer, k/v, token, head, dim).

    Raises ``ValueError`` for non-positive sizes and ``TypeError`` for a non-int size
    or a dtype that is not a floating ``torch.dtype``.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            check_int(getattr(self, name), f"KVLayout.{name}", minimum=1)
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(
                f"KVLayout.dtype must be a torch.dtype (e.g. torch.bfloat16), got {self.dtype!r}"
            )
        if not self.dtype.is_floating_point:
            raise TypeError(
                "KVLayout.dtype must be a floating dtype (float16, bfloat16, float32), "
                f"got {self.dtype}"
            )

    @property
    def element_size(self) -> int:
        """Bytes of one K or V element."""
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K and V of one token across all layers and KV heads."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block: K and V of ``block_size`` tokens across all layers."""
        return self.bytes_per_token * self.block_size

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)
