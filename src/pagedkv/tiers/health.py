"""Back-off for a tier that fails: treat it as missing for a while, then try again.

A remote tier (Redis) may be unreachable, slow or fail mid-run. The cache must keep
serving from the GPU and the other tiers, so a failing tier is skipped until its
retry time; each consecutive failure doubles the wait up to a ceiling. The first
failure of an outage and the recovery are logged once each on ``pagedkv.tiers``;
failures in between are logged at DEBUG so a long outage does not flood the log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("pagedkv.tiers")


class Backoff:
    """Health of one tier: ``ready()`` says whether to try it now.

    ``failure(exc)`` opens (or extends) an outage: the tier is skipped for
    ``initial_seconds``, then ``2 * initial_seconds`` ... up to ``max_seconds`` after
    each further failure. ``success()`` closes the outage. Thread-safe; ``clock`` is injectable
    for tests.
    """

    def __init__(
        self,
        name: str,
        *,
        initial_seconds: float = 0.5,
        max_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not initial_seconds > 0 or not max_seconds >= initial_seconds:
            raise ValueError(
                f"{name}: back-off needs 0 < initial_seconds <= max_seconds, got "
                f"{initial_seconds}, {max_seconds}"
            )
        self.name = name
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
                log.warning(
                    "tier %s failed (%s: %s); treating it as missing, retrying with back-off",
                    self.name,
                    type(exc).__name__,
                    exc,
                )
            else:
                log.debug("tier %s still failing (%s); next try in %.2fs", self.name, exc, delay)

    def success(self) -> None:
        """Record a successful operation; ends an open outage."""
        if self._failures:
            with self._lock:
                if self._failures:
                    log.warning("tier %s is back after %d failures", self.name, self._failures)
                    self._failures = 0
