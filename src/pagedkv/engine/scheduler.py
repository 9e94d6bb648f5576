"""Continuous batching over a KVCache: who runs this step, and on which tokens.

Every step the scheduler spends a token budget (``max_batch_tokens``): first on the
running requests in admission order (one token for a decoding request, the next chunk
for one still in prefill), then on waiting requests, highest priority first and FIFO
within a level (a prefix-cache lookup first, so cached blocks are reused and not
recomputed; a long prompt gets a chunk and continues next step). When a running
request needs more blocks than are free, the preemption policy
(:mod:`pagedkv.engine.preemption`; default: the most recently admitted request) picks
victims: their blocks are freed (``recompute``: their full blocks stay in the prefix
cache, so the recompute is mostly hits) or swapped out to the cache's tiers
(``swap``), and they go back to the front of their priority level in the queue.

The running requests' chunks are planned first, counting the blocks each will take,
and reserved only once the plan holds: a victim may be a request planned earlier in
the same step, and its reservation must not have happened yet (the blocks it would
have reserved are registered in the prefix cache, and their KV is written only by
the step's forward).

Blocks are reserved only for tokens computed in the same step: a full block becomes
findable by other requests only once the step that writes its KV runs, and all K/V of
a layer are written before that layer attends (write-then-attend), so a request
admitted in the same step may already share it.

A fresh prompt whose KV is all cached and whose last-position logits are stored
(:mod:`pagedkv.engine.repeats`) is admitted whole, on its cached blocks, with a chunk
that computes nothing (``start == end``) and carries the stored row; such chunks come
last in a step's list.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pagedkv.cache import KVCache
from pagedkv.engine.config import EngineConfig
from pagedkv.engine.preemption import RunningRequest, check_victims
from pagedkv.engine.repeats import PromptRepeats, Replay
from pagedkv.engine.request import Request, Status
from pagedkv.engine.waiting import WaitingQueue
from pagedkv.errors import OutOfBlocks


@dataclass(slots=True)
class Chunk:
    """Tokens ``all_tokens[start:end]`` of ``req`` are computed this step; ``sample``:
    the chunk ends the known tokens, so its last logits give the next token.
    ``replay``: the stored logits (and partial block) of a fully cached prompt, whose
    chunk computes nothing (``start == end == len(prompt)``)."""

    req: Request
    start: int
    end: int
    replay: Replay | None = None

    @property
    def sample(self) -> bool:
        return self.end == self.req.num_tokens


@dataclass
class SchedulerCounters:
    """Cumulative counts the engine reports in ``stats()``."""

    preemptions: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    peak_blocks: int = 0


@dataclass(slots=True)
class _Plan:
    """The running requests' chunks of one step, before their blocks are reserved."""

    budget: int
    chunks: list[Chunk] = field(default_factory=list)
    needs: list[int] = field(default_factory=list)  # new blocks each chunk will reserve
    pending: int = 0  # their sum

    def drop(self, req: Request) -> None:
        """Forget ``req``'s chunk if it has one (it is being preempted)."""
        for k, c in enumerate(self.chunks):
            if c.req is req:
                del self.chunks[k]
                self.pending -= self.needs.pop(k)
                self.budget += c.end - c.start
                return


