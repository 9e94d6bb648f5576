"""Worker threads of the stores: file and socket I/O and digests release the GIL, so a
store spreads a batch over a few threads. Two shapes, shared by DiskStore, PackStore
and FramedStore."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

A = TypeVar("A")
T = TypeVar("T")


def spawn(
    pool: ThreadPoolExecutor, fn: Callable[[A], T], args: Iterable[A]
) -> list[Callable[[], T]]:
    """Start ``fn(a)`` for each of ``args`` on ``pool``; return result getters (each
    returns the result or raises what ``fn`` raised).

    Once the interpreter is exiting, executors refuse work: ``fn`` then runs here, so
    work still done at exit (a cache's pending write-backs) is not lost.
    """
    getters: list[Callable[[], T]] = []
    for a in args:
        try:
            getters.append(pool.submit(fn, a).result)
        except RuntimeError:  # "cannot schedule new futures after (interpreter) shutdown"
            getters.append(_run_now(fn, a))
    return getters


def _run_now(fn: Callable[[A], T], a: A) -> Callable[[], T]:
    """``fn(a)`` run at once, as a result getter (raising what ``fn`` raised)."""
    try:
        value = fn(a)
    except Exception as e:
        error = e

        def fail() -> T:
            raise error

        return fail
    return lambda: value


def in_order(
    pool: ThreadPoolExecutor,
    window: int,
    items: Sequence[A],
    produce: Callable[[A], T],
    finish: Callable[[A, T], None],
    discard: Callable[[T], None],
) -> None:
    """``finish(item, produce(item))`` for every item in order, ``produce`` running on
    ``pool`` at most ``window`` items ahead of ``finish`` (which runs here).

    On an error the products still in flight are passed to ``discard`` (those whose
    ``produce`` failed cleaned up after themselves) and the first error is raised.
    """
    running: deque[tuple[A, Future[T]]] = deque()
    try:
        for item in items:
            running.append((item, pool.submit(produce, item)))
            if len(running) >= window:
                first, fut = running.popleft()
                finish(first, fut.result())
        while running:
            first, fut = running.popleft()
            finish(first, fut.result())
    except BaseException:
        for _, fut in running:
            try:
                product = fut.result()
            except BaseException:  # noqa: S112 - its own producer cleaned up
                continue
            discard(product)
        raise
