"""KV events: which blocks became findable by a prefix hit, and which stopped being.

Subscribe with ``cache.subscribe(callback)`` (or :meth:`BlockManager.subscribe
<pagedkv.manager.BlockManager.subscribe>`); it returns a function that unsubscribes.
The callback gets, once per operation batch (an allocate, an append, a discard, a
reset, ...; a batch without events is not delivered), the list of events it caused, in
order. The schema is vLLM's (``vllm/distributed/kv_events.py``), so consumers written
for it (llm-d, Dynamo) map field by field; ``medium`` is ``"device"`` (vLLM's
``"GPU"``) for the cache's own pool and a tier's name (``"cpu"``, ``"disk"``,
``"redis"``) for blocks held below it.

What the device reports:

- :class:`BlockStored`: full blocks were *registered*, i.e. a later prompt with the same
  tokens (and salt, and model fingerprint) finds them. That happens in ``allocate`` (the
  prompt's full blocks past its prefix hit, including those then loaded from the tiers)
  and in ``append`` (blocks that became full). A block whose content another block
  already holds is not registered (that one stays the one found), so a prompt's stored
  blocks can come as several events, each naming its chain's parent.
- :class:`BlockRemoved`: registered blocks were *unregistered*, so no prompt finds them
  on the device any more: evicted (handed out again), expired (TTL), or discarded
  (their KV was never written).
- :class:`AllBlocksCleared`: nothing stored before is findable any more: the prefix
  cache was reset, or the model fingerprint changed (``set_model_fingerprint``). Blocks
  of the old fingerprint that are evicted later are still reported removed; consumers
  treat a hash they do not know as a no-op, as vLLM's do.

Events carry block hashes (chained, salted: two tenants' equal prompts have different
hashes) and token ids. It is an operator-side feed: a subscriber sees the token ids of
every tenant's prompts. Subscribers are called on the thread that runs the cache
operation, after the operation completed; one that raises is logged on
``pagedkv.events`` and dropped, and the cache carries on.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO

from pagedkv._closing import Closing

log = logging.getLogger("pagedkv.events")

#: ``medium`` of the cache's own pool (vLLM: ``"GPU"``); tiers use their names.
DEVICE = "device"


@dataclass(frozen=True)
class BlockStored:
    """Full blocks that became findable, in chain order.

    ``block_hashes``: their chained hashes (each folds in its parent, the salt and the
    model fingerprint); ``parent_block_hash``: the hash of the block before the first
    (``None``: the first starts a prompt); ``token_ids``: their tokens, concatenated
    (``block_size`` per block; empty where the medium does not know them, as for tier
    entries); ``lora_id``: vLLM's field, always ``None`` here (adapters are part of the
    model fingerprint).
    """

    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]
    block_size: int
    medium: str = DEVICE
    lora_id: int | None = None


@dataclass(frozen=True)
class BlockRemoved:
    """Blocks no longer findable in ``medium``."""

    block_hashes: list[bytes]
    medium: str = DEVICE


@dataclass(frozen=True)
class AllBlocksCleared:
    """Nothing ``medium`` held before is findable any more."""

    medium: str = DEVICE


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
Subscriber = Callable[[list[KVEvent]], None]


class EventHub:
    """The subscribers of one cache and the batch of events being built.

    The manager appends to :attr:`pending` while an operation runs and calls
    :meth:`end` when it returns; a batch is delivered when the outermost operation
    (``depth`` counts the open ones) ends. Other threads (tier write-back) hand events
    over with :meth:`publish`: they go out with the next batch delivered on the cache's
    thread.
    """

    __slots__ = ("subscribers", "pending", "depth", "_foreign")

    def __init__(self) -> None:
        self.subscribers: list[Subscriber] = []
        self.pending: list[KVEvent] = []
        self.depth = 0
        self._foreign: deque[KVEvent] = deque()  # appends and pops are thread-safe

    def publish(self, events: Iterable[KVEvent]) -> None:
        """Queue events from another thread for the next batch (thread-safe)."""
        self._foreign.extend(events)

    def end(self) -> None:
        """An operation finished: deliver its batch unless an enclosing one is open."""
        if not self.depth and (self.pending or self._foreign):
            self.deliver()

    def deliver(self) -> None:
        """Send what is pending to every subscriber now (nothing if nothing is): the
        operations' own events, then those other threads handed over, in their order (a
        tier's write lands on its thread after, or while, the eviction that caused it)."""
        batch = self.pending
        self.pending = []
        foreign = self._foreign
        while foreign:
            batch.append(foreign.popleft())
        if not batch:
            return
        for callback in list(self.subscribers):  # a callback may (un)subscribe
            try:
                callback(list(batch))  # each gets its own list: one may not edit another's
            except Exception:
                log.exception("KV event subscriber %r raised; it is unsubscribed", callback)
                self.remove(callback)

    def remove(self, callback: Subscriber) -> None:
        """Drop one subscription of ``callback`` (nothing if it has none)."""
        for i, cb in enumerate(self.subscribers):
            if cb is callback:
                del self.subscribers[i]
                return


