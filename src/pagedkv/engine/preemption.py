"""Preemption policies: which running requests give up their KV when blocks run out.

When a running request needs more KV blocks than are free, the scheduler asks the
engine's policy ``select_victims(running, blocks_needed)``: ``running`` holds a
read-only :class:`RunningRequest` view of every running request, in admission order
(the request that needs the blocks among them, ``requesting=True``), and
``blocks_needed`` is the shortfall (blocks it needs beyond those free). The policy
returns requests to preempt, in order; the scheduler preempts them one by one until
the request fits, and ignores the rest of the list (so a policy may simply return
every running request in its preference order, as the built-in ones do). Choosing the
requesting request itself is allowed: it stops being scheduled this step.

Built-in policies (ties between requests always go to the most recently admitted):

- ``"newest"`` (default): the most recently admitted request first.
- ``"oldest"``: the earliest admitted request first.
- ``"lru"``: the request scheduled the longest ago first (requests behind the
  ``max_batch_tokens`` budget that have waited steps for their turn go first).
- ``"fewest_blocks"``: the request holding the fewest KV blocks first (the least
  work to recompute per preemption; long contexts are kept).
- ``"priority"``: the lowest ``priority`` first, the newest within a level.

A policy is called only under pressure (never per token or per block), so the
built-ins simply sort the running requests.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Protocol

from pagedkv.errors import PagedKVError


class PreemptionPolicyError(PagedKVError, ValueError):
    """A preemption policy returned something the scheduler cannot act on (not a list
    of running requests, a request twice, or too few to free the blocks needed).

    Raised from :meth:`Engine.step` before any victim of that call is preempted and
    before the step reserves a block or runs the model: the requests stay queued and
    running as they were (requests preempted by an earlier, valid call of the same step
    stay preempted, waiting as after any preemption).
    """


@dataclass(frozen=True, slots=True)
class RunningRequest:
    """What a preemption policy sees of one running request (a read-only snapshot).

    ``admitted``: admission sequence number (a re-admission after a preemption gets a
    new one; larger = more recent). ``last_step`` / ``last_time``: the scheduler step
    (a counter of :meth:`Engine.step` calls) and ``time.monotonic()`` of the last step
    that scheduled it before this one. ``num_blocks``: KV blocks its sequence holds
    (prefix blocks shared with other requests included). ``num_computed``: tokens with
    KV; ``num_tokens``: prompt + generated tokens. ``requesting``: this is the request
    that needs the blocks.
    """

    request_id: int
    priority: int
    admitted: int
    last_step: int
    last_time: float
    num_blocks: int
    num_computed: int
    num_tokens: int
    requesting: bool


SelectVictims = Callable[[Sequence[RunningRequest], int], Sequence[RunningRequest]]


class PreemptionPolicy(Protocol):
    """Chooses which running requests to preempt when a request needs blocks."""

    name: str

    def select_victims(
        self, running: Sequence[RunningRequest], blocks_needed: int
    ) -> Sequence[RunningRequest]:
        """Requests of ``running`` to preempt, first victim first (see the module doc)."""


class _Builtin:
    name = ""

    def __repr__(self) -> str:
        return f"<preemption policy {self.name!r}>"


# ``running`` is in admission order; the sorting policies sort it reversed (the sort is
# stable), so among equal keys the most recently admitted request comes first.


class NewestPolicy(_Builtin):
    """The most recently admitted request first (the engine's original behaviour)."""

    name = "newest"

    def select_victims(self, running: Sequence[RunningRequest], blocks_needed: int) -> list:
        return list(reversed(running))


class OldestPolicy(_Builtin):
    """The earliest admitted request first."""

    name = "oldest"

    def select_victims(self, running: Sequence[RunningRequest], blocks_needed: int) -> list:
        return list(running)


class LeastRecentPolicy(_Builtin):
    """The request scheduled the longest ago first (LRU over steps)."""

    name = "lru"

    def select_victims(self, running: Sequence[RunningRequest], blocks_needed: int) -> list:
        return sorted(reversed(running), key=attrgetter("last_step"))


class FewestBlocksPolicy(_Builtin):
    """The request holding the fewest KV blocks first."""

    name = "fewest_blocks"

    def select_victims(self, running: Sequence[RunningRequest], blocks_needed: int) -> list:
        return sorted(reversed(running), key=attrgetter("num_blocks"))


class PriorityPolicy(_Builtin):
    """The lowest priority first, the most recently admitted within a level."""

    name = "priority"

    def select_victims(self, running: Sequence[RunningRequest], blocks_needed: int) -> list:
        return sorted(reversed(running), key=attrgetter("priority"))


class CallablePolicy:
    """A user function ``select_victims(running, blocks_needed)`` as a policy."""

    def __init__(self, fn: SelectVictims, name: str | None = None) -> None:
        self._fn = fn
        self.name = name or getattr(fn, "__qualname__", None) or repr(fn)

    def select_victims(
        self, running: Sequence[RunningRequest], blocks_needed: int
    ) -> Sequence[RunningRequest]:
        return self._fn(running, blocks_needed)

    def __repr__(self) -> str:
        return f"<preemption policy {self.name!r}>"


POLICIES: dict[str, type[PreemptionPolicy]] = {
    p.name: p
    for p in (NewestPolicy, OldestPolicy, LeastRecentPolicy, FewestBlocksPolicy, PriorityPolicy)
}

PolicySpec = str | SelectVictims | PreemptionPolicy


def make_preemption_policy(spec: PolicySpec) -> PreemptionPolicy:
    """The policy for ``spec``: a registered name (``"newest"``, ``"oldest"``, ``"lru"``,
    ``"fewest_blocks"``, ``"priority"``; any case), a function
    ``select_victims(running, blocks_needed)``, or an object with such a method (and
    optionally a str ``name`` for errors and logs).

    ``ValueError`` for an unknown name (listing the known ones), ``TypeError`` for
    anything else.
    """
    if isinstance(spec, str):
        try:
            return POLICIES[spec.lower()]()
        except KeyError:
            raise ValueError(
                f"preemption_policy={spec!r} is not a known policy; choose one of "
                f"{sorted(POLICIES)} or pass a function select_victims(running, blocks_needed)"
            ) from None
    method = getattr(spec, "select_victims", None)
    if callable(method):
        name = getattr(spec, "name", None)
        return CallablePolicy(method, name if isinstance(name, str) else type(spec).__name__)
    if callable(spec):
        return CallablePolicy(spec)
    raise TypeError(
        f"preemption_policy must be a policy name {sorted(POLICIES)}, a function "
        f"select_victims(running, blocks_needed) or an object with that method, got "
        f"{type(spec).__name__}"
    )


def check_victims(
    policy: PreemptionPolicy, result: object, running: Sequence[RunningRequest], blocks_needed: int
) -> list[int]:
    """Positions in ``running`` of the victims ``result`` names, in order, or a
    :class:`PreemptionPolicyError` saying what is wrong with it.

    ``result`` must be a list (or tuple) of the :class:`RunningRequest` objects the
    policy was given, each at most once, and either include the requesting request or
    hold at least ``blocks_needed`` blocks between them.
    """
    where = f"preemption policy {policy.name!r}"
    if isinstance(result, (str, bytes, Mapping)) or not isinstance(result, Iterable):
        raise PreemptionPolicyError(
            f"{where} returned {type(result).__name__}, not a list of the running requests "
            "it was given"
        )
    items = list(result)
    position = {id(r): i for i, r in enumerate(running)}
    out: list[int] = []
    seen: set[int] = set()
    for k, item in enumerate(items):
        if not isinstance(item, RunningRequest):
            raise PreemptionPolicyError(
                f"{where} returned {type(item).__name__} {reprlib.repr(item)} at position {k}, "
                "not a running request; return RunningRequest objects taken from `running` "
                "(not request ids or copies)"
            )
        i = position.get(id(item))
        if i is None:
            raise PreemptionPolicyError(
                f"{where} returned request {item.request_id} at position {k}, which is not "
                "one of the running requests it was given (return objects taken from `running`)"
            )
        if i in seen:
            raise PreemptionPolicyError(
                f"{where} returned request {item.request_id} twice (positions "
                f"{[j for j, r in enumerate(items) if r is item][:2]})"
            )
        seen.add(i)
        out.append(i)
    if not any(running[i].requesting for i in out):
        held = sum(running[i].num_blocks for i in out)
        if held < blocks_needed:
            req = next(r for r in running if r.requesting)
            raise PreemptionPolicyError(
                f"{where} returned too few requests: {[running[i].request_id for i in out]} "
                f"hold {held} KV blocks, but request {req.request_id} needs {blocks_needed} "
                "more than are free; return requests holding at least that many blocks, or "
                "include the requesting request (requesting=True) to stop scheduling it"
            )
    return out
