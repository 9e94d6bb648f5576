"""Requests, their sampling parameters and what the engine returns for them."""

from __future__ import annotations

import enum
import math
import numbers
import time
from collections.abc import Iterable
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

    Every field is checked when the params are built: a value of the wrong type
    (a ``bool`` where a number is expected included) raises ``TypeError``, one out of
    range (a NaN or infinite ``temperature`` included) ``ValueError``; both name the
    field and the values it accepts.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        n = _int_field("max_new_tokens", self.max_new_tokens, "a token count >= 1")
        if n < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {n}")
        t = _real_field("temperature", self.temperature, "a float >= 0 (0 = greedy)")
        if not (math.isfinite(t) and t >= 0.0):
            raise ValueError(f"temperature must be a finite float >= 0 (0 = greedy), got {t}")
        k = _int_field("top_k", self.top_k, "an int >= 0 (0 = off)")
        if k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {k}")
        p = _real_field("top_p", self.top_p, "a float in (0, 1] (1 = off)")
        if not 0.0 < p <= 1.0:  # also False for NaN
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p}")
        seed = self.seed
        if seed is not None:
            seed = _int_field("seed", seed, "None or an int in [0, 2**64)")
            if not 0 <= seed < 2**64:
                raise ValueError(f"seed must be None or an int in [0, 2**64), got {seed}")
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        for name, value in (
            ("max_new_tokens", n), ("temperature", t), ("top_k", k), ("top_p", p), ("seed", seed),
            ("stop_token_ids", _stop_ids(self.stop_token_ids)),
        ):  # fmt: skip
            object.__setattr__(self, name, value)  # normalised: plain int / float / tuple

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (temperature 0)."""
        return self.temperature == 0.0


def _int_field(name: str, value: object, accepted: str) -> int:
    # numbers.Integral takes numpy integers too; bool is an Integral but never a count
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {accepted}, got {type(value).__name__} {value!r}")
    return int(value)


def _real_field(name: str, value: object, accepted: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {accepted}, got {type(value).__name__} {value!r}")
    return float(value)


def _stop_ids(value: object) -> tuple[int, ...]:
    accepted = "a list or tuple of token ids (ints >= 0), e.g. stop_token_ids=[2]"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        raise TypeError(f"stop_token_ids must be {accepted}; got the single int {value!r}")
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"stop_token_ids must be {accepted}, got {type(value).__name__}")
    ids = tuple(value)
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(
                f"stop_token_ids[{i}] must be an int token id, got {type(t).__name__} {t!r}"
            )
        if t < 0:
            raise ValueError(f"stop_token_ids[{i}] must be a token id >= 0, got {t}")
    return tuple(int(t) for t in ids)


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
    #: sampled tokens not yet in ``output``: a launched step's result still on the device
    #: (0 or 1; with overlap its KV may already be computed by the next step)
    pending: int = 0
    num_cached_tokens: int = -1
    finish_reason: str | None = None
    error: str | None = None
    num_preemptions: int = 0
    streamed: int = 0
    #: keep the sequence in the cache when the request finishes (Engine.snapshot)
    retain: bool = False
    #: prefix-cache namespace: only requests with an equal salt share KV blocks
    cache_salt: str | bytes | int | None = None
    #: higher is more important: admitted first, and the "priority" preemption policy
    #: preempts it last
    priority: int = 0
    #: admission sequence number (renewed at every admission, re-admissions included)
    admitted: int = -1
    #: the scheduler step, and time.monotonic(), that last scheduled it
    last_step: int = -1
    last_time: float = 0.0
    #: time.perf_counter() at submission and at its latest generated token (latencies)
    queued_time: float = field(default_factory=time.perf_counter)
    last_token_time: float = 0.0
    #: the ids that stop it (its stop tokens, and EOS unless ignored); fixed at creation
    #: (params and eos ids never change), so the per-token check is one set lookup
    stop_ids: frozenset[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        stops = frozenset(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            stops |= self.eos_token_ids
        self.stop_ids = stops

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
        if token in self.stop_ids:
            return "stop"
        if len(self.output) >= self.params.max_new_tokens:
            return "length"
        return None
