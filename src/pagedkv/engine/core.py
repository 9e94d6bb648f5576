"""EngineCore: the serving loop behind :class:`~pagedkv.Engine` (queue, step, finish).

The core holds the requests of one engine from the moment they are queued until their
output is taken: it gives them ids, runs steps (the scheduler picks the chunks, the
model runner computes them, the scheduler records the tokens), keeps the finished
requests submitted with ``retain=True`` in the cache until they are released, and
counts what :class:`EngineStats` reports. It checks no user input: the
:class:`~pagedkv.Engine` in front of it (``engine.py``) turns arguments into
requests (``submit.py``) and loads snapshots (``sessions.py``) before handing them
over.

Overlap (``overlap=True``): step n+1 is scheduled and launched while step n still runs
on the device, and step n's sampled tokens are read after that (one copy per step, the
only wait). A request that step n finished (EOS, a stop token) was then already given
a row in step n+1: that row's token is never emitted, and its KV write lands in a slot
the request owns but no longer counts. A step that would have to preempt first takes
step n's results (:meth:`EngineCore.drain`), then schedules as without overlap.
Requests finished by a step are returned by the ``step()`` call that reads its results.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from pagedkv.cache import KVCache
from pagedkv.engine.chunks import Chunk
from pagedkv.engine.model_runner import EngineWarmup, ModelRunner, SampledTokens
from pagedkv.engine.request import Request, RequestOutput, Status
from pagedkv.engine.scheduler import Scheduler
from pagedkv.engine.stats import EngineStats, StepLatencies

logger = logging.getLogger("pagedkv.engine")


class EngineCore:
    """Requests of one engine, and the step loop that serves them.

    ``requests``: queued, running, or finished and not yet taken (:meth:`take`), by
    id. ``retained``: finished requests submitted with ``retain=True`` whose sequence
    is still in the cache (until :meth:`release`). ``tokenizer`` decodes outputs
    (``None``: outputs have no text).
    """

    def __init__(
        self,
        cache: KVCache,
        scheduler: Scheduler,
        runner: ModelRunner,
        tokenizer: Any,
        overlap: bool | None = False,
    ) -> None:
        self.cache, self.scheduler, self.runner = cache, scheduler, runner
        self.tokenizer = tokenizer
        #: pipelined steps (see the module doc); None: on for CUDA, off elsewhere
        self.overlap = cache.pool.kv.device.type == "cuda" if overlap is None else overlap
        self.requests: dict[int, Request] = {}
        self.retained: dict[int, Request] = {}
        self._ids = itertools.count()
        self._num_requests = self._steps = 0
        self._step_seconds = 0.0
        self._step_observers: list[Callable[[StepLatencies], None]] = []
        self._inflight: tuple[list[Chunk], SampledTokens] | None = None  # launched, unread
        self._done: list[Request] = []  # finished, not yet returned by step()

    # ------------------------------------------------------------------ requests
    def new_id(self) -> int:
        """A request id never given before by this core."""
        return next(self._ids)

    def queue(self, reqs: list[Request]) -> None:
        """Give each request an id and queue it (at the back of its priority level)."""
        for req in reqs:
            req.request_id = next(self._ids)
            self.requests[req.request_id] = req
            self.scheduler.add(req)
        self._num_requests += len(reqs)

    def queue_resident(self, req: Request) -> None:
        """Queue a request that already has its id and the KV of its first
        ``num_computed`` tokens in the cache (resumed from a snapshot)."""
        self.requests[req.request_id] = req
        self._num_requests += 1
        self.scheduler.add_resident(req)

    def detach(self, request_id: int) -> Request:
        """Hand a queued or running request over to another engine: it leaves this core
        (finished here, ``finish_reason="migrated"``) without its sequence being freed;
        the caller moves or frees it."""
        req = self.requests.pop(request_id)
        self.scheduler.finish(req, keep=True)
        req.finish_reason = "migrated"
        return req

    def adopt(self, req: Request) -> None:
        """Serve a request taken over from another engine, under its (new) id from
        :meth:`new_id`, its KV (if any) already in this cache
        (:meth:`Scheduler.adopt <pagedkv.engine.scheduler.Scheduler.adopt>`)."""
        self.requests[req.request_id] = req
        self._num_requests += 1
        self.scheduler.adopt(req)

    def take(self, request_id: int) -> RequestOutput:
        """The output of a finished request, which the core then forgets."""
        return self.output(self.requests.pop(request_id))

    def abort(self, request_id: int) -> None:
        """Drop a request (its blocks are freed, retained or not); unknown ids are ignored."""
        req = self.requests.pop(request_id, None)
        if req is not None and req.status is not Status.FINISHED:
            self.scheduler.finish(req)
        if request_id in self.retained:
            self.release(self.retained[request_id])

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running (or finished, not yet returned)."""
        return self.scheduler.has_work() or bool(self._done)

    # ------------------------------------------------------------------ retained
    def retained_request(self, request: int | RequestOutput) -> Request:
        """The retained request behind an id or an output; ``KeyError`` if there is none."""
        rid = request.request_id if isinstance(request, RequestOutput) else request
        req = self.retained.get(rid)
        if req is None:
            raise KeyError(
                f"request {rid!r} is not retained: only a finished request submitted with "
                "retain=True (and not yet snapshotted or released) can be snapshotted; "
                f"retained now: {sorted(self.retained)[:8]}"
            )
        return req

    def release(self, req: Request) -> None:
        """Free a retained request's sequence."""
        del self.retained[req.request_id]
        self.cache.free(req.seq_id)
        req.num_allocated = 0

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """Run one batch; return the requests whose last token it read (with overlap,
        those the previous batch finished). KV event subscribers get the step's events as
        one batch."""
        if self.cache.manager.subscribers:
            with self.cache.manager.event_batch():
                return self._step()
        return self._step()

    def _step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        if self.overlap:
            self._step_overlapped()
        else:
            chunks = self._schedule()
            if chunks:
                sampled = self._launch(chunks)
                if sampled is not None:
                    self._resolve(chunks, sampled)
        done, self._done = self._done, []
        self._step_seconds += time.perf_counter() - t0
        return [self.output(req) for req in done]

    def _step_overlapped(self) -> None:
        prev, self._inflight = self._inflight, None
        chunks = self.scheduler.schedule(ahead=True) if prev is not None else None
        if not chunks:  # nothing to run without the previous step's results, or a preemption
            if prev is not None:
                self._resolve(*prev)
                prev = None
            chunks = self._schedule()
            if not chunks:
                return
        sampled = self._launch(chunks)
        if sampled is not None:
            self._inflight = (chunks, sampled)
        if prev is not None:
            self._resolve(*prev)

    def drain(self) -> None:
        """Wait for the step in flight (overlap) and record its results; the requests it
        finished are returned by the next :meth:`step`. Call before reading or moving a
        running request's state from outside the step loop."""
        prev, self._inflight = self._inflight, None
        if prev is not None:
            self._resolve(*prev)

    def warmup(self) -> EngineWarmup:
        """:meth:`drain`, then :meth:`ModelRunner.warmup` (kernels, forwards, graphs)."""
        self.drain()
        return self.runner.warmup()

    def _schedule(self) -> list[Chunk]:
        """The scheduler's chunks of a step that waits for no result (may preempt)."""
        scheduler = self.scheduler
        preempted = scheduler.counters.preemptions
        chunks = scheduler.schedule()
        assert chunks is not None
        if scheduler.counters.preemptions != preempted:
            logger.debug(
                "step %d: %d request(s) preempted (out of KV blocks, %s)",
                self._steps, scheduler.counters.preemptions - preempted, scheduler.preemption,
            )  # fmt: skip
        if not chunks and scheduler.starved:
            self._fail_starved()
        return chunks

    def _launch(self, chunks: list[Chunk]) -> SampledTokens | None:
        try:
            sampled = self.runner.launch(chunks)
        except Exception as exc:  # a failing batch fails its requests, not the engine
            self._fail(chunks, exc)
            return None
        self.scheduler.commit(chunks)
        self._steps += 1
        return sampled

    def _resolve(self, chunks: list[Chunk], sampled: SampledTokens) -> None:
        """Record a launched step's sampled tokens (waits for them)."""
        try:
            tokens = sampled.tolist()
        except Exception as exc:  # an error of the device work surfaces here
            self._fail([c for c in chunks if c.req.status is Status.RUNNING], exc)
            return
        now = time.perf_counter()
        # Latencies are computed only for subscribers, before update() stamps the tokens.
        event = self._latencies(chunks, now) if self._step_observers else None
        for req in self.scheduler.update(chunks, tokens, now):
            if req.retain:
                self.retained[req.request_id] = req
            self._done.append(req)
        if event is not None and tokens:
            self._notify(event)

    def _fail(self, chunks: list[Chunk], exc: Exception) -> None:
        logger.warning(
            "a batch of %d request(s) failed and they finished with an error: %s: %s",
            len(chunks), type(exc).__name__, exc, exc_info=logger.isEnabledFor(logging.DEBUG),
        )  # fmt: skip
        # Their blocks registered for this step are uncached, not freed (KV not written).
        self.scheduler.fail_batch(chunks, f"{type(exc).__name__}: {exc}")
        self._done += [c.req for c in chunks]

    # ------------------------------------------------------------------ step observers
    def on_step(self, callback: Callable[[StepLatencies], None]) -> Callable[[], None]:
        """Call ``callback(StepLatencies)`` after every step that generated tokens, on the
        stepping thread (one that raises is logged and dropped); returns a function that
        unsubscribes it (idempotent). :meth:`Engine.on_step` is the public form."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        observers = self._step_observers
        observers.append(callback)

        def unsubscribe() -> None:  # holds the list, not the core
            for i, cb in enumerate(observers):
                if cb is callback:
                    del observers[i]
                    return

        return unsubscribe

    @staticmethod
    def _latencies(chunks: list, now: float) -> StepLatencies:
        """The latencies of the tokens ``chunks`` sample at ``now`` (one per sampling
        chunk: a first token if its request has none yet)."""
        ttft, itl = [], []
        for c in chunks:
            if c.sample:
                req = c.req
                if req.output:
                    itl.append(now - req.last_token_time)
                else:
                    ttft.append(now - req.queued_time)
        return StepLatencies(now, tuple(ttft), tuple(itl))

    def _notify(self, event: StepLatencies) -> None:
        for cb in list(self._step_observers):
            try:
                cb(event)
            except Exception:
                logger.warning("an on_step callback raised; it was removed", exc_info=True)
                self._step_observers[:] = [c for c in self._step_observers if c is not cb]

    def _fail_starved(self) -> None:
        """Fail the head of the queue: nothing runs and the pool cannot admit it (only
        retained sequences can hold the blocks it needs, and no one else will free them)."""
        req = self.scheduler.waiting[0]
        cache = self.cache
        error = (
            f"out of KV blocks: the request needs more than the {cache.num_free_blocks} "
            "free blocks and nothing is running to free more"
        )
        if self.retained:
            held = sum(len(cache.block_table(r.seq_id)) for r in self.retained.values())
            error += (
                f"; {len(self.retained)} retained sequences hold {held} of "
                f"{cache.num_blocks} blocks: snapshot() or release() them"
            )
        logger.warning("request %d failed: %s", req.request_id, error)
        self.scheduler.fail(req, error)
        self._done.append(req)

    # ------------------------------------------------------------------ reporting
    def text(self, token_ids: list[int]) -> str | None:
        """The text of generated tokens (special tokens skipped), ``None`` without a
        tokenizer; what ``RequestOutput.text`` holds and streamed deltas add up to."""
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def output(self, req: Request) -> RequestOutput:
        """What ``req`` produced so far, as users see it."""
        return RequestOutput(
            req.request_id, list(req.prompt), list(req.output), self.text(req.output),
            max(req.num_cached_tokens, 0), req.finish_reason, req.error,
        )  # fmt: skip

    def stats(self) -> EngineStats:
        """Counters since the core was built (see :class:`EngineStats`)."""
        scheduler = self.scheduler
        c = scheduler.counters
        seconds, cache = self._step_seconds, self.cache
        return EngineStats(
            requests=self._num_requests, prompt_tokens=c.prompt_tokens,
            cached_tokens=c.cached_tokens,
            prefix_hit_rate=c.cached_tokens / c.prompt_tokens if c.prompt_tokens else 0.0,
            prefill_tokens=c.prefill_tokens, generated_tokens=c.generated_tokens,
            step_seconds=seconds, tokens_per_s=c.generated_tokens / seconds if seconds else 0.0,
            steps=self._steps, preemptions=c.preemptions,
            blocks_in_use=cache.num_blocks - cache.num_free_blocks, blocks_peak=c.peak_blocks,
            num_blocks=cache.num_blocks, block_size=cache.block_size,
            retained_seqs=len(self.retained), running_requests=len(self.scheduler.running),
            waiting_requests=len(self.scheduler.waiting),
            repeated_prompts=0 if scheduler.repeats is None else scheduler.repeats.stats().hits,
        )  # fmt: skip
