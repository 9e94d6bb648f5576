"""Snapshots: save, fork and restore KV state, content-addressed, deduplicated, verified.

>>> store = SnapshotStore("/var/lib/pagedkv/snapshots")      # or "redis://host:6379/0"
>>> info = store.save(cache, [seq_id], name="chat-42", metadata={"user": "ada"})
>>> mapping = store.load(other_cache, "chat-42", {seq_id: new_seq_id})
>>> store.fork("chat-42", "chat-42-b"); store.verify("chat-42").ok; store.gc()

A cache takes part through the :class:`CachePager` protocol (``KVCache`` implements
it; :class:`SyntheticPager` is an in-memory one for tests).
"""

from pagedkv.snapshot.manifest import GcReport, Manifest, SnapshotInfo, VerifyReport
from pagedkv.snapshot.pager import CachePager, SyntheticPager
from pagedkv.snapshot.store import LoadResult, SnapshotStore

__all__ = [
    "CachePager",
    "GcReport",
    "LoadResult",
    "Manifest",
    "SnapshotInfo",
    "SnapshotStore",
    "SyntheticPager",
    "VerifyReport",
]
