"""A new model under a live manager: change the extra keys in O(1), never serve old KV.

:class:`ModelChanges` is the part of :class:`~pagedkv.manager.BlockManager` that
switches the extra keys (the model fingerprint) folded into every block hash, and
starts sequences whose bytes come from an earlier model (it subclasses it).

After :meth:`~ModelChanges.set_extra_keys` no prompt matches a block registered
before: prompts are looked up under the new namespace, where those blocks are not.
Nothing is scanned; the old blocks stay cached (evictable, or in use by the sequences
holding them) until the policy reclaims them, and ``stats().invalidated_blocks``
counts them meanwhile. Sequences allocated before the change go on, but the blocks
they fill from then on are never registered (their KV mixes two models), and neither
are those of :meth:`~ModelChanges.allocate_unshared`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence

from pagedkv._validate import check_new_id, unknown_sequence
from pagedkv.events import DEVICE, AllBlocksCleared, EventHub
from pagedkv.manager.allocator import BlockAllocator
from pagedkv.manager.config import ManagerConfig
from pagedkv.manager.generations import Generations
from pagedkv.manager.hashing import ROOT, as_token_array, chain_hashes
from pagedkv.manager.prefix_index import PrefixIndex
from pagedkv.manager.sequence import SeqRecord
from pagedkv.manager.stats import Counters


class ModelChanges:
    """Model-generation changes of a block manager."""

    config: ManagerConfig
    num_blocks: int
    block_size: int
    prefix_caching: bool
    _digest: Callable[[bytes], bytes]
    _seqs: dict[Hashable, SeqRecord]
    _alloc: BlockAllocator
    _prefix: PrefixIndex
    _gens: Generations
    _counters: Counters
    _clock: Callable[[], float]
    _events: EventHub | None
    _observed: bool
    _after: Callable[[], None]

    @property
    def generation(self) -> int:
        """How many times the extra keys changed (0 for a new manager)."""
        return self._gens.number

    def generation_of(self, seq_id: Hashable) -> int:
        """The generation a live sequence's KV belongs to (``-1``: started by
        :meth:`allocate_unshared`); ``KeyError`` unless live."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise unknown_sequence(seq_id)
        return seq.gen

    def set_extra_keys(self, extra_keys: Sequence[object]) -> bool:
        """Fold ``extra_keys`` (e.g. a new model fingerprint) into every block hash from
        now on; O(1) in the number of blocks. Returns ``False``, changing nothing, when
        they are the current keys.

        Blocks registered before are never matched again (unless the keys change back:
        they hold that model's KV) and are evicted lazily; pins move to the same tokens
        under the new keys; subscribers hear :class:`~pagedkv.events.AllBlocksCleared`.
        Raises ``TypeError`` for a key that is not ``None``/``str``/``bytes``/``int``.
        """
        config = dataclasses.replace(self.config, extra_keys=extra_keys)  # validates
        keys = tuple(config.extra_keys)
        if keys == self._gens.keys:
            return False
        prefix, alloc = self._prefix, self._alloc
        self._gens.advance(keys, len(prefix), prefix.stamp)
        prefix.set_extra_keys(keys)
        self.config = config
        if alloc.pins.sources:
            alloc.policy.add_many(
                alloc.pins.rekey(prefix.namespace, prefix.digest, prefix, alloc.policy)
            )
        if self._events is not None:
            self._events.pending.append(AllBlocksCleared(DEVICE))
            self._events.end()
        return True

    def allocate_unshared(
        self, seq_id: Hashable, token_ids: Sequence[int], salt: object = None
    ) -> None:
        """Start ``seq_id`` on fresh blocks that share nothing and never register: for a
        sequence whose KV was computed under earlier extra keys (swapped out before a
        model change), which must neither reuse nor be reused as this model's KV.

        Raises as :meth:`allocate` does (live id, empty or bad tokens, out of blocks);
        nothing changes then.
        """
        check_new_id(self._seqs, seq_id)
        arr = as_token_array(token_ids)
        n, bs = len(arr), self.block_size
        if n == 0:
            raise ValueError("token_ids is empty: a prompt needs at least one token")
        ns = self._prefix.namespace(salt)
        need = -(-n // bs)
        if need > self._alloc.num_free:
            self._counters.allocation_failures += 1
            raise self._alloc.out_of_blocks(need, f"allocate_unshared({seq_id!r}, {n} tokens)")
        blocks = self._alloc.take(need)
        self._counters.requests_without_hit += 1
        self._counters.query_tokens += n
        chain = chain_hashes(arr, bs, ns, self._digest) if self.prefix_caching else []
        seq = SeqRecord(blocks, arr, chain[-1] if chain else ROOT, ns, 0, -1, False, self._clock())
        seq.anonymous = blocks[: len(chain)]
        self._seqs[seq_id] = seq
        if self._observed:  # pressure callbacks; events of blocks it took by evicting
            self._after()
