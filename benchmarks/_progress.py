"""Progress bars for the benchmarks, advanced only between timed regions.

A bar is drawn only when stdout is a terminal and ``--quiet`` was not given. It has no
refresh thread (``auto_refresh=False``): it redraws when a step ends, so nothing runs
beside the code being timed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def add_quiet_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quiet", action="store_true", help="no progress bar")


class Steps:
    """A bar over a known number of steps: call :meth:`done` after each, outside timing."""

    def __init__(self, progress: Progress, total: int, label: str) -> None:
        self._progress = progress
        self._task = progress.add_task(label, total=total)

    def done(self, label: str | None = None, steps: int = 1) -> None:
        """Count ``steps`` finished; ``label`` names what runs next."""
        extra = {} if label is None else {"description": label}
        self._progress.update(self._task, advance=steps, refresh=True, **extra)


@contextmanager
def steps(total: int, label: str, *, quiet: bool = False) -> Iterator[Steps]:
    """A progress bar of ``total`` steps (a no-op when quiet or stdout is not a TTY)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    show = not quiet and sys.stdout.isatty()
    with Progress(*columns, auto_refresh=False, transient=True, disable=not show) as progress:
        yield Steps(progress, total, label)
