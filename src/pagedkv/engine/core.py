"""EngineCore: the serving loop behind :class:`~pagedkv.Engine` (queue, step, finish).

The core holds the requests of one engine from the moment they are queued until their
output is taken: it gives them ids, runs steps (the scheduler picks the chunks, the
model runner computes them, the scheduler records the tokens), keeps the finished
requests submitted with ``retain=True`` in the cache until they are released, and
counts what :class:`EngineStats` reports. It checks no user input: the
:class:`~pagedkv.Engine` in front of it (``engine.py``) turns arguments into
requests (``submit.py``) and loads snapshots (``sessions.py``) before handing them
over.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

from pagedkv.cache import KVCache
from pagedkv.engine.model_runner import ModelRunner
from pagedkv.engine.request import Request, RequestOutput, Status
from pagedkv.engine.scheduler import Scheduler
from pagedkv.engine.stats import EngineStats

logger = logging.getLogger("pagedkv.engine")


class EngineCore:
    """Requests of one engine, and the step loop that serves them.

    ``requests``: queued, running, or finished and not yet taken (:meth:`take`), by
    id. ``retained``: finished requests submitted with ``retain=True`` whose sequence
    is still in the cache (until :meth:`release`). ``tokenizer`` decodes outputs
    (``None``: outputs have no text).
    """

    def __init__(
        self, cache: KVCache, scheduler: Scheduler, runner: ModelRunner, tokenizer: Any
    ) -> None:
        self.cache, self.scheduler, self.runner = cache, scheduler, runner
        self.tokenizer = tokenizer
        self.requests: dict[int, Request] = {}
        self.retained: dict[int, Request] = {}
        self._ids = itertools.count()
        self._num_requests = self._steps = 0
        self._step_seconds = 0.0

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
        """Whether any request is waiting or running."""
        return self.scheduler.has_work()

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
        """Run one batch; return the requests that finished in it."""
        t0 = time.perf_counter()
        scheduler = self.scheduler
        preempted = scheduler.counters.preemptions
        chunks = scheduler.schedule()
        if scheduler.counters.preemptions != preempted:
            logger.debug(
                "step %d: %d request(s) preempted (out of KV blocks, %s)",
                self._steps, scheduler.counters.preemptions - preempted, scheduler.preemption,
            )  # fmt: skip
        if not chunks:
            return self._fail_starved() if scheduler.starved else []
        try:
            tokens = self.runner.execute(chunks)
        except Exception as exc:  # a failing batch fails its requests, not the engine
            logger.warning(
                "a batch of %d request(s) failed and they finished with an error: %s: %s",
                len(chunks), type(exc).__name__, exc, exc_info=logger.isEnabledFor(logging.DEBUG),
            )  # fmt: skip
            scheduler.fail_batch(chunks, f"{type(exc).__name__}: {exc}")
            return [self.output(c.req) for c in chunks]
        finished = scheduler.update(chunks, tokens)
        for req in finished:
            if req.retain:
                self.retained[req.request_id] = req
        self._steps += 1
        self._step_seconds += time.perf_counter() - t0
        return [self.output(req) for req in finished]

    def _fail_starved(self) -> list[RequestOutput]:
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
        return [self.output(req)]

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
            retained_seqs=len(self.retained),
            repeated_prompts=0 if scheduler.repeats is None else scheduler.repeats.stats().hits,
        )  # fmt: skip
