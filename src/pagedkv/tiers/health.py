"""Back-off for a tier that fails (:class:`pagedkv.stores.health.Backoff`), logging on
``pagedkv.tiers``: the tier is treated as missing until its retry time."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pagedkv.stores.health import Backoff as _Backoff

log = logging.getLogger("pagedkv.tiers")


class Backoff(_Backoff):
    """:class:`pagedkv.stores.health.Backoff` of one tier, logging on ``pagedkv.tiers``."""

    def __init__(
        self,
        name: str,
        *,
        initial_seconds: float = 0.5,
        max_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            name, initial_seconds=initial_seconds, max_seconds=max_seconds, clock=clock, logger=log
        )