def event_dict(event: KVEvent) -> dict:
    """``event`` as a JSON-ready dict: ``{"type": "BlockStored", ...}``, hashes in hex."""
    if isinstance(event, BlockStored):
        parent = event.parent_block_hash
        return {
            "type": "BlockStored",
            "block_hashes": [h.hex() for h in event.block_hashes],
            "parent_block_hash": None if parent is None else parent.hex(),
            "token_ids": list(event.token_ids),
            "block_size": event.block_size,
            "lora_id": event.lora_id,
            "medium": event.medium,
        }
    if isinstance(event, BlockRemoved):
        return {
            "type": "BlockRemoved",
            "block_hashes": [h.hex() for h in event.block_hashes],
            "medium": event.medium,
        }
    if isinstance(event, AllBlocksCleared):
        return {"type": "AllBlocksCleared", "medium": event.medium}
    raise TypeError(f"not a KV event: {type(event).__name__}")


class JsonlWriter(Closing):
    """A ready subscriber: one JSON line per batch, ``{"ts": <unix time>, "events": [...]}``
    (see :func:`event_dict`; hashes in hex), flushed per batch.

    ``path`` must not exist unless ``append=True`` (then lines are added to it): the
    writer never overwrites a file. Use it as ``unsubscribe = cache.subscribe(writer)``
    and ``close()`` it (or use it as a context manager) when done; a closed writer
    raises, so the cache drops it.
    """

    def __init__(self, path: str | os.PathLike[str], *, append: bool = False) -> None:
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise TypeError(f"JsonlWriter: path must be a file path, got {path!r}")
        if not isinstance(append, bool):
            raise TypeError(f"JsonlWriter: append must be a bool, got {append!r}")
        self.path = os.fspath(path)
        mode = "a" if append else "x"  # "x": never write into a file that exists
        try:
            self._file: IO[str] | None = open(self.path, mode, encoding="utf-8")  # noqa: SIM115
        except FileExistsError:
            raise FileExistsError(
                f"JsonlWriter: {self.path!r} exists; pass append=True to add to it, or "
                "choose a new path"
            ) from None
        self._lock = threading.Lock()
        self.batches = 0

    def __call__(self, events: list[KVEvent]) -> None:
        line = json.dumps({"ts": time.time(), "events": [event_dict(e) for e in events]})
        with self._lock:
            if self._file is None:
                raise ValueError(f"JsonlWriter({self.path!r}) is closed")
            self._file.write(line + "\n")
            self._file.flush()
            self.batches += 1

    def close(self) -> None:
        """Close the file (idempotent)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __repr__(self) -> str:
        return f"JsonlWriter({self.path!r})"


def read_jsonl(path: str | os.PathLike[str]) -> list[dict]:
    """The batches a :class:`JsonlWriter` wrote to ``path`` (for tests and tools)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
