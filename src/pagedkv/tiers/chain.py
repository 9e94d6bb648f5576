"""TieredStore: the offload tiers below the GPU pool, as ``KVCache`` drives them.

Blocks are keyed ``kv-<namespace>-<block hash hex>``; the namespace digests the
cache fingerprint and the layout, and the chained block hash already folds in the
salt, so two models, layouts or salts never see each other's entries (framed tiers
also verify the fingerprint on every read).

- ``demote``: blocks evicted from the pool are gathered into host staging at once
  (stream-ordered on a copy stream on CUDA) and stored into the first tier by a
  background thread; a full tier spills its LRU victims to the next (CPU -> disk ->
  Redis).
- ``promote``: the longest leading run of hashes found in the pending writes and
  the tiers (one batched ``contains`` per tier, then batched loads: one call for
  the CPU tier, ~8 MiB per round trip for disk / Redis so verification overlaps
  I/O) is loaded into fresh pool blocks with one ``write_blocks`` (per 256 MiB).
  Write-back pauses while a lookup runs: the lookup is on the time-to-first-token
  path, write-back is not.
- ``swap_out``/``swap_in``: a whole sequence's blocks to the CPU tier's swap area
  (never evicted) and back, bit-exact.
- Tiers given ``kv_dtype="fp8"`` (or int8, ...) hold blocks in that format: demote
  quantizes on the pool's device, promote dequantizes (swaps stay in the pool's format).
- ``persist``: for a warm restart, the pool's cached blocks and the CPU tier's entries
  to the first persistent tier (:mod:`pagedkv.tiers.persist`).

A chain never closed is closed at exit by an ``atexit`` hook (holding it weakly): it
stores the pending write-backs (for up to :data:`AT_EXIT_FLUSH_SECONDS`, then drops the
rest with one warning) and joins the writer thread, which must not be left running
inside torch or a store when the interpreter tears down (that aborted it). KV events
of the levels: :mod:`pagedkv.tiers.events`.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from pagedkv._closing import Closing
from pagedkv._kv_formats import dtype_name, is_quantized
from pagedkv.storage import KVLayout, KVPool
from pagedkv.tiers.chain_upkeep import ChainUpkeep
from pagedkv.tiers.config import CPUTier, DiskTier, RedisTier, check_tiers, open_levels
from pagedkv.tiers.events import EventSink, TierEvents
from pagedkv.tiers.level import Level
from pagedkv.tiers.persist import Persisted, check_persistent, persist_blocks
from pagedkv.tiers.swap import SwapArea
from pagedkv.tiers.transfer import Transfer
from pagedkv.tiers.writeback import Job, Staged, WriteBack

# How many recently written-through keys are remembered (and not copied again).
WRITTEN_THROUGH_MEMORY = 1 << 16
# At exit, how long pending write-backs of an unclosed chain may take before the rest is
# dropped (a block not stored is only a later miss).
AT_EXIT_FLUSH_SECONDS = 30.0

log = logging.getLogger("pagedkv.tiers")


def _tier_layout(tiers: Sequence[CPUTier | DiskTier | RedisTier], layout: KVLayout) -> KVLayout:
    """The layout of a block as the tiers store it: the pool's, or the tiers' ``kv_dtype``."""
    formats = {t.kv_dtype for t in tiers}
    if len(formats) > 1:
        shown = ", ".join(sorted("pool's" if f is None else dtype_name(f) for f in formats))
        raise ValueError(
            f"tiers store blocks in different formats ({shown}); give every tier the same "
            "kv_dtype (a block spills from one tier to the next as it is)"
        )
    fmt = formats.pop()
    if fmt is None or fmt == layout.kv_dtype:
        return layout
    if not is_quantized(fmt) and fmt != layout.dtype:
        raise ValueError(
            f"tier kv_dtype {dtype_name(fmt)} is neither a compressed format (fp8 / int8) nor "
            f"the model's dtype {dtype_name(layout.dtype)}"
        )
    return layout.with_kv_dtype(fmt)


class _ExitHook:
    """Closes a chain still open at interpreter exit; holds it weakly (through a weak
    reference to its bound ``_close_at_exit``)."""

    def __init__(self, close: weakref.WeakMethod[Callable[[], None]]) -> None:
        self._close = close

    def __call__(self) -> None:
        close = self._close()
        if close is not None:
            close()


class TieredStore(ChainUpkeep, Closing):
    """The chain of offload tiers of one cache (see the module docstring).

    ``tiers``: a non-empty list of :class:`CPUTier`, :class:`DiskTier`,
    :class:`RedisTier`, fastest first. ``fingerprint`` identifies the model and
    cache (architecture, dtype, layout, weights version); entries written under
    another fingerprint are never returned. ``max_pending_bytes`` bounds the host
    staging of write-back. Opening a tier that cannot work (unwritable directory,
    capacity below one block) raises here; a Redis server that is down does not.
    """

    def __init__(
        self,
        tiers: Sequence[CPUTier | DiskTier | RedisTier],
        layout: KVLayout,
        fingerprint: str,
        *,
        max_pending_bytes: int = 256 << 20,
    ) -> None:
        check_tiers(tiers)
        if not isinstance(layout, KVLayout):
            raise TypeError(f"layout must be a KVLayout, got {type(layout).__name__}")
        if not isinstance(fingerprint, str):
            raise TypeError(f"fingerprint must be a str, got {type(fingerprint).__name__}")
        if isinstance(max_pending_bytes, bool) or not isinstance(max_pending_bytes, int):
            raise TypeError(f"max_pending_bytes must be an int, got {max_pending_bytes!r}")
        if max_pending_bytes <= 0:
            raise ValueError(f"max_pending_bytes must be > 0, got {max_pending_bytes}")
        self.tiers = tuple(tiers)
        self.layout = layout
        self.tier_layout = _tier_layout(self.tiers, layout)
        self.fingerprint = fingerprint
        self.bytes_per_block = self.tier_layout.bytes_per_block  # a block as the tiers hold it
        # Framed values carry this string's digest; the key namespace is derived from it
        # (the tiers' format too: a tier of another format never sees these entries).
        self._frame_fp = f"pagedkv-tiers-v1|{self.tier_layout!r}|{fingerprint}"
        ns = hashlib.sha256(self._frame_fp.encode()).hexdigest()[:16]
        self.key_prefix = f"kv-{ns}-"
        self.levels: list[Level] = open_levels(tiers, self.bytes_per_block, self._frame_fp)
        self._swap = SwapArea(tiers[0].swap_budget if isinstance(tiers[0], CPUTier) else 0)
        self._writer = WriteBack(self._store_job, max_pending_bytes)
        self._xfer: Transfer | None = None
        self._written_through: OrderedDict[str, None] = OrderedDict()  # recent keys, LRU
        self._lookups = self._promoted = self._pending_hits = 0
        self._demoted = self._written_through_blocks = self._persisted = 0
        self._closed = False
        self._exit_hook = _ExitHook(weakref.WeakMethod(self._close_at_exit))
        atexit.register(self._exit_hook)
        # A chain collected unclosed (its writer idle) takes its hook along; not at exit,
        # where unregistering would cancel hooks that have yet to run.
        weakref.finalize(self, atexit.unregister, self._exit_hook).atexit = False

    def __repr__(self) -> str:
        return f"TieredStore({list(self.tiers)!r}, key_prefix={self.key_prefix!r})"

    @property
    def block_bytes(self) -> int:
        """Deprecated name of :attr:`bytes_per_block`."""
        return self.bytes_per_block

    # -- wiring -----------------------------------------------------------------------

    def attach(self, pool: KVPool) -> None:
        """Bind the pool whose blocks are demoted from and promoted into."""
        if not isinstance(pool, KVPool):
            raise TypeError(f"attach expects a KVPool, got {type(pool).__name__}")
        if pool.layout != self.layout:
            raise ValueError(f"pool layout {pool.layout} differs from the tiers' {self.layout}")
        self._xfer = Transfer(pool, tier_layout=self.tier_layout)

    def key(self, block_hash: bytes) -> str:
        """The store key of the block with chained hash ``block_hash``."""
        return self.key_prefix + block_hash.hex()

    def set_event_sink(self, sink: EventSink | None) -> None:
        """Report the levels' KV events to ``sink`` (called from the writer thread too:
        it must be thread-safe), or stop (``None``); see :mod:`pagedkv.tiers.events`."""
        bs = self.layout.block_size
        for lv in self.levels:
            lv.events = None if sink is None else TierEvents(sink, self.key_prefix, lv.name, bs)

    # -- demote / write-through ---------------------------------------------------------

    def demote(self, items: Sequence[tuple[int, bytes]]) -> None:
        """Write back blocks just evicted from the pool: ``(block_id, block_hash)`` pairs.

        Their bytes are copied out before this returns (on CUDA: enqueued on a copy
        stream that later work on the current stream waits for), so the caller may
        overwrite the blocks at once. Blocks the first tier already holds are only
        marked as recently used. Store failures are never raised.
        """
        first = self.levels[0]
        fresh: dict[str, int] = {}
        for block_id, block_hash in items:
            key = self.key(block_hash)
            if self._writer.find(key) is None:
                fresh[key] = block_id
        if fresh and first.in_process:  # an in-process check costs nothing
            held = first.contains(list(fresh))
            first.touch([k for k, h in zip(fresh, held) if h])
            fresh = {k: b for (k, b), h in zip(fresh.items(), held) if not h}
        if fresh:
            self._submit(list(fresh), list(fresh.values()), all_levels=False)
            self._demoted += len(fresh)

    def write_through(self, items: Sequence[tuple[int, bytes]]) -> None:
        """Write blocks that stay in the pool (e.g. hit more than once) to every tier now.
        Same copy-out guarantee as :meth:`demote`; tiers that already hold a block skip
        it, and one written through recently is not even copied again (a hot prefix)."""
        seen = self._written_through
        fresh = {}
        for block_id, block_hash in items:
            key = self.key(block_hash)
            if key in seen:
                seen.move_to_end(key)
            elif self._writer.find(key) is None:
                fresh[key] = block_id
        if fresh:
            self._submit(list(fresh), list(fresh.values()), all_levels=True)
            self._written_through_blocks += len(fresh)
            seen.update(dict.fromkeys(fresh))
            while len(seen) > WRITTEN_THROUGH_MEMORY:
                seen.popitem(last=False)

    def flush(self) -> None:
        """Wait until every demoted block has been stored (tests, benchmarks, shutdown)."""
        self._writer.flush()

    def persist(self, items: Sequence[tuple[int, bytes]]) -> Persisted:
        """Write pool blocks ``(block_id, block_hash)`` (least recently used first) and
        everything the in-process tiers hold to the first persistent tier, for a warm
        restart (:mod:`pagedkv.tiers.persist`: what, in which order, crash safety).

        Pending write-backs are stored first. ``ValueError`` (nothing written) when no
        tier is persistent or the chain is closed; store failures cost entries, never
        an exception."""
        if self._closed:
            raise ValueError("TieredStore is closed: persist before close()")
        check_persistent(self.levels)
        self.flush()
        done = persist_blocks(
            self.levels, [(self.key(h), b) for b, h in items], key_prefix=self.key_prefix,
            gather=self._transfer.gather_ready, put=self._put,
        )  # fmt: skip
        self._persisted += done.stored
        return done

    def _submit(self, keys: list[str], block_ids: list[int], *, all_levels: bool) -> None:
        rows, event = self._transfer.gather_encoded(block_ids)
        self._writer.submit(Job(keys, rows, event, all_levels))

    def _store_job(self, job: Job) -> None:
        """Background thread: store a job into the first tier, or every tier."""
        rows = job.ready()
        for i in range(len(self.levels) if job.all_levels else 1):
            self._put(i, job.keys, rows)

    def _put(self, i: int, keys: list[str], rows: torch.Tensor) -> None:
        """Store into level ``i``; with a level below, first spill the blocks the store
        would evict for them to level ``i + 1``, then delete them."""
        level = self.levels[i]
        if not level.backoff.ready() or not keys:
            return
        missing = [j for j, held in enumerate(level.contains(keys)) if not held]
        if len(missing) < len(keys):
            keys, rows = [keys[j] for j in missing], rows[missing]
        below = i + 1 < len(self.levels)
        cap = level.capacity_blocks
        if below and cap is not None:
            if len(keys) > cap:  # more than the level holds: the oldest go straight down
                level.spilled += len(keys) - cap
                self._put(i + 1, keys[:-cap], rows[:-cap])
                keys, rows = keys[-cap:], rows[-cap:]
            victims = level.victims(keys)
            # entries of another cache sharing the store (another prefix) are evicted,
            # not spilled: they would not verify under this chain's fingerprint
            ours = [v for v in victims if v.startswith(self.key_prefix)]
            if ours:
                out = torch.empty((len(ours), self.bytes_per_block), dtype=torch.uint8)
                got = [j for j, ok in enumerate(level.load(ours, out)) if ok]
                level.spilled += len(got)
                self._put(i + 1, [ours[j] for j in got], out[got])
            level.delete(victims)
        if keys:
            level.put(keys, rows, pause=self._writer.yield_to_readers)

    # -- promote ------------------------------------------------------------------------

    def promote(self, hashes: Sequence[bytes], block_ids: Sequence[int]) -> int:
        """Load the longest leading run of ``hashes`` held below the pool into ``block_ids``.

        ``block_ids[i]`` receives the block of ``hashes[i]``; both have the same length.
        Returns how many blocks were loaded (a prefix of the list, in one
        ``write_blocks``). Entries that fail verification count as misses and are
        deleted; unreachable tiers count as misses.
        """
        n = len(hashes)
        if len(block_ids) != n:
            raise ValueError(f"promote: {n} hashes but {len(block_ids)} block ids")
        xfer = self._transfer
        self._lookups += n
        if n == 0:
            return 0
        with self._writer.reading():  # write-back waits: this is on the critical path
            return self._promote(hashes, block_ids, xfer)

    def _promote(self, hashes: Sequence[bytes], block_ids: Sequence[int], xfer: Transfer) -> int:
        n = len(hashes)
        keys = [self.key(h) for h in hashes]
        # where each block is: staged in the write-back queue, or held by a level
        staged: dict[int, Staged] = {}
        level_of: list[int | None] = [None] * n
        for j, key in enumerate(keys):
            hit = self._writer.find(key)
            if hit is not None:
                staged[j] = hit
        for li, level in enumerate(self.levels):
            ask = [j for j in range(n) if j not in staged and level_of[j] is None]
            if not ask:
                break
            for j, held in zip(ask, level.contains([keys[j] for j in ask])):
                if held:
                    level_of[j] = li
        run = next((j for j in range(n) if j not in staged and level_of[j] is None), n)
        if run == 0:
            return 0
        rows = xfer.tier_rows(run)
        ok = [False] * run
        for j, hit in staged.items():
            if j < run:
                rows[j].copy_(hit.job.ready()[hit.row])
                ok[j] = True
        for li, level in enumerate(self.levels):
            idx = [j for j in range(run) if level_of[j] == li]
            if not idx:
                continue
            if idx[-1] - idx[0] + 1 == len(idx):  # contiguous rows: load in place
                found = level.load([keys[j] for j in idx], rows[idx[0] : idx[-1] + 1])
            else:
                tmp = torch.empty((len(idx), self.bytes_per_block), dtype=torch.uint8)
                found = level.load([keys[j] for j in idx], tmp)
                rows[idx] = tmp
            for j, f in zip(idx, found):
                ok[j] = f
        loaded = next((j for j, f in enumerate(ok) if not f), run)
        for j in range(loaded):
            held_by = level_of[j]
            if held_by is None:  # staged: counted as the first tier's, where it is going
                self._pending_hits += 1
                self.levels[0].hits += 1
            else:
                self.levels[held_by].hits += 1
        if loaded:
            xfer.scatter_decoded(block_ids[:loaded], rows[:loaded])
            self._promoted += loaded
        return loaded

    # -- swap ---------------------------------------------------------------------------

    def close(self) -> None:
        """Store the pending write-backs, drop swapped data and close every tier.

        Idempotent. Forgetting it is safe: the chain is then closed at exit.
        """
        self._close(at_exit=False)

    def _close_at_exit(self) -> None:
        self._close(at_exit=True)

    def _close(self, *, at_exit: bool) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._exit_hook)
        pending = len(self._writer)
        lost = self._writer.close(timeout=AT_EXIT_FLUSH_SECONDS if at_exit else None)
        self._swap.clear()
        if not self._writer.running:  # a writer stuck past the timeout still uses them
            for level in self.levels:
                level.close()
        if lost:
            log.warning(
                "pagedkv: %d demoted KV blocks could not be stored in the tiers%s; they will "
                "be recomputed when needed (call KVCache.close() to flush them in time)",
                lost, " before exit" if at_exit else "",
            )  # fmt: skip
        elif at_exit and pending:
            log.info("pagedkv: stored %d pending demoted KV blocks at exit", pending)
