"""Holding a sequence's blocks back from the prefix index, and publishing them later.

A sequence whose KV arrives after its allocation (copied in from another cache while
this one keeps serving, as a live migration does) must not be found by other prompts
until its bytes are there: :meth:`Registration.unregister` takes its own registered
blocks out of the index (they stay in use, listed as anonymous, so ``free`` and
``discard`` release them as free blocks), and :meth:`Registration.register` indexes
its full blocks again once their KV is written. Neither runs per token: a move calls
each once.

:class:`Registration` is a part of :class:`~pagedkv.manager.BlockManager` (which
subclasses it and sets the attributes declared below).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from pagedkv._validate import live_entry
from pagedkv.manager.allocator import BlockAllocator
from pagedkv.manager.hashing import ROOT
from pagedkv.manager.prefix_index import PrefixIndex
from pagedkv.manager.sequence import SeqRecord


class Registration:
    """Unregister / register a live sequence's blocks (see the module doc)."""

    block_size: int
    prefix_caching: bool
    _digest: Callable[[bytes], bytes]
    _ref: list[int]
    _seqs: dict[Hashable, SeqRecord]
    _alloc: BlockAllocator
    _prefix: PrefixIndex

    def unregister(self, seq_id: Hashable) -> int:
        """Make the full blocks this live sequence registered and holds alone unfindable
        by prefix lookups; returns how many. Their KV and the sequence are unchanged; its
        prefix hits and blocks others hold stay registered. Until :meth:`register`, the
        sequence frees them as free blocks (not cached). ``KeyError`` unless live."""
        seq = live_entry(self._seqs, seq_id)
        if not self.prefix_caching:
            return 0
        ref, hashes = self._ref, self._prefix.hashes
        # not over released positions: their placeholder is the id of a real block
        own = [b for b in seq.blocks[seq.chain or seq.released :] if ref[b] == 1 and hashes[b]]
        self._alloc.unregister(own)
        seq.anonymous += own
        return len(own)

    def register(self, seq_id: Hashable) -> int:
        """Index every full block of the live sequence that is unregistered and whose
        content no other block holds; returns how many became findable. A block whose
        content another block registered meanwhile stays anonymous (the other is found),
        and so does one a fork of the sequence also holds.
        ``KeyError`` unless live. Call it only once the blocks' KV is written."""
        seq = live_entry(self._seqs, seq_id)
        if not self.prefix_caching or not seq.anonymous:
            return 0
        bs, prefix, digest, ref = self.block_size, self._prefix, self._digest, self._ref
        waiting = {b for b in seq.anonymous if ref[b] == 1}  # a fork lists its shared ones too
        step = 4 * bs
        first, full = seq.chain, len(seq.tokens) // bs
        raw = seq.tokens[first * bs : full * bs].tobytes()
        parent = prefix.hashes[seq.blocks[first - 1]] if first else ROOT
        done = 0
        for i in range(first, full):
            at = (i - first) * step
            key = parent + seq.ns + raw[at : at + step]
            parent = digest(key)
            b = seq.blocks[i]
            if b in waiting and prefix.register(b, key, parent):
                waiting.discard(b)
                done += 1
        if done:
            seq.anonymous = [b for b in seq.anonymous if b in waiting]
        return done
