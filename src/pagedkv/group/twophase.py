"""A two-phase move of one sequence between KV caches while the source keeps appending.

A full block never changes once written (the only write to a shared block is a
copy-on-write into a *new* block, and only of a partial last block), so a live sequence's
full blocks can be copied while its owner keeps decoding into the last one. The move:

1. :meth:`TwoPhaseMove.begin` allocates the sequence on the target with the tokens it
   holds now (leading blocks the target already caches are reused, not copied) and takes
   the target's new blocks out of its prefix index at once
   (:meth:`~pagedkv.manager.BlockManager.unregister`): until their bytes arrive no other
   prompt may find them. Then it copies the full blocks — on an executor's thread when
   one is given (``background``), so the caller's step loop goes on meanwhile.
2. :meth:`TwoPhaseMove.finish`, the stop-and-copy, runs between the source's steps:
   it waits for phase 1, appends the tokens added since on the target, copies the block
   that was partial at ``begin`` and the new ones, indexes the target's blocks
   (:meth:`~pagedkv.manager.BlockManager.register`) and frees the source.
3. :meth:`TwoPhaseMove.abort` (also what any failure of ``finish`` does) waits for the
   background copy to stop writing, then discards the target's sequence; the source is
   untouched.

Streams. Phase 1 runs on side streams ordered after the work the caller's current
streams had queued at ``begin`` (the kernels that wrote the full blocks), and the worker
waits for them itself: neither cache's stream is made to wait for the bulk copy. The
source's blocks are freed only in ``finish``, after every copy that reads them has
completed, so the source's later kernels never overwrite a block still being read.
Phase 2 is synchronous and ordered before the target's later work.

The GIL: the worker's heavy parts release it (numpy copies between CPU pools, the CUDA
copies and stream waits), so a Python step loop on the calling thread keeps running.

Not thread-safe beyond that: ``begin``, ``finish`` and ``abort`` change both caches'
bookkeeping and must run where nothing else uses them (between steps).
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from concurrent.futures import Executor, Future
from concurrent.futures import wait as wait_all
from contextlib import ExitStack
from dataclasses import dataclass
from typing import NamedTuple

import torch

from pagedkv.cache import KVCache
from pagedkv.storage import KVPool, pool_copy
from pagedkv.storage.host_threads import HostThreads, default_threads


@dataclass(frozen=True)
class TwoPhaseResult:
    """What a :class:`TwoPhaseMove` copied.

    ``blocks_phase1``: the full blocks copied from :meth:`TwoPhaseMove.begin` on (in the
    background when it had an executor); ``blocks_phase2``: those of the stop-and-copy
    (the block partial at ``begin`` and the new ones); ``blocks_reused``: leading blocks
    the target already had. ``bytes_copied`` covers both phases; ``route``, ``peer``,
    ``staging`` as in :class:`~pagedkv.storage.pool_copy.BlockCopy`. ``pause_seconds`` is
    the stop-and-copy; ``seconds`` runs from ``begin`` to the end of ``finish``.
    """

    seq_id: Hashable
    target_id: Hashable
    num_tokens: int
    blocks_phase1: int
    blocks_phase2: int
    blocks_reused: int
    bytes_copied: int
    route: str
    peer: bool | None
    staging: str | None
    pause_seconds: float
    seconds: float


class CopyLane:
    """The copy settings and host threads of one thread that copies blocks between pools
    (:func:`pagedkv.storage.pool_copy.copy_blocks_between`): use one lane per thread."""

    def __init__(
        self, *, chunk_bytes: int = pool_copy.CHUNK_BYTES, staging: str = "auto",
        host_threads: int | None = None,
    ) -> None:  # fmt: skip
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        if staging not in pool_copy.STAGING:
            raise ValueError(f"staging must be one of {pool_copy.STAGING}, got {staging!r}")
        self.chunk_bytes, self.staging = chunk_bytes, staging
        self.threads = HostThreads(default_threads() if host_threads is None else host_threads)

    def copy(
        self, src: KVPool, src_ids: Sequence[int], dst: KVPool, dst_ids: Sequence[int]
    ) -> pool_copy.BlockCopy:
        return pool_copy.copy_blocks_between(
            src, src_ids, dst, dst_ids, chunk_bytes=self.chunk_bytes, staging=self.staging,
            host=self.threads,
        )  # fmt: skip

    def close(self) -> None:
        """Join the host threads (a later copy starts them again)."""
        self.threads.close()


def check_compatible(src: KVCache, dst: KVCache, what: str = "caches") -> None:
    """``ValueError`` unless KV can move between ``src`` and ``dst`` bit for bit: two
    distinct caches of one layout and one model fingerprint."""
    if src is dst:
        raise ValueError(f"source and target are the same {what}: move between two")
    if src.fingerprint != dst.fingerprint:
        raise ValueError(
            f"the {what} hold KV of different models or layouts: {src.model_fingerprint!r} "
            f"[{src.layout}] vs {dst.model_fingerprint!r} [{dst.layout}]; KV moves only between "
            "caches of the same model, dtype and block size"
        )


class _Begun(NamedTuple):
    """What :meth:`TwoPhaseMove.begin` hands the move it started."""

    src: KVCache
    dst: KVCache
    seq_id: Hashable
    target_id: Hashable
    tokens: list[int]
    reused: int
    t0: float
    lane: CopyLane
    own_lane: bool
    copied: pool_copy.BlockCopy | None
    future: Future | None


class TwoPhaseMove:
    """One sequence on its way from ``src`` to ``dst`` (see the module doc); build it with
    :meth:`begin`. ``state``: ``"copying"``, ``"copied"`` (phase 1 done), ``"finished"``
    or ``"aborted"``."""

    src: KVCache
    dst: KVCache
    seq_id: Hashable
    target_id: Hashable
    state: str
    _tokens: list[int]
    _reused: int
    _t0: float
    _lane: CopyLane
    _own_lane: bool
    _copied: pool_copy.BlockCopy | None
    _future: Future | None
    _error: BaseException | None

    def __init__(self, begun: _Begun | None = None) -> None:
        if not isinstance(begun, _Begun):
            raise TypeError("start a move with TwoPhaseMove.begin(src, seq_id, dst, ...)")
        self.src, self.dst, self.seq_id, self.target_id = begun[:4]
        self._tokens, self._reused, self._t0 = begun.tokens, begun.reused, begun.t0
        self._lane, self._own_lane = begun.lane, begun.own_lane
        self._copied, self._future, self._error = begun.copied, begun.future, None
        self.state = "copying" if begun.future is not None else "copied"

    @classmethod
    def begin(
        cls,
        src: KVCache,
        seq_id: Hashable,
        dst: KVCache,
        target_id: Hashable | None = None,
        *,
        executor: Executor | None = None,
        lane: CopyLane | None = None,
    ) -> TwoPhaseMove:
        """Allocate live sequence ``seq_id`` of ``src`` on ``dst`` as ``target_id``
        (default: the same id) and start copying its full blocks: on ``executor`` (its
        thread uses ``lane``) or, without one, here before returning.

        Raises ``ValueError`` for incompatible caches (:func:`check_compatible`) or a
        ``target_id`` live or swapped out in ``dst``, ``KeyError`` unless ``seq_id`` is
        live in ``src``, :class:`~pagedkv.errors.OutOfBlocks` when ``dst`` has no room;
        nothing changes then. ``lane`` defaults to one the move owns (closed when it ends).
        """
        t0 = time.perf_counter()
        check_compatible(src, dst)
        target_id = seq_id if target_id is None else target_id
        tokens = src.token_ids(seq_id)  # KeyError unless live
        if target_id in dst or target_id in dst.swapped_ids():
            raise ValueError(f"sequence {target_id!r} already exists in the target; use a new id")
        salt = src.salt(seq_id)
        lane_given = lane is not None
        lane = CopyLane() if lane is None else lane
        reused = dst.allocate(target_id, tokens, salt) // dst.block_size
        try:
            dst.manager.unregister(target_id)  # same thread, no step in between: never found
            full = len(tokens) // dst.block_size
            s_ids = src.block_table(seq_id)[reused:full]
            d_ids = dst.block_table(target_id)[reused:full]
            job = (lane, src.pool, s_ids, dst.pool, d_ids, _current_streams(src.device, dst.device))
            copied = _copy_phase1(*job) if executor is None else None
            future = None if executor is None else executor.submit(_copy_phase1, *job)
        except BaseException:
            dst.discard(target_id)  # its KV never (fully) arrived
            if not lane_given:
                lane.close()
            raise
        own = not lane_given
        return cls(
            _Begun(src, dst, seq_id, target_id, tokens, reused, t0, lane, own, copied, future)
        )

    @property
    def num_tokens(self) -> int:
        """Tokens the target holds since :meth:`begin` (until :meth:`finish` adds more)."""
        return len(self._tokens)

    @property
    def blocks_reused(self) -> int:
        return self._reused

    def ready(self) -> bool:
        """Whether phase 1 is over (copied, failed or ended): :meth:`finish` will not wait
        for it."""
        return self._future is None or self._future.done()

    def wait(self) -> pool_copy.BlockCopy:
        """Block until phase 1 is over; return what it copied (its error, if it failed)."""
        if self._future is not None:
            try:
                self._copied = self._future.result()
            except Exception as exc:  # the copy's own error (an interrupt here propagates,
                self._error = exc  # and the future stays for abort() to wait on)
            self._future = None
        if self._error is not None:
            raise self._error
        if self._copied is None:
            raise RuntimeError(f"this move was {self.state} before its first phase ended")
        if self.state == "copying":
            self.state = "copied"
        return self._copied

    def finish(self) -> TwoPhaseResult:
        """The stop-and-copy (see the module doc); the source's sequence is freed and the
        target's is live, findable and bit-identical.

        The source must still hold the tokens it had at ``begin`` followed by any number
        of new ones (``ValueError`` otherwise), in the blocks it had then: a source that
        freed the sequence and allocated it again since must :meth:`abort` the move (the
        background copy may have read blocks reused meanwhile) and begin a new one.
        Any error (phase 1's, ``OutOfBlocks`` on the target, a copy, a state check)
        aborts the move first: the target forgets the sequence, the source keeps it.
        """
        if self.state not in ("copying", "copied"):
            raise RuntimeError(f"this move is {self.state}")
        t_stop = time.perf_counter()
        src, dst, bs = self.src, self.dst, self.dst.block_size
        try:
            first = self.wait()
            tokens = src.token_ids(self.seq_id)  # KeyError if the source dropped it
            n0 = len(self._tokens)
            if tokens[:n0] != self._tokens:
                raise ValueError(
                    f"sequence {self.seq_id!r} of the source no longer starts with the "
                    f"{n0} tokens it held when the move began"
                )
            if len(tokens) > n0:
                dst.append(self.target_id, tokens[n0:])
            lo = max(self._reused, n0 // bs)
            hi = -(-len(tokens) // bs)
            last = self._lane.copy(
                src.pool, src.block_table(self.seq_id)[lo:hi],
                dst.pool, dst.block_table(self.target_id)[lo:hi],
            )  # fmt: skip
        except BaseException:
            self.abort()
            raise
        dst.manager.register(self.target_id)
        src.free(self.seq_id)
        self.state = "finished"
        self._end()
        now = time.perf_counter()
        return TwoPhaseResult(
            self.seq_id, self.target_id, len(tokens), first.blocks, last.blocks, self._reused,
            first.bytes + last.bytes, last.route, last.peer, last.staging, now - t_stop,
            now - self._t0,
        )  # fmt: skip

    def abort(self) -> None:
        """Give up: wait until the background copy no longer writes the target (a queued
        one is cancelled), then discard the target's sequence. Idempotent."""
        if self.state in ("finished", "aborted"):
            return
        future, self._future = self._future, None
        if future is not None and not future.cancel():
            wait_all([future])  # it writes into the target's blocks: let it end (error or not)
        self.dst.discard(self.target_id)
        self.state = "aborted"
        self._end()

    def _end(self) -> None:
        if self._own_lane:
            self._lane.close()

    def __repr__(self) -> str:
        return (
            f"TwoPhaseMove({self.seq_id!r} -> {self.target_id!r}, {len(self._tokens)} tokens, "
            f"{self.state})"
        )


def _current_streams(*devices: torch.device) -> list:
    """The calling thread's current stream on each CUDA device among ``devices``."""
    cuda = {d for d in devices if d.type == "cuda"}
    return [torch.cuda.current_stream(d) for d in sorted(cuda, key=str)]


def _copy_phase1(
    lane: CopyLane, src: KVPool, s: list[int], dst: KVPool, d: list[int], streams: list
) -> pool_copy.BlockCopy:
    """The bulk copy, ordered after what ``streams`` (the caller's, at ``begin``) had
    queued: the copy's side streams start after them, on whatever thread runs this."""
    with ExitStack() as stack:
        for stream in streams:
            stack.enter_context(torch.cuda.stream(stream))
        return lane.copy(src, s, dst, d)
