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

A prompt whose KV is all cached and whose last logits are stored (a zero-compute repeat,
:mod:`~pagedkv.engine.repeats`) gets a chunk that computes nothing, last in the list.
"""

from __future__ import annotations

import time

from pagedkv.cache import KVCache
from pagedkv.engine.admission import allocate_first_chunk, discard_batch
from pagedkv.engine.chunks import Chunk, SchedulerCounters, StepPlan, plan_ahead, running_view
from pagedkv.engine.config import EngineConfig
from pagedkv.engine.preemption import check_victims
from pagedkv.engine.repeats import PromptRepeats
from pagedkv.engine.request import Request, Status
from pagedkv.engine.waiting import WaitingQueue
from pagedkv.errors import OutOfBlocks


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
        # (a quantized pool's partial block has per-block scales the stored tail lacks)
        on = config.repeat_cache_bytes and config.prefix_caching and not cache.layout.quantized
        self.repeats = PromptRepeats(cache, config.repeat_cache_bytes) if on else None
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
        #: the smallest window of a model whose every layer is windowed (None: keep every
        #: block): blocks no later query reads are released after each step
        self.window: int | None = None

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

    def adopt(self, req: Request) -> None:
        """Take over a request another engine served (a live migration): one holding the
        KV of its first ``req.num_allocated`` tokens in this cache runs from the next step
        if ``max_num_seqs`` allows (else it waits at the front of its level, KV resident);
        one without KV queues at the back of its level (at the front if it was preempted).
        Counted in no admission statistics: its engine counted it."""
        if req.num_allocated and len(self.running) < self.max_num_seqs:
            req.status = Status.RUNNING
            req.admitted = self._admissions
            self._admissions += 1
            self.running.append(req)
        else:
            req.status = Status.WAITING
            self.add(req, front=bool(req.num_allocated) or req.num_preemptions > 0)

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

    def commit(self, chunks: list[Chunk]) -> None:
        """The step of ``chunks`` was launched: their tokens count as computed (their KV is
        written before anything launched later reads it); a sampling chunk's request has
        a pending token until :meth:`update`."""
        prefill = 0
        for c in chunks:
            req = c.req
            out, pending = req.output, req.pending
            if not ((out or pending) and c.start == len(req.prompt) + len(out) + pending - 1):
                prefill += c.end - c.start  # not a decode row
            req.num_computed = c.end
            if c.sample:
                req.pending = pending + 1
        self.counters.prefill_tokens += prefill

    def update(self, chunks: list[Chunk], tokens: list[int], now: float) -> list[Request]:
        """Record a committed step's sampled ``tokens`` (one per sampling chunk, in order,
        read at ``now``: ``time.perf_counter()``):
        each is appended to its request, which may finish; returns those that finished (a
        retained one keeps its sequence). With overlap a request may be in the next step
        already (its input this token, on the device): the token enters the cache now.
        One that finished or was aborted meanwhile is skipped (never emitted)."""
        finished = []
        grown: list[int] = []  # requests whose token enters the cache now, and the tokens
        grown_tokens: list[int] = []
        it = iter(tokens)
        generated = 0
        running = Status.RUNNING
        for c in chunks:
            if not c.sample:
                continue
            token = next(it)
            req = c.req
            if req.status is not running or not req.pending:
                continue
            req.pending -= 1
            out = req.output
            out.append(token)
            req.last_token_time = now
            generated += 1
            # (req.stop_check's two tests, inline: this runs for every row of every step)
            if token in req.stop_ids or len(out) >= req.params.max_new_tokens:
                req.finish_reason = req.stop_check(token)
                self.finish(req, keep=req.retain)
                finished.append(req)
            elif req.pending:  # the next step computes its KV (it has the slot already)
                grown.append(req.seq_id)
                grown_tokens.append(token)
                req.num_allocated += 1
        if grown:  # one call for the step (finished requests' blocks were freed first)
            self.cache.append_each(grown, grown_tokens)
        self.counters.generated_tokens += generated
        if self.window is not None:
            self._release_outside_window(chunks)
        return finished

    def _release_outside_window(self, chunks: list[Chunk]) -> None:
        """Release the blocks before every layer's window of each request still running.

        A query at position p >= ``num_computed`` reads keys from ``p - window + 1`` on.
        Retained requests keep every block (a snapshot needs them all)."""
        w, cache = self.window, self.cache
        assert w is not None
        for c in chunks:
            req = c.req
            live = c.end >= w and req.status is Status.RUNNING and not req.retain
            if live and cache.release_before(req.seq_id, c.end - w + 1):
                self._tables.pop(req.seq_id, None)  # refreshed at the next read

    def fail(self, req: Request, error: str) -> None:
        """Finish ``req`` with ``finish_reason="error"`` and ``error`` (its blocks freed)."""
        req.finish_reason = "error"
        req.error = error
        self.finish(req)

    def fail_batch(self, chunks: list[Chunk], error: str) -> None:
        """Fail the requests of a step whose forward did not run through; their blocks
        registered for it are uncached (:func:`~pagedkv.engine.admission.discard_batch`)."""
        discard_batch(self.cache, chunks)
        for c in chunks:
            self.fail(c.req, error)

    # ------------------------------------------------------------------ scheduling
    def schedule(self, *, ahead: bool = False) -> list[Chunk] | None:
        """This step's chunks: the running requests' (preempting victims when blocks run
        out), then admissions. A :class:`~pagedkv.engine.preemption.PreemptionPolicyError`
        propagates before any block of the step is reserved.

        ``ahead``: the previous step still runs, its sampled tokens pending (overlap). A
        request decodes its pending token from the device when the token's slot is
        allocated; one needing a new block for it waits a step (the cache must know the
        token id first); one finishing by length on it is not scheduled. None, changing
        nothing, when the step would preempt (decided with the previous step's results).
        """
        if ahead:
            plan = plan_ahead(
                self.running, self.max_batch_tokens, self.block_size, self.cache.num_free_blocks
            )
            if plan is None:
                return None
            self.steps += 1
            self.preempted = []
            return self._finish_schedule(self._reserve_plan(plan), plan.budget)
        self.steps += 1
        self.preempted = []
        plan = StepPlan(self.max_batch_tokens)
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
        return self._finish_schedule(self._reserve_plan(plan), plan.budget)

    def _finish_schedule(self, chunks: list[Chunk], budget: int) -> list[Chunk]:
        if not self.preempted:  # admissions in what is left of the budget
            replays: list[Chunk] = []
            budget = self._admit(chunks, replays, budget)
            chunks += replays
        self.starved = not chunks and not self.preempted and bool(self.waiting)
        used = self.cache.num_blocks - self.cache.num_free_blocks
        self.counters.peak_blocks = max(self.counters.peak_blocks, used)
        now, step = time.monotonic(), self.steps
        for c in chunks:  # what a preemption policy reads of when it last ran
            req = c.req
            req.last_step = step
            req.last_time = now
        return chunks

    def _make_room(self, req: Request, need: int, plan: StepPlan) -> bool:
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
        held = self.cache.num_released if self.window is not None else None
        views = tuple(
            running_view(r, r is req, bs, held(r.seq_id) if held else 0) for r in self.running
        )
        chosen = self.policy.select_victims(views, short)
        return [self.running[i] for i in check_victims(self.policy, chosen, views, short)]

    def _reserve_plan(self, plan: StepPlan) -> list[Chunk]:
        chunks = []
        for c in plan.chunks:
            if c.from_device or self._reserve(c.req, c.end):
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
                    replay = allocate_first_chunk(self.cache, self.repeats, req, budget)
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

    def recompute_all(self) -> int:
        """Make every request holding KV compute it again from its first token (the
        weights changed): the running ones, then swapped-out or resumed ones waiting
        with their KV, go back to the front of the queue holding no blocks, in that
        order. Returns how many; they do not count as preemptions."""
        held = [r for r in self.waiting if r.status is Status.SWAPPED or r.num_allocated]
        for req in held:
            self.waiting.remove(req)
        restart, self.running = self.running + held, []
        for req in reversed(restart):
            if req.status is Status.SWAPPED or req.num_allocated:
                self.cache.free(req.seq_id)  # also discards a swapped-out copy
            req.num_computed = req.num_allocated = 0
            req.status = Status.WAITING
            self._tables.pop(req.seq_id, None)
            self.waiting.appendleft(req)
        return len(restart)

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
