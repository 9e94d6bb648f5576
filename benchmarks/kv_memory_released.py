"""KV memory of a model whose every layer is windowed, with blocks released (issue 13).

Replays one long generation through a real :class:`~pagedkv.BlockManager` the way the
engine drives it: the prompt in prefill chunks, then one token a step, and after each
step ``release_before(seq, computed - window + 1)``. Reports the blocks held (at the
end and at the peak, the next step's reservation included) against what attention can
still read (the last ``window`` tokens in every layer) and against keeping every block
(what a model with a full-attention layer, or pagedkv before the release, holds).

The geometry is Mistral-7B-v0.1's (32 layers, 8 KV heads x 128, ``sliding_window=4096``)
by default; no GPU, no weights.

    python benchmarks/kv_memory_released.py [--context 32768] [--window 4096] [--block-size 16]
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

from _kv_memory import parse_args, write_json
from pagedkv import BlockManager


@dataclass(frozen=True)
class Released:
    context: int
    window: int
    block_size: int
    block_bytes: int  # one block, every layer
    held_blocks: int  # at the end of the generation
    peak_blocks: int  # most blocks held at once (a step's reservation included)
    needed_bytes: int  # the last `window` tokens, every layer
    full_blocks: int  # every block of the context (nothing released)

    @property
    def held_bytes(self) -> int:
        return self.held_blocks * self.block_bytes

    @property
    def peak_bytes(self) -> int:
        return self.peak_blocks * self.block_bytes


def replay(
    context: int, window: int, block_size: int, *, prompt: int = 2048, chunk: int = 512,
    layers: int = 32, kv_heads: int = 8, head_dim: int = 128, dtype_bytes: int = 2,
) -> Released:  # fmt: skip
    """One sequence to ``context`` tokens: prefill ``prompt`` in ``chunk``-token steps,
    then decode; blocks outside the window released after every step."""
    m = BlockManager(-(-context // block_size) + 2, block_size, prefix_caching=True)
    tokens = iter(range(context))
    m.allocate("s", [next(tokens) for _ in range(min(chunk, prompt))])
    computed = min(chunk, prompt)
    peak = m.num_used_blocks
    while computed < context:
        m.release_before("s", max(0, computed - window + 1))
        step = min(chunk, prompt - computed) if computed < prompt else 1
        m.append("s", [next(tokens) for _ in range(step)])
        peak = max(peak, m.num_used_blocks)
        computed += step
    m.release_before("s", computed - window + 1)
    m.check_integrity()
    per_token = layers * 2 * kv_heads * head_dim * dtype_bytes  # K and V, every layer
    return Released(
        context, window, block_size, per_token * block_size, m.num_used_blocks, peak,
        min(window, context) * per_token, -(-context // block_size),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv, context=32768, window=4096)
    r = replay(args.context, args.window, args.block_size)
    mib = 2**20
    print(f"Mistral-7B-v0.1 geometry (32 layers, every one windowed, window {r.window}), "
          f"context {r.context}, block {r.block_size}, bf16, one sequence")  # fmt: skip
    print(
        f"  held at the end : {r.held_blocks:5d} blocks = {r.held_bytes / mib:8.1f} MiB "
        f"({r.held_bytes / r.needed_bytes:.3f}x the {r.needed_bytes / mib:.1f} MiB needed)"
    )
    print(
        f"  peak held       : {r.peak_blocks:5d} blocks = {r.peak_bytes / mib:8.1f} MiB "
        f"({r.peak_bytes / r.needed_bytes:.3f}x needed; prefill chunks of 512 included)"
    )
    print(
        f"  every block kept: {r.full_blocks:5d} blocks = "
        f"{r.full_blocks * r.block_bytes / mib:8.1f} MiB "
        f"({r.full_blocks * r.block_bytes / r.needed_bytes:.3f}x needed)"
    )
    result = {**vars(args), "out": None, **asdict(r)}
    write_json(result, args.out, "kv_memory_released.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
