"""Back-off for a tier that fails (:class:`pagedkv.stores.health.Backoff`), logging on
``pagedkv.tiers``: the tier is treated as missing until its retry time."""

from __future__ import annotations

import logging

from pagedkv.stores.health import Backoff as _Backoff

log = logging.getLogger("pagedkv.tiers")


class Backoff(_Backoff):
    """:class:`pagedkv.stores.health.Backoff` of one tier, logging on ``pagedkv.tiers``."""

    default_logger = log
