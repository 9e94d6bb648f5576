"""Sliding-window memory: a sequence drops the blocks no layer's window can reach.

When every layer of a model attends only to the last ``window`` tokens, a query at
position ``p`` reads keys in ``(p - window, p]``, so the whole blocks before
``p - window + 1`` are never read again. :meth:`WindowOps.release_before` drops the
sequence's reference to them: a registered (full, hashed) block goes back to the prefix cache as
an evictable cached block, exactly as :meth:`~pagedkv.manager.BlockManager.free`
would leave it, and an unregistered one becomes free.

Representation: the first ``seq.released`` entries of the sequence's block table hold
:data:`NULL_BLOCK` (block 0), a placeholder the sequence holds no reference to. The
table keeps its length (logical block ``i`` is still ``blocks[i]``, so ``append``,
``slot_mapping`` and the kernels' block tables index it unchanged) and stays a valid
int table; windowed kernels never read blocks before the window. Nothing is stored
per block, and the hot operations only read ``released`` once per call.

A sequence with released blocks never holds a prefix-hit chain (``chain == 0``): the
first release turns its share of the chain into one reference per block, so the
held blocks are ``blocks[released:]``, one reference each.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from pagedkv._validate import check_bool, check_int, check_new_id
from pagedkv.events import EventHub
from pagedkv.manager.generations import Generations
from pagedkv.manager.hashing import ROOT, as_token_array, chain_hashes
from pagedkv.manager.kv_events import stored_events
from pagedkv.manager.pressure import PressureWatch
from pagedkv.manager.reads import ManagerReads
from pagedkv.manager.sequence import NULL_BLOCK, SeqRecord

__all__ = ["NULL_BLOCK", "WindowOps", "held_blocks"]


class WindowOps(ManagerReads):
    """The block manager's operations on released blocks (mixed into
    :class:`~pagedkv.manager.BlockManager`)."""

    _watch: PressureWatch | None
    _observed: bool  # pressure callbacks or KV events: call _after() at the end
    _gens: Generations
    _events: EventHub | None

    def _after(self) -> None: ...  # BlockManager's

    def release_before(self, seq_id: Hashable, num_tokens: int) -> int:
        """Drop ``seq_id``'s references to its whole blocks before token ``num_tokens``.

        For models whose every layer is windowed: call it with ``next_position -
        window + 1`` (the first key a later query can read). Returns how many blocks
        were released now (0 when none are new). Block ``i`` is released when ``(i + 1)
        * block_size <= num_tokens``: a registered block becomes cached (evictable,
        findable by later prompts), an unregistered one free, and its table entry
        :data:`NULL_BLOCK`. Raises ``KeyError`` for an unknown sequence and
        ``TypeError``/``ValueError`` for a ``num_tokens`` that is not an int in ``[0,
        num_tokens(seq_id)]``; nothing changes then.
        """
        seq = self._seq(seq_id)
        check_int(num_tokens, "num_tokens", minimum=0)
        n = len(seq.tokens)
        if num_tokens > n:
            raise ValueError(f"num_tokens={num_tokens} is past the sequence's {n} tokens")
        stop, start = num_tokens // self.block_size, seq.released
        if stop <= start:
            return 0
        if seq.chain:
            self._own_chain(seq)
        blocks = seq.blocks
        dropped = blocks[start:stop]
        gone = set(dropped)
        anonymous = [b for b in seq.anonymous if b in gone]
        if anonymous:
            seq.anonymous = [b for b in seq.anonymous if b not in gone]
        if seq.private:  # nothing of it is registered: its blocks become free
            self._alloc.release_private(dropped)
        else:  # reversed: release() lists the last block first, so the oldest goes first
            self._alloc.release(dropped[::-1], 0, anonymous, False)
        blocks[start:stop] = [NULL_BLOCK] * (stop - start)
        seq.released = stop
        if self._observed:
            self._after()
        return stop - start

    def _own_chain(self, seq: SeqRecord) -> None:
        """Turn ``seq``'s share of its prefix-hit chain into one reference per block."""
        alloc, chain = self._alloc, seq.chain
        tail = seq.blocks[chain - 1]
        holders = alloc.chains[tail]
        if holders == 1:
            del alloc.chains[tail]  # the chain's one reference per block becomes seq's own
        else:
            alloc.chains[tail] = holders - 1
            ref = alloc.ref
            for b in seq.blocks[:chain]:
                ref[b] += 1
        seq.chain = 0

    def num_released(self, seq_id: Hashable) -> int:
        """Leading blocks of ``seq_id`` released by :meth:`release_before` (``KeyError``
        for an unknown sequence)."""
        return self._seq(seq_id).released

    def allocate_released(
        self,
        seq_id: Hashable,
        token_ids: Sequence[int],
        released: int,
        salt: object = None,
        *,
        share_prefix: bool = True,
    ) -> None:
        """Start ``seq_id`` with ``token_ids`` whose first ``released`` blocks are released.

        For restoring a windowed sequence (swap-in, a move to another cache): only the
        blocks from ``released`` on are taken, fresh (no prefix hits: the caller writes
        all their KV), and the full ones are registered under the hashes of the whole
        token chain. Raises like :meth:`~pagedkv.manager.BlockManager.allocate`, and
        ``ValueError`` unless ``0 <= released <= len(token_ids) // block_size``; nothing
        changes on any error. ``share_prefix=False``: a private sequence, as with
        :meth:`~pagedkv.manager.BlockManager.allocate` (nothing registered).
        """
        check_new_id(self._seqs, seq_id)
        arr = as_token_array(token_ids)
        n, bs = len(arr), self.block_size
        if n == 0:
            raise ValueError("token_ids is empty: a prompt needs at least one token")
        check_int(released, "released", minimum=0)
        check_bool(share_prefix, "share_prefix")
        if released > n // bs:
            raise ValueError(
                f"released={released} is more than the {n // bs} full blocks of {n} tokens"
            )
        prefix, alloc = self._prefix, self._alloc
        ns = prefix.namespace(salt)
        need = -(-n // bs) - released
        if need > alloc.num_free:
            self._counters.allocation_failures += 1
            raise alloc.out_of_blocks(need, f"allocate_released({seq_id!r}, {n} tokens)")
        blocks = [NULL_BLOCK] * released + (alloc.take(need) if need else [])
        self._counters.requests_without_hit += 1
        self._counters.query_tokens += n
        private = not share_prefix or n < self._min_prefix_tokens
        shares = self.prefix_caching and not private
        parent = ROOT
        if shares and released:
            parent = chain_hashes(arr[: released * bs], bs, ns, self._digest)[-1]
        seq = SeqRecord(blocks, arr, parent, ns, 0, self._gens.number, private, self._clock())
        seq.released = released
        if shares:
            raw = arr.tobytes()
            seq.last_hash = prefix.register_blocks(
                blocks, released, n // bs, raw, 0, ns, parent, seq.anonymous
            )
            if self._events is not None:
                self._events.pending += stored_events(
                    prefix, blocks, released, n // bs, raw, 0, ns, parent, seq.anonymous
                )
        self._seqs[seq_id] = seq
        if self._observed:
            self._after()


def held_blocks(seq: SeqRecord) -> list[int]:
    """The blocks ``seq`` holds a reference to (its table without the placeholders)."""
    return seq.blocks[seq.released :] if seq.released else seq.blocks
