"""Snapshots: save, fork and restore KV state, content-addressed, deduplicated, verified.

>>> store = SnapshotStore("/var/lib/pagedkv/snapshots")      # or "redis://host:6379/0"
>>> info = store.save(cache, [seq_id], name="chat-42", metadata={"user": "ada"})
>>> mapping = store.load(other_cache, "chat-42", {seq_id: new_seq_id})
>>> store.fork("chat-42", "chat-42-b"); store.verify("chat-42").ok; store.gc()

A cache takes part through the :class:`CachePager` protocol (``KVCache`` implements
it; :class:`pagedkv.testing.SyntheticPager` is an in-memory one for tests: importing it
from here still works but is deprecated).

Engine integration (``engine.snapshot`` / ``engine.resume``): save at a step boundary,
when every token the cache holds has its KV written, one sequence per conversation:
``store.save(engine.cache, [seq_id], name, metadata={"next_token": t, "sampling": {...},
"num_generated": n})`` where ``t`` is the sampled token not yet in the cache. To
resume, ``store.load(engine.cache, name, {seq_id: new_seq_id})`` re-creates the
sequence (sharing any prefix the cache already holds); the engine then schedules a
decode request for ``new_seq_id`` that feeds ``t`` first. Nothing about the engine
is stored except what the caller puts in ``metadata``.
"""

from __future__ import annotations

from pagedkv._lazy import lazy_getattr
from pagedkv.snapshot.manifest import Manifest
from pagedkv.snapshot.reports import (
    Catalogue,
    DamagedSnapshot,
    GcReport,
    LoadResult,
    SnapshotInfo,
    SnapshotStoreStats,
    VerifyReport,
)

# name -> module; loaded on first use (they import torch), so the CLI starts fast.
_LAZY = {
    "CachePager": "pagedkv.snapshot.pager",
    "SyntheticPager": "pagedkv.testing",  # deprecated here: a test double, in pagedkv.testing
    "SnapshotStore": "pagedkv.snapshot.store",
}


__getattr__ = lazy_getattr(globals(), _LAZY)


__all__ = [
    "CachePager",
    "Catalogue",
    "DamagedSnapshot",
    "GcReport",
    "LoadResult",
    "Manifest",
    "SnapshotInfo",
    "SnapshotStore",
    "SnapshotStoreStats",
    "SyntheticPager",
    "VerifyReport",
]
