"""Continuous batching over a KVCache: who runs this step, and on which tokens.

Every step the scheduler spends a token budget (``max_batch_tokens``): first on the
running requests in admission order (one token for a decoding request, the next chunk
for one still in prefill), then on waiting requests (a prefix-cache lookup first, so
cached blocks are reused and not recomputed; a long prompt gets a chunk and continues
next step). When a running request needs a block and none is free, the most recently
admitted request is preempted: its blocks are freed (``recompute``: its full blocks
stay in the prefix cache, so the recompute is mostly hits) or swapped out to the
cache's tiers (``swap``), and it goes back to the front of the queue.

Blocks are reserved only for tokens computed in the same step: a full block becomes
findable by other requests only once the step that writes its KV runs, and all K/V of
a layer are written before that layer attends (write-then-attend), so a request
admitted in the same step may already share it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pagedkv.engine.request import Request, Status
from pagedkv.errors import OutOfBlocks


@dataclass(slots=True)
class Chunk:
    """Tokens ``all_tokens[start:end]`` of ``req`` are computed this step; ``sample``:
    the chunk ends the known tokens, so its last logits give the next token."""

    req: Request
    start: int
    end: int

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
    peak_blocks: int = 0


class Scheduler:
    """Decides each step's chunks; owns the waiting queue and the running list."""

    def __init__(
        self, cache, *, max_batch_tokens: int, max_num_seqs: int, preemption: str = "recompute"
    ) -> None:
        if preemption not in ("recompute", "swap"):
            raise ValueError(f"preemption must be 'recompute' or 'swap', got {preemption!r}")
        self.cache = cache
        self.block_size = cache.block_size
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.preemption = preemption
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.counters = SchedulerCounters()
        #: the last schedule() ran nothing and admitted nothing although requests wait
        #: and none was preempted: only blocks held outside the queue can be the cause
        self.starved = False
        self._tables: dict[int, list[int]] = {}

    def add(self, req: Request) -> None:
        self.waiting.append(req)

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

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> list[Chunk]:
        budget = self.max_batch_tokens
        chunks: list[Chunk] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            end = min(req.num_tokens, req.num_computed + budget)
            while end > req.num_allocated and not self._reserve(req, end):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                chunks.append(Chunk(req, req.num_computed, end))
                budget -= end - req.num_computed
                i += 1
                continue
            break  # req itself was preempted: nothing behind it can run either
        if not preempted:
            budget = self._admit(chunks, budget)
        self.starved = not chunks and not preempted and bool(self.waiting)
        used = self.cache.num_blocks - self.cache.num_free_blocks
        self.counters.peak_blocks = max(self.counters.peak_blocks, used)
        return chunks

    def _admit(self, chunks: list[Chunk], budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.status is Status.SWAPPED:
                if not self._swap_in(req):
                    break
            elif not req.num_allocated:  # (a resumed request's KV is already resident)
                tokens = req.all_tokens
                hit = self.cache.manager.lookup(tokens, req.cache_salt)
                end = min(len(tokens), hit + budget)
                try:
                    hit = self.cache.allocate(req.seq_id, tokens[:end], req.cache_salt)
                except OutOfBlocks:
                    break
                req.num_computed, req.num_allocated = hit, end
                if req.num_cached_tokens < 0:  # first admission: the reported hit
                    req.num_cached_tokens = hit
                    self.counters.prompt_tokens += len(req.prompt)
                    self.counters.cached_tokens += hit
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            end = min(req.num_tokens, req.num_computed + budget)
            if not self._reserve(req, end):  # only after a swap-in at the pool's edge
                self._preempt(req)
                break
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
