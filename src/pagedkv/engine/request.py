"""Requests, their sampling parameters and what the engine returns for them."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to generate for one request.

    ``temperature == 0`` is greedy decoding (``top_k``/``top_p`` are then ignored);
    ``top_k == 0`` and ``top_p == 1.0`` disable those filters. ``seed`` makes sampling
    reproducible per request whatever else shares its batch (``None``: random).
    Generation stops at ``max_new_tokens``, at EOS (unless ``ignore_eos``) or at any of
    ``stop_token_ids`` (the stop token is kept in the output).

    Raises ``ValueError`` for out-of-range values.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (temperature 0)."""
        return self.temperature == 0.0


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """What a finished (or streamed) request produced.

    ``token_ids``: generated tokens (prompt excluded); ``text``: their decoding when the
    engine has a tokenizer (else ``None``); ``num_cached_tokens``: prompt tokens served
    from the prefix cache at first admission; ``finish_reason``: ``"stop"`` (EOS or a
    stop token), ``"length"`` (max_new_tokens) or ``"error"`` (then ``error`` says why;
    only for requests that failed while running — bad input raises at submission).
    """

    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    num_cached_tokens: int
    finish_reason: str | None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StreamDelta:
    """Incremental output of :meth:`Engine.stream`: tokens new since the last delta."""

    request_id: int
    token_ids: list[int]
    text: str | None
    finish_reason: str | None


@dataclass(eq=False)
class Request:
    """Engine-side state of one request (not part of the public API)."""

    request_id: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    eos_token_ids: frozenset[int]
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    #: tokens whose KV is in the cache (prompt + output[:-1] once decoding)
    num_computed: int = 0
    #: tokens allocated in the block manager for this sequence
    num_allocated: int = 0
    num_cached_tokens: int = -1
    finish_reason: str | None = None
    error: str | None = None
    num_preemptions: int = 0
    streamed: int = 0
    #: keep the sequence in the cache when the request finishes (Engine.snapshot)
    retain: bool = False

    @property
    def seq_id(self) -> int:
        return self.request_id

    @property
    def all_tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def token_slice(self, start: int, end: int) -> list[int]:
        """``all_tokens[start:end]`` without concatenating the whole sequence."""
        p = len(self.prompt)
        if end <= p:
            return self.prompt[start:end]
        if start >= p:
            return self.output[start - p : end - p]
        return self.prompt[start:] + self.output[: end - p]

    def stop_check(self, token: int) -> str | None:
        """Finish reason after appending ``token`` (already appended), or None."""
        if token in self.params.stop_token_ids:
            return "stop"
        if not self.params.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if len(self.output) >= self.params.max_new_tokens:
            return "length"
        return None


def validate_prompt(prompt: Sequence[int], vocab_size: int) -> list[int]:
    """A prompt as a list of ints; ``ValueError`` if empty or outside [0, vocab_size)."""
    ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("empty prompt: a request needs at least one prompt token")
    bad = [t for t in ids if t < 0 or t >= vocab_size]
    if bad:
        raise ValueError(
            f"prompt has {len(bad)} token id(s) outside the vocabulary [0, {vocab_size}), "
            f"e.g. {bad[:3]}"
        )
    return ids
