"""What the engine reports about itself: :class:`EngineStats`, :class:`StepLatencies`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    """Counters since the engine was built (named, as :meth:`Engine.stats` returns them).

    ``prefix_hit_rate`` = ``cached_tokens / prompt_tokens`` (prompt tokens served from
    the prefix cache at admission, or restored from a snapshot); ``prefill_tokens``
    counts tokens computed for prompts (recomputes after preemption included);
    ``tokens_per_s`` = generated tokens / seconds spent in :meth:`Engine.step`;
    ``retained_seqs``: finished requests kept in the cache (``retain=True``) until
    snapshotted or released (their blocks count in ``blocks_in_use``);
    ``running_requests`` / ``waiting_requests``: being served now / queued (preempted
    ones included); ``repeated_prompts``: prompts answered from stored last-position
    logits, with no forward (zero-compute repeats, ``repeat_cache_bytes``; their tokens
    all count as cached).
    """

    requests: int
    prompt_tokens: int
    cached_tokens: int
    prefix_hit_rate: float
    prefill_tokens: int
    generated_tokens: int
    step_seconds: float
    tokens_per_s: float
    steps: int
    preemptions: int
    blocks_in_use: int
    blocks_peak: int
    num_blocks: int
    block_size: int
    retained_seqs: int = 0
    repeated_prompts: int = 0
    running_requests: int = 0
    waiting_requests: int = 0


@dataclass(frozen=True)
class StepLatencies:
    """What one :meth:`Engine.step` generated, for :meth:`Engine.on_step` subscribers.

    ``time``: ``time.perf_counter()`` when its tokens were sampled; ``time_to_first_token``:
    seconds from submission to the first token, one per request whose first token came
    in this step; ``inter_token``: seconds since the request's previous token, one per
    other token of this step (a preemption's wait included).
    """

    time: float
    time_to_first_token: tuple[float, ...]
    inter_token: tuple[float, ...]
