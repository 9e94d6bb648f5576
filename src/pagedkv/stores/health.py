"""Back-off for something remote that fails: treat it as missing for a while, then retry.

A remote tier (Redis) may be unreachable, slow or fail mid-run, and so may one master
of a Redis Cluster. The cache must keep serving from the GPU and the other tiers, so a
failing tier (or master) is skipped until its retry time; each consecutive failure
doubles the wait up to a ceiling. The first failure of an outage and the recovery are
logged once each (on the logger given: ``pagedkv.tiers`` for a tier,
``pagedkv.stores`` for a cluster master); failures in between are logged at DEBUG so
a long outage does not flood the log. Used by :mod:`pagedkv.tiers` (one per tier) and
:class:`~pagedkv.stores.RedisClusterStore` (one per master).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import ClassVar

log = logging.getLogger("pagedkv.stores")


class Backoff:
    """Health of one tier (or cluster master): ``ready()`` says whether to try it now.

    ``failure(exc)`` opens (or extends) an outage: the tier is skipped for
    ``initial_seconds``, then ``2 * initial_seconds`` ... up to ``max_seconds`` after
    each further failure. ``success()`` closes the outage. ``what`` names the kind of
    thing in log lines (``"tier redis(...) failed"``), ``logger`` where they go.
    Thread-safe; ``clock`` is injectable for tests.
    """

    #: where log lines go when no ``logger`` is given (a subclass names its package's)
    default_logger: ClassVar[logging.Logger] = log

    def __init__(
        self,
        name: str,
        *,
        initial_seconds: float = 0.5,
        max_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        what: str = "tier",
        logger: logging.Logger | None = None,
    ) -> None:
        if not initial_seconds > 0 or not max_seconds >= initial_seconds:
            raise ValueError(
                f"{name}: back-off needs 0 < initial_seconds <= max_seconds, got "
                f"{initial_seconds}, {max_seconds}"
            )
        self.name = name
        self._what = what
        self._log = self.default_logger if logger is None else logger
        self._initial = initial_seconds
        self._max = max_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0  # consecutive failures of the current outage
        self._retry_at = 0.0
        self.outages = 0  # outages seen since start
        self.errors = 0  # failed operations since start

    @property
    def down(self) -> bool:
        """Whether an outage is open (the last attempt failed)."""
        return self._failures > 0

    def ready(self) -> bool:
        """True when the tier may be tried now (healthy, or its retry time has come)."""
        return self._failures == 0 or self._clock() >= self._retry_at

    def failure(self, exc: BaseException) -> None:
        """Record a failed operation and schedule the next attempt."""
        with self._lock:
            self.errors += 1
            self._failures += 1
            delay = min(self._max, self._initial * 2 ** (self._failures - 1))
            self._retry_at = self._clock() + delay
            if self._failures == 1:
                self.outages += 1
                self._log.warning(
                    "%s %s failed (%s: %s); treating it as missing, retrying with back-off",
                    self._what,
                    self.name,
                    type(exc).__name__,
                    exc,
                )
            else:
                self._log.debug(
                    "%s %s still failing (%s); next try in %.2fs", self._what, self.name, exc, delay
                )

    def success(self) -> None:
        """Record a successful operation; ends an open outage."""
        if self._failures:
            with self._lock:
                if self._failures:
                    self._log.warning(
                        "%s %s is back after %d failures", self._what, self.name, self._failures
                    )
                    self._failures = 0
