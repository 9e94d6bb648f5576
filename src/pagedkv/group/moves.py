"""KVCacheGroup's moves: one sequence to another member, and rebalancing (a mixin).

A move allocates the sequence on the target with its tokens and salt (reusing the
leading full blocks the target caches), copies the rest through the group's
:class:`~pagedkv.group.transport.Transport`, then frees it on the source; on any error
the target forgets it. :meth:`GroupMoves.rebalance` picks moves with
:func:`~pagedkv.group.rebalance.next_move`.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import TYPE_CHECKING

import torch

from pagedkv.cache import KVCache
from pagedkv.errors import OutOfBlocks
from pagedkv.group.rebalance import next_move
from pagedkv.group.results import Counters, MoveResult
from pagedkv.group.transport import Transport
from pagedkv.storage import KVLayout

Device = str | torch.device


class GroupMoves:
    """``move`` and ``rebalance`` of a :class:`~pagedkv.group.KVCacheGroup` (``self``)."""

    layout: KVLayout
    _transport: Transport
    _members: dict[str, KVCache]
    _where: dict[Hashable, str]
    _pinned: set[Hashable]
    _counters: dict[str, Counters]

    if TYPE_CHECKING:  # KVCacheGroup's

        def device_of(self, seq_id: Hashable) -> str: ...
        def _name(self, device: object) -> str: ...

    def move(self, seq_id: Hashable, device: Device) -> MoveResult:
        """Move a live sequence to another member, bit-exactly; returns what was copied.

        The target allocates the sequence with its tokens and salt, so every leading full
        block it already caches is reused, not copied, and its full blocks are registered
        in the target's prefix index; the other blocks are copied (device to device
        between GPUs, through pinned host memory between a GPU and the CPU), then the
        source frees the sequence. Raises ``KeyError`` for an unknown sequence,
        ``ValueError`` for an unknown member, the sequence's own member or a pinned
        sequence, :class:`OutOfBlocks` when the target has no room; on any error,
        a failed copy included, neither member's sequences, block tables or KV change.
        The one trace a failed copy leaves: cached (unreferenced) blocks the target
        evicted to make room stay evicted, as after any allocation there.
        """
        source = self.device_of(seq_id)
        target = self._name(device)
        if target == source:
            raise ValueError(f"sequence {seq_id!r} is already on {target!r}")
        if seq_id in self._pinned:
            raise ValueError(f"sequence {seq_id!r} is pinned to {source!r}; unpin() it first")
        return self._move(seq_id, source, target)

    def _move(self, seq_id: Hashable, source: str, target: str) -> MoveResult:
        t0 = time.perf_counter()
        src, dst = self._members[source], self._members[target]
        table = src.block_table(seq_id)
        released = src.num_released(seq_id)  # a windowed sequence moves its held blocks
        if released:
            dst.allocate_released(seq_id, src.token_ids(seq_id), released, src.salt(seq_id))
            first = released
        else:
            cached = dst.allocate(seq_id, src.token_ids(seq_id), src.salt(seq_id))
            first = cached // self.layout.block_size
        try:
            done = self._transport.copy(
                src.pool, table[first:], dst.pool, dst.block_table(seq_id)[first:]
            )
            src.free(seq_id)
        except BaseException:
            dst.discard(seq_id)  # the target's new blocks never got their KV: forget them
            raise
        self._where[seq_id] = target
        out, into = self._counters[source], self._counters[target]
        out.moves_out += 1
        into.moves_in += 1
        into.blocks_copied_in += done.blocks
        into.blocks_reused_in += first - released
        return MoveResult(
            seq_id, source, target, done.blocks, first - released, done.bytes,
            time.perf_counter() - t0, done.route, done.peer, done.staging,
        )  # fmt: skip

    def rebalance(self, target_spread: float = 0.1, *, max_moves: int | None = None) -> list:
        """Move sequences from the fullest member to the emptiest until the used fractions
        (blocks in use / blocks) of all members lie within ``target_spread``.

        Deterministic: each round takes the fullest member (ties: first in member order)
        and the emptiest (ties: first), and moves the sequence of the fullest whose block
        count brings the two fractions closest together — only a sequence that narrows
        their gap, is not pinned and has not moved in this call; ties go to the oldest.
        It stops when the spread is reached, no sequence narrows the gap, or after
        ``max_moves`` moves. Returns the :class:`MoveResult` of each move, in order. A
        copy error propagates (the moves before it stay done; the failed one changed
        nothing).
        """
        if isinstance(target_spread, bool) or not isinstance(target_spread, (int, float)):
            raise TypeError(f"target_spread must be a number, got {target_spread!r}")
        if not 0 <= target_spread < 1:
            raise ValueError(f"target_spread must lie in [0, 1), got {target_spread}")
        if max_moves is not None and (
            isinstance(max_moves, bool) or not isinstance(max_moves, int) or max_moves < 0
        ):
            raise ValueError(f"max_moves must be a non-negative int or None, got {max_moves!r}")
        moves: list[MoveResult] = []
        tried: set[Hashable] = set()
        while max_moves is None or len(moves) < max_moves:
            pick = self._next_move(target_spread, tried)
            if pick is None:
                break
            seq_id, source, target = pick
            tried.add(seq_id)
            try:
                moves.append(self._move(seq_id, source, target))
            except OutOfBlocks:
                continue  # the target's room was smaller than its free count said
        return moves

    def _next_move(self, spread: float, tried: set) -> tuple[Hashable, str, str] | None:
        bs = self.layout.block_size
        m = self._members
        candidates = [  # blocks each sequence holds (those released outside a window not)
            (sid, name, -(-m[name].num_tokens(sid) // bs) - m[name].num_released(sid))
            for sid, name in self._where.items()
            if sid not in self._pinned and sid not in tried
        ]
        used = {n: c.manager.num_used_blocks for n, c in self._members.items()}
        size = {n: c.num_blocks for n, c in self._members.items()}
        return next_move(used, size, candidates, spread)
