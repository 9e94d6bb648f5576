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
        known = self.req.num_tokens
        self.sample = self.end == known + self.req.pending
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


def running_view(r: Request, requesting: bool, block_size: int) -> RunningRequest:
    """What a preemption policy may read of running request ``r``."""
    return RunningRequest(
        r.request_id, r.priority, r.admitted, r.last_step, r.last_time,
        -(-r.num_allocated // block_size), r.num_computed, r.num_tokens, requesting,
    )  # fmt: skip
