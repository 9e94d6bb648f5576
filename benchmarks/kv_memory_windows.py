"""KV memory of a model with sliding-window layers: bytes held ÷ bytes its tokens need.

For a Gemma-3-shaped config (5 sliding-window layers : 1 global, window 1024; the
Gemma-3-12B text geometry by default) at a long context, compares

- **today** (one block table shared by every layer, nothing released): the blocks a real
  :class:`~pagedkv.BlockManager` holds for the sequence, times the bytes of a block (all
  layers); the windowed layers' kernels skip the old blocks, but the blocks stay held;
- **per-layer-group tables** (what a manager with one table per window size would hold):
  the global layers keep every block, the windowed layers only the blocks that overlap
  the last query's window;
- **full attention** (the same geometry with every layer global).

"Needed" is what attention can still read: every token for a global layer, the last
``window`` tokens for a windowed one (the next query at position n-1 sees keys in
``(n-1-window, n-1]``). No GPU, no weights: the config is a transformers config.

    python benchmarks/kv_memory_windows.py [--context 16384] [--window 1024] [--block-size 16]
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

from _kv_memory import parse_args, write_json
from pagedkv import BlockManager
from pagedkv.integrations.support import check_model_supported


@dataclass(frozen=True)
class MemoryRow:
    layout: str
    held_bytes: int
    needed_bytes: int

    @property
    def ratio(self) -> float:
        return self.held_bytes / self.needed_bytes


def gemma3_like_config(window: int = 1024, layers: int = 48):
    """Gemma-3-12B's text geometry: 48 layers (5 local : 1 global), 8 KV heads x 256."""
    import transformers

    return transformers.Gemma3TextConfig(
        hidden_size=3840, intermediate_size=15360, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=window,
        vocab_size=262208, query_pre_attn_scalar=256,
    )  # fmt: skip


def window_blocks(context: int, window: int, block_size: int) -> int:
    """Blocks overlapping the last query's window ``[context - window, context - 1]``."""
    first = max(0, context - window) // block_size
    return (context - 1) // block_size - first + 1


def measure(config, context: int, block_size: int = 16, dtype_bytes: int = 2) -> list[MemoryRow]:
    support = check_model_supported(config)
    per_token_layer = 2 * support.num_kv_heads * support.head_dim * dtype_bytes  # K and V
    block_bytes = support.num_layers * block_size * per_token_layer  # one block, all layers
    manager = BlockManager(4 * -(-context // block_size), block_size, prefix_caching=False)
    manager.allocate("seq", list(range(context)))
    held_blocks = manager.num_blocks - manager.num_free_blocks  # one table, every layer
    manager.check_integrity()
    full_blocks = -(-context // block_size)
    needed = grouped = 0
    for w in support.windows:
        if w is None or w >= context:
            needed += context * per_token_layer
            grouped += full_blocks * block_size * per_token_layer
        else:
            needed += w * per_token_layer
            grouped += window_blocks(context, w, block_size) * block_size * per_token_layer
    full_needed = support.num_layers * context * per_token_layer
    return [
        MemoryRow("one block table (today)", held_blocks * block_bytes, needed),
        MemoryRow("per-layer-group tables", grouped, needed),
        MemoryRow("full attention, same geometry", full_blocks * block_bytes, full_needed),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv, context=16384, window=1024)
    rows = measure(gemma3_like_config(args.window), args.context, args.block_size)
    full = rows[2].held_bytes
    print(f"Gemma-3-like (48 layers, 5 local : 1 global, window {args.window}), "
          f"context {args.context}, block {args.block_size}, bf16, one sequence")  # fmt: skip
    print(f"{'layout':34} {'held MiB':>10} {'needed MiB':>11} {'held/needed':>12} {'vs full':>8}")
    for r in rows:
        print(f"{r.layout:34} {r.held_bytes / 2**20:10.1f} {r.needed_bytes / 2**20:11.1f} "
              f"{r.ratio:12.3f} {r.held_bytes / full:8.3f}")  # fmt: skip
    result = {**vars(args), "out": None, "rows": [asdict(r) | {"ratio": r.ratio} for r in rows]}
    write_json(result, args.out, "kv_memory_windows.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