class Scheduler:
    """Decides each step's chunks; owns the waiting queue and the running list.

    Reads ``max_batch_tokens``, ``max_num_seqs``, ``preemption``, the preemption
    ``policy`` and ``repeat_cache_bytes`` from ``config`` (validated there).
    ``preempted``: the requests the last :meth:`schedule` preempted, in order;
    ``repeats``: the stored prompts' logits (``None`` when disabled).
    """

    def __init__(self, cache: KVCache, config: EngineConfig) -> None:
        self.cache = cache
        self.block_size = cache.block_size
        self.max_batch_tokens = config.max_batch_tokens
        self.max_num_seqs = config.max_num_seqs
        self.preemption = config.preemption
        self.policy = config.policy
        self.repeats: PromptRepeats | None = None
        if config.repeat_cache_bytes and config.prefix_caching:
            self.repeats = PromptRepeats(cache, config.repeat_cache_bytes)
        self.waiting = WaitingQueue()
        self.running: list[Request] = []
        self.counters = SchedulerCounters()
        self.preempted: list[Request] = []
        #: the last schedule() ran nothing and admitted nothing although requests wait
        #: and none was preempted: only blocks held outside the queue can be the cause
        self.starved = False
        self.steps = 0  # schedule() calls: the clock of Request.last_step
        self._admissions = 0
        self._tables: dict[int, list[int]] = {}

    def add(self, req: Request, *, front: bool = False) -> None:
        """Queue ``req`` at the back of its priority level (``front``: at its front)."""
        if front:
            self.waiting.appendleft(req)
        else:
            self.waiting.append(req)

    def add_resident(self, req: Request) -> None:
        """Queue a request whose first ``req.num_computed`` tokens already have KV in the
        cache (one resumed from a snapshot) at the front of its level, so it uses its
        blocks rather than idling; its prompt and those tokens are counted as prompt
        and cached tokens now (admission counts only fresh requests)."""
        self.counters.prompt_tokens += len(req.prompt)
        self.counters.cached_tokens += req.num_computed
        self.waiting.appendleft(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def block_table(self, req: Request) -> list[int]:
        """The request's block table, refreshed only when its block count changed."""
        table = self._tables.get(req.seq_id)
        if table is None or len(table) * self.block_size < req.num_allocated:
            table = self._tables[req.seq_id] = self.cache.block_table(req.seq_id)
        return table

    def finish(self, req: Request, *, keep: bool = False) -> None:
        """Release a finished or aborted request's blocks; ``keep``: leave its sequence
        in the cache (a retained request; the engine frees it later)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if not keep and (req.status is Status.SWAPPED or req.num_allocated):
            self.cache.free(req.seq_id)  # also discards a swapped-out copy
            req.num_allocated = 0
        self._tables.pop(req.seq_id, None)
        req.status = Status.FINISHED

    def update(self, chunks: list[Chunk], tokens: list[int]) -> list[Request]:
        """Record a step's results: every chunk's tokens now have KV, and ``tokens`` (one
        per sampling chunk, in order) are appended to their requests. Returns the
        requests that finished (a retained one keeps its sequence in the cache)."""
        counters = self.counters
        finished = []
        it = iter(tokens)
        generated = 0
        for c in chunks:
            req, start, end = c.req, c.start, c.end
            output = req.output
            num_tokens = len(req.prompt) + len(output)
            if not (output and start == num_tokens - 1):
                counters.prefill_tokens += end - start
            req.num_computed = end
            if end != num_tokens:  # not c.sample
                continue
            token = next(it)
            output.append(token)
            generated += 1
            reason = req.stop_check(token)
            if reason is not None:
                req.finish_reason = reason
                self.finish(req, keep=req.retain)
                finished.append(req)
        counters.generated_tokens += generated
        return finished

    def fail(self, req: Request, error: str) -> None:
        """Finish ``req`` with ``finish_reason="error"`` and ``error`` (its blocks freed)."""
        req.finish_reason = "error"
        req.error = error
        self.finish(req)

    def fail_batch(self, chunks: list[Chunk], error: str) -> None:
        """Fail the requests of a step whose forward did not run through: their blocks
        are discarded, not freed, so none registered for this step (KV not written) stays
        findable; those written before the step stay cached. Last admitted first: a
        request may hold blocks registered this step by one admitted before it, which can
        only be unregistered once it let go of them."""
        for c in reversed(chunks):
            req = c.req
            if req.num_allocated and req.seq_id in self.cache:
                self.cache.discard(req.seq_id, written=c.start)
                req.num_allocated = 0
            req.finish_reason = "error"
            req.error = error
            self.finish(req)

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> list[Chunk]:
        """This step's chunks: the running requests' (preempting victims when blocks run
        out), then admissions. A :class:`~pagedkv.engine.preemption.PreemptionPolicyError`
        propagates before any block of the step is reserved."""
        self.steps += 1
        self.preempted = []
        plan = _Plan(self.max_batch_tokens)
        running, bs = self.running, self.block_size
        planned, needs = plan.chunks, plan.needs
        free = self.cache.num_free_blocks  # changes only when a victim is preempted
        # every running request before position len(planned) is planned: a request is
        # either planned or preempted (and then no longer running)
        while len(planned) < len(running) and plan.budget > 0:
            req = running[len(planned)]
            start = req.num_computed
            end = min(req.num_tokens, start + plan.budget)
            need = -(-end // bs) - -(-req.num_allocated // bs)
            if need > free - plan.pending:
                fits = self._make_room(req, need, plan)
                free = self.cache.num_free_blocks
                if not fits:
                    continue  # req itself was preempted
            planned.append(Chunk(req, start, end))
            needs.append(need)
            plan.pending += need
            plan.budget -= end - start
        chunks = self._reserve_plan(plan)
        budget = plan.budget
        if not self.preempted:
            replays: list[Chunk] = []
            budget = self._admit(chunks, replays, budget)
            chunks += replays
        self.starved = not chunks and not self.preempted and bool(self.waiting)
        used = self.cache.num_blocks - self.cache.num_free_blocks
        self.counters.peak_blocks = max(self.counters.peak_blocks, used)
        now, step = time.monotonic(), self.steps
        for c in chunks:
            c.req.record_access(step, now)
        return chunks

    def _make_room(self, req: Request, need: int, plan: _Plan) -> bool:
        """Preempt the policy's victims until ``need`` new blocks for ``req`` are free
        beside the plan's; False when ``req`` itself was preempted."""
        while True:
            short = need - (self.cache.num_free_blocks - plan.pending)
            if short <= 0:
                return True
            for victim in self._select_victims(req, short):
                plan.drop(victim)
                self._preempt(victim)
                if victim is req:
                    return False
                if need <= self.cache.num_free_blocks - plan.pending:
                    return True
            # the victims held enough blocks, but some are shared with requests still
            # running (a common prefix), so fewer were freed: ask again

    def _select_victims(self, req: Request, short: int) -> list[Request]:
        bs = self.block_size
        views = tuple(_view(r, r is req, bs) for r in self.running)
        chosen = self.policy.select_victims(views, short)
        return [self.running[i] for i in check_victims(self.policy, chosen, views, short)]

    def _reserve_plan(self, plan: _Plan) -> list[Chunk]:
        chunks = []
        for c in plan.chunks:
            if self._reserve(c.req, c.end):
                chunks.append(c)
            else:
                # Only a copy-on-write of a shared partial last block (which the engine
                # never creates) takes a block the plan did not count; the requests
                # already reserved must not be preempted (their new blocks are
                # registered, their KV not yet written), so this one gives way.
                self._preempt(c.req)
        return chunks

    def _admit(self, chunks: list[Chunk], replays: list[Chunk], budget: int) -> int:
        replay = None
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.status is Status.SWAPPED:
                if not self._swap_in(req):
                    break
            elif not req.num_allocated:  # (a resumed request's KV is already resident)
                try:
                    replay = self._allocate(req, budget)
                except OutOfBlocks:
                    break
                if req.num_cached_tokens < 0:  # first admission: the reported hit
                    req.num_cached_tokens = req.num_computed
                    self.counters.prompt_tokens += len(req.prompt)
                    self.counters.cached_tokens += req.num_computed
            self.waiting.popleft()
            req.status = Status.RUNNING
            req.admitted = self._admissions
            self._admissions += 1
            self.running.append(req)
            end = min(req.num_tokens, req.num_computed + budget)
            if not self._reserve(req, end):  # only after a swap-in at the pool's edge
                self._preempt(req)
                break
            if replay is not None:
                replays.append(Chunk(req, end, end, replay))
                replay = None
                continue
            chunks.append(Chunk(req, req.num_computed, end))
            budget -= end - req.num_computed
        return budget

    def _allocate(self, req: Request, budget: int) -> Replay | None:
        """Start ``req``'s sequence on its prefix hits, with blocks for its first chunk;
        a prompt stored whole (zero-compute repeat) gets them all and its replay is
        returned. :class:`OutOfBlocks` when the pool is full (nothing changed)."""
        tokens, salt, bs = req.all_tokens, req.cache_salt, self.block_size
        n = len(tokens)
        hit = self.cache.lookup(tokens, salt)
        # every block but the last (which lookup leaves out) matched: maybe stored
        if self.repeats is not None and not req.output and hit == (n - 1) // bs * bs:
            replay = self.repeats.find(tokens, salt)
            if replay is not None:
                cached = self.cache.allocate(req.seq_id, tokens, salt, whole=True)
                if cached == n - n % bs:  # the full blocks are hits, the rest is stored
                    req.num_computed = req.num_allocated = n
                    return replay
                # a block expired (TTL) between the two reads: compute it as usual
                self.cache.discard(req.seq_id)
                hit = self.cache.lookup(tokens, salt)
        end = min(n, hit + budget)
        req.num_computed = self.cache.allocate(req.seq_id, tokens[:end], salt)
        req.num_allocated = end
        return None

    def _reserve(self, req: Request, end: int) -> bool:
        """Make sure blocks hold tokens [0, end) of ``req``; False when out of blocks."""
        if end <= req.num_allocated:
            return True
        try:
            self.cache.append(req.seq_id, req.token_slice(req.num_allocated, end))
        except OutOfBlocks:
            return False
        req.num_allocated = end
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.counters.preemptions += 1
        self.preempted.append(req)
        req.num_preemptions += 1
        if self.preemption == "swap" and req.num_computed > 0 and self._swap_out(req):
            req.status = Status.SWAPPED
        else:
            self.cache.free(req.seq_id)
            req.num_computed = req.num_allocated = 0
            req.status = Status.WAITING
        self._tables.pop(req.seq_id, None)
        self.waiting.appendleft(req)

    def _swap_out(self, req: Request) -> bool:
        try:
            self.cache.swap_out(req.seq_id)
        except OutOfBlocks:  # the tier's swap space is full: recompute instead
            return False
        return True

    def _swap_in(self, req: Request) -> bool:
        try:
            self.cache.swap_in(req.seq_id)
        except OutOfBlocks:
            return False
        return True


def _view(r: Request, requesting: bool, block_size: int) -> RunningRequest:
    """What a preemption policy may read of running request ``r``."""
    return RunningRequest(
        r.request_id, r.priority, r.admitted, r.last_step, r.last_time,
        -(-r.num_allocated // block_size), r.num_computed, r.num_tokens, requesting,
    )  # fmt: skip
