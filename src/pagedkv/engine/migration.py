"""Live migration of requests between engines: move a running request's KV while its engine
keeps decoding it, then switch it over in a short stop-and-copy (Llumnix, OSDI 2024).

:meth:`Engine.migrate(request_id, other) <pagedkv.Engine.migrate>` is the entry point;
:class:`Migrator` moves many requests between one pair of engines over one copy thread.

How a running request moves from engine A to engine B:

1. ``start``: B allocates the request's sequence for the tokens that have KV now (blocks B
   already caches for that prefix are reused) and hides the new blocks from its prefix
   index; the full blocks are copied by the migrator's thread while both engines keep
   stepping (:class:`~pagedkv.group.twophase.TwoPhaseMove`: full blocks never change).
   A keeps decoding the request meanwhile.
2. ``finish`` (between steps; :meth:`Migration.ready` says when it will not wait): B
   appends the tokens A computed since, the block that was partial and the new ones are
   copied, the request's state is carried over — prompt, output so far, sampling
   params, the random generator's state (so seeded sampling continues its stream),
   stop criteria, streaming position, ``cache_salt``, priority, ``retain`` — and B
   serves it from its next step, under a new request id
   (:attr:`MigrationResult.target_request_id`). A frees its blocks.
3. Any failure before the switch (B out of blocks, a copy error) discards what B
   allocated: A still serves the request, unchanged.

A waiting request (queued, or preempted by recompute or swap) has no KV on the device to
copy: it is handed over and B computes its tokens. If A preempts a running request
during phase 1, ``finish`` copies every block again (or hands it over without KV if it
is still waiting). With the same model, dtype and block size on both engines and
batch-invariant kernels, the request's tokens are identical to never having moved
(greedy or seeded; a seeded request moving between a CPU and a CUDA engine restarts its
random stream from its seed, as generators of two device types cannot share a state).

Threads: the engines are not thread-safe. ``start``, ``finish`` and ``abort`` touch both
engines and must run where neither is stepping (one thread serving both, or holding
both engines' locks); only the bulk copy runs on the migrator's own thread, and it
reads A's full blocks and writes B's hidden ones, which no step touches. Its heavy
parts (numpy copies, CUDA copies and stream waits) release the GIL, and its CUDA work
runs on side streams neither engine waits for.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from pagedkv._closing import Closing
from pagedkv.engine.core import EngineCore
from pagedkv.engine.request import Request, Status
from pagedkv.engine.sampling import make_generator
from pagedkv.errors import EngineClosedError, MigrationError
from pagedkv.group.twophase import CopyLane, TwoPhaseMove, check_compatible
from pagedkv.storage import pool_copy

THREAD_NAME = "pagedkv-migrate"


@dataclass(frozen=True)
class MigrationResult:
    """One request moved to another engine (or parked in a store).

    ``request_id`` was its id on the source, ``target_request_id`` is its id on the target
    (``None`` when parked in a store: :meth:`Engine.resume_migrated` gives the new one).
    ``kv_moved``: its KV went along (``num_tokens`` tokens); ``False`` for a waiting
    request, which the target computes. ``blocks_background`` were copied while the
    source kept serving, ``blocks_final`` in the stop-and-copy, ``blocks_reused`` were
    already cached on the target; ``bytes_copied`` in all (pages written, for a store).
    ``route``: how the bytes went (:func:`pagedkv.storage.pool_copy.route`, ``"store"``,
    or ``None`` when no KV moved). ``pause_seconds``: how long the request was out of
    every batch (the stop-and-copy; all of the move when it was not in the background);
    ``seconds``: from the start of the move to the switch. ``snapshot``: the name it was
    parked under in a store (``None`` for a move between engines).
    """

    request_id: int
    target_request_id: int | None
    source: str
    target: str
    kv_moved: bool
    num_tokens: int
    blocks_background: int
    blocks_final: int
    blocks_reused: int
    bytes_copied: int
    route: str | None
    pause_seconds: float
    seconds: float
    snapshot: str | None = None


def has_kv(req: Request) -> bool:
    """Whether ``req`` holds KV in its engine's cache (running, or resident and waiting)."""
    return req.status is Status.RUNNING or (req.status is Status.WAITING and req.num_allocated > 0)


def check_between_steps(core: EngineCore, req: Request) -> None:
    """``MigrationError`` unless ``req``'s cache sequence holds exactly the tokens its KV
    was computed for and no sampled token of it is still on the device (no step of it is
    in flight: callers :meth:`~pagedkv.engine.core.EngineCore.drain` an overlapping core
    first)."""
    held = core.cache.num_tokens(req.seq_id)
    if held != req.num_computed or req.num_allocated != req.num_computed or req.pending:
        raise MigrationError(
            f"request {req.request_id} has a step in flight ({held} tokens reserved, "
            f"{req.num_computed} computed); migrate it between steps"
        )


