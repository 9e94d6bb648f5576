"""The queue of requests waiting for admission: highest priority first, FIFO within a level."""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator

from pagedkv.engine.request import Request


class WaitingQueue:
    """Waiting requests, one deque per priority level.

    ``append`` queues a request at the back of its level, ``appendleft`` at the front
    (a preempted request, or a resumed one that already holds its KV); ``popleft`` and
    ``[0]`` take the first request of the highest non-empty level. Iteration follows
    the same order. Every operation is O(1) but for the first request of a new level
    (O(levels)) and ``remove`` (O(requests of that level)). With every request at the
    default priority it is a single deque.
    """

    def __init__(self) -> None:
        self._levels: dict[int, deque[Request]] = {}
        self._order: list[int] = []  # negated priorities of the non-empty levels, ascending
        self._len = 0

    def _level(self, priority: int) -> deque[Request]:
        level = self._levels.get(priority)
        if level is None:
            level = self._levels[priority] = deque()
            bisect.insort(self._order, -priority)
        return level

    def _drop_if_empty(self, priority: int) -> None:
        if not self._levels[priority]:
            del self._levels[priority]
            self._order.remove(-priority)

    def append(self, req: Request) -> None:
        self._level(req.priority).append(req)
        self._len += 1

    def appendleft(self, req: Request) -> None:
        self._level(req.priority).appendleft(req)
        self._len += 1

    def popleft(self) -> Request:
        if not self._len:
            raise IndexError("popleft from an empty WaitingQueue")
        priority = -self._order[0]
        req = self._levels[priority].popleft()
        self._len -= 1
        self._drop_if_empty(priority)
        return req

    def remove(self, req: Request) -> None:
        """Take ``req`` out of the queue (``ValueError`` if it is not waiting)."""
        level = self._levels.get(req.priority)
        if level is None:
            raise ValueError(f"request {req.request_id} is not waiting")
        level.remove(req)
        self._len -= 1
        self._drop_if_empty(req.priority)

    def __getitem__(self, index: int) -> Request:
        if index == 0 and self._len:
            return self._levels[-self._order[0]][0]
        if not -self._len <= index < self._len:
            raise IndexError("WaitingQueue index out of range")
        return list(self)[index]

    def __contains__(self, req: object) -> bool:
        level = self._levels.get(getattr(req, "priority", None))  # type: ignore[arg-type]
        return level is not None and req in level

    def __iter__(self) -> Iterator[Request]:
        for p in self._order:
            yield from self._levels[-p]

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __repr__(self) -> str:
        return f"WaitingQueue({[r.request_id for r in self]})"
