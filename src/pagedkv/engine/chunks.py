"""The scheduler's records: a step's chunk of one request, the step plan of the running
requests before their blocks are reserved, the cumulative counters, and what a
preemption policy reads of a running request."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedkv.engine.preemption import RunningRequest
from pagedkv.engine.repeats import Replay
from pagedkv.engine.request import Request


@dataclass(slots=True)
class Chunk:
    """Tokens ``all_tokens[start:end]`` of ``req`` are computed this step; ``sample``:
    the chunk ends the request's tokens, so its last logits give the next token.
    ``from_device``: its (one) token is the request's pending sample, not yet known on
    the host: the runner takes it from the previous step's sampled ids on the device.
    Both are fixed when the chunk is made. ``replay``: the stored logits (and partial
    block) of a fully cached prompt (a zero-compute repeat), whose chunk computes
    nothing (``start == end == len(prompt)``).
    """

    req: Request
    start: int
    end: int
    replay: Replay | None = None
    sample: bool = field(init=False)
    from_device: bool = field(init=False)

    def __post_init__(self) -> None:
        req = self.req
        known = len(req.prompt) + len(req.output)  # req.num_tokens, without the property
        self.sample = self.end == known + req.pending
        self.from_device = self.end > known


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
class StepPlan:
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


def running_view(r: Request, requesting: bool, block_size: int, released: int) -> RunningRequest:
    """What a preemption policy may read of running request ``r`` (``released``: its
    blocks released outside the window, not held)."""
    return RunningRequest(
        r.request_id, r.priority, r.admitted, r.last_step, r.last_time,
        -(-r.num_allocated // block_size) - released, r.num_computed, r.num_tokens, requesting,
    )  # fmt: skip


def plan_ahead(running: list[Request], budget: int, block_size: int, free: int) -> StepPlan | None:
    """The running requests' chunks while the previous step runs (overlap; see
    :meth:`Scheduler.schedule <pagedkv.engine.scheduler.Scheduler.schedule>`), within
    ``budget`` tokens and ``free`` blocks; None when a chunk would need a preemption."""
    plan = StepPlan(budget)
    bs = block_size
    chunks, needs = plan.chunks, plan.needs
    for req in running:
        if plan.budget <= 0:
            break
        if req.pending:
            n_out = len(req.output)
            m = len(req.prompt) + n_out  # the pending token's position; its KV is computed now
            if n_out + req.pending >= req.params.max_new_tokens:
                continue  # it finishes on that token
            if m >= -(-req.num_allocated // bs) * bs:
                continue  # a new block: next step, once the cache knows the token
            chunks.append(Chunk(req, m, m + 1))  # no new block, one token
            needs.append(0)
            plan.budget -= 1
            continue
        start = req.num_computed
        end = min(req.num_tokens, start + plan.budget)
        need = -(-end // bs) - -(-req.num_allocated // bs)
        if need > free - plan.pending:
            return None
        chunks.append(Chunk(req, start, end))
        needs.append(need)
        plan.pending += need
        plan.budget -= end - start
    return plan