def carried(req: Request, request_id: int, device: torch.device, kv: bool) -> Request:
    """The request as the target engine takes it over: the same state under a new id, its
    generator on the target's device (the same state when the device type is the same,
    else a new stream from its seed); without ``kv``, nothing computed yet."""
    gen = req.generator
    if gen is not None:
        if gen.device.type == device.type:
            state = gen.get_state()
            gen = torch.Generator(device=device)
            gen.set_state(state)
        else:
            gen = make_generator(req.params.seed, device)
    new = dataclasses.replace(
        req, request_id=request_id, generator=gen, output=list(req.output),
        status=Status.WAITING, admitted=-1, last_step=-1, last_time=0.0,
    )  # fmt: skip
    if not kv:
        new.num_computed = new.num_allocated = 0
    return new


def lookup(core: EngineCore, request_id: int) -> Request:
    """The queued or running request ``request_id`` of ``core`` (``KeyError``/``ValueError``
    saying why it cannot move)."""
    req = core.requests.get(request_id)
    if req is None and request_id in core.retained:
        req = core.retained[request_id]
    if req is None:
        raise KeyError(f"unknown request {request_id!r}: it was never queued here or was taken")
    if req.status is Status.FINISHED:
        raise ValueError(
            f"request {request_id} has finished ({req.finish_reason}); only waiting or "
            "running requests migrate (a retained one can be snapshot() and resumed)"
        )
    return req


class Migrator(Closing):
    """Moves requests from engine ``source`` to engine ``target`` (same model, dtype and
    block size; ``ValueError`` otherwise, or for one engine twice): :meth:`start` one in
    the background (its bulk copy on this migrator's thread, FIFO), :meth:`migrate` one
    at once. ``chunk_bytes``, ``staging`` and ``host_threads``: how blocks are copied
    (:class:`~pagedkv.group.twophase.CopyLane`; ``staging`` matters between a CPU and a
    CUDA engine). :meth:`close` (or ``with``) joins the thread after the copies queued.
    """

    def __init__(
        self, source: Any, target: Any, *, chunk_bytes: int = pool_copy.CHUNK_BYTES,
        staging: str = "auto", host_threads: int | None = None,
    ) -> None:  # fmt: skip
        for engine in (source, target):
            if not isinstance(getattr(engine, "core", None), EngineCore):
                raise TypeError(f"a Migrator moves requests between Engines, got {engine!r:.60}")
            if engine.closed:
                raise EngineClosedError("cannot migrate from or to a closed Engine")
        if source is target:
            raise ValueError("source and target are the same engine: migrate between two")
        check_compatible(source.cache, target.cache, "engines")
        self.source, self.target = source, target
        self._lanes = tuple(  # (copy thread, caller)
            CopyLane(chunk_bytes=chunk_bytes, staging=staging, host_threads=host_threads)
            for _ in range(2)
        )
        self._executor: ThreadPoolExecutor | None = None

    def start(self, request_id: int) -> Migration:
        """Begin moving ``request_id`` in the background; returns its :class:`Migration`.
        Raises (and changes nothing) ``KeyError`` for an unknown request, ``ValueError``
        for a finished one, :class:`~pagedkv.errors.OutOfBlocks` when the target has
        no room for its KV, ``MigrationError`` when a step of it is in flight."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=THREAD_NAME)
        return self._begin(request_id, background=True)

    def migrate(self, request_id: int) -> MigrationResult:
        """Move ``request_id`` now: every block is copied while the request waits (its
        pause is the whole copy); the errors of :meth:`start` and :meth:`Migration.finish`."""
        move = self._begin(request_id, background=False)
        return move.finish(paused_at=move.started)

    def _begin(self, request_id: int, *, background: bool) -> Migration:
        source, target = self.source, self.target
        for engine in (source, target):
            if engine.closed:
                raise EngineClosedError("cannot migrate from or to a closed Engine")
        t0 = time.perf_counter()
        # With overlap a step of the request may be in flight, its sampled token still on
        # the device: take its results first (the request may finish on them).
        source.core.drain()
        req = lookup(source.core, request_id)
        new_id = target.core.new_id()
        move = None
        if has_kv(req):
            check_between_steps(source.core, req)
            move = self.begin_move(req, new_id, background=background)
        return Migration(self, req, new_id, move, t0, background=background)

    def begin_move(self, req: Request, new_id: int, *, background: bool) -> TwoPhaseMove:
        """Start copying ``req``'s KV into the target's sequence ``new_id``: on this
        migrator's thread (``background``) or here."""
        lane = self._lanes[0] if background else self._lanes[1]
        return TwoPhaseMove.begin(
            self.source.cache, req.seq_id, self.target.cache, new_id,
            executor=self._executor if background else None, lane=lane,
        )  # fmt: skip

    def close(self) -> None:
        """Join the copy thread once the queued copies are done, and the host threads
        (idempotent; moves still in progress can still finish or abort)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        for lane in self._lanes:
            lane.close()


class Migration:
    """One request on its way between two engines (from :meth:`Migrator.start`, or
    :meth:`Engine.migrate(..., background=True) <pagedkv.Engine.migrate>`). Keep stepping
    the engines; :meth:`finish` switches it over (between steps), :meth:`abort` gives up:
    until one of them, the target holds the blocks it allocated for the request.
    ``state``: ``"copying"``, ``"finished"`` or ``"aborted"``."""

    def __init__(
        self, migrator: Migrator, req: Request, new_id: int, move: TwoPhaseMove | None,
        started: float, *, background: bool, owns_migrator: bool = False,
    ) -> None:  # fmt: skip
        self.migrator, self.request_id, self.started = migrator, req.request_id, started
        self.owns_migrator = owns_migrator  # close it when this migration ends
        self.state = "copying"
        self._req, self._new_id, self._move = req, new_id, move
        self._preemptions = req.num_preemptions
        self._background = background and move is not None  # its phase 1 overlaps serving

    def ready(self) -> bool:
        """Whether the background copy is over: :meth:`finish` then pauses the request only
        for the last blocks."""
        return self._move is None or self._move.ready()

    def finish(self, *, paused_at: float | None = None) -> MigrationResult:
        """Switch the request over: the stop-and-copy, then the target serves it from its
        next step (waits for the background copy first if it is not :meth:`ready`).

        Raises ``MigrationError`` if the request finished or was aborted on the source
        first (its output is there), and on any error (the target out of blocks, a copy
        that failed) leaves the source serving the request unchanged; the migration is
        aborted then. ``paused_at``: when the request stopped being served (default now),
        for the result's ``pause_seconds``.
        """
        if self.state != "copying":
            raise RuntimeError(f"this migration is {self.state}")
        t_stop = time.perf_counter() if paused_at is None else paused_at
        source, target = self.migrator.source, self.migrator.target
        if not source.closed:
            source.core.drain()  # overlap: the step in flight first (see Migrator._begin)
        req = source.core.requests.get(self.request_id)
        try:
            if source.closed or target.closed:
                raise EngineClosedError("an engine of this migration was closed before the switch")
            if req is not self._req or req.status is Status.FINISHED:
                why = "was aborted" if req is not self._req else f"finished ({req.finish_reason})"
                raise MigrationError(
                    f"request {self.request_id} {why} on the source before the switch"
                )
            kv = has_kv(req)
            if kv:
                check_between_steps(source.core, req)
            new = carried(req, self._new_id, target.device, kv)
            moved = None
            if req.num_preemptions != self._preemptions and self._move is not None:
                # its blocks were freed since start (and maybe reused while being read)
                self._move.abort()
                self._move = None
            if kv:
                if self._move is None:  # waiting at start, or preempted since: copy it all now
                    self._move = self.migrator.begin_move(req, self._new_id, background=False)
                    self._background = False
                moved = self._move.finish()
        except BaseException:
            self.abort()
            raise
        # The switch: plain bookkeeping from here on, nothing can fail.
        source.core.detach(req.request_id)
        if req.status is Status.SWAPPED:
            source.cache.free(req.seq_id)  # drops its swapped-out copy
        target.core.adopt(new)
        self.state = "finished"
        self._release()
        now = time.perf_counter()
        if moved is None:
            return MigrationResult(
                self.request_id, self._new_id, str(source.device), str(target.device), False,
                0, 0, 0, 0, 0, None, now - t_stop, now - self.started,
            )  # fmt: skip
        behind = moved.blocks_phase1 if self._background else 0
        return MigrationResult(
            self.request_id, self._new_id, str(source.device), str(target.device), True,
            moved.num_tokens, behind, moved.blocks_phase1 + moved.blocks_phase2 - behind,
            moved.blocks_reused, moved.bytes_copied, moved.route, now - t_stop,
            now - self.started,
        )  # fmt: skip

    def abort(self) -> None:
        """Give up (idempotent): the target forgets what it allocated, once the background
        copy no longer writes it; the source keeps serving the request."""
        if self.state != "copying":
            return
        if self._move is not None:
            self._move.abort()
        self.state = "aborted"
        self._release()

    def _release(self) -> None:
        if self.owns_migrator:
            self.migrator.close()

    def __repr__(self) -> str:
        return f"Migration(request {self.request_id} -> {self._new_id}, {self.state})"
