"""Zero-compute repeats: the last-position logits of prompts whose KV is all cached.

A prompt's first output token depends only on the logits at its last position. When a
request's prompt completes, :class:`PromptRepeats` keeps that logits row (exactly the
row the sampler got) and, when the prompt ends inside a block, the KV of that partial
last block (only full blocks are prefix-cached). When the same prompt arrives again in
the same namespace and every full block of it is still the very same cached KV, the
engine allocates the sequence on those blocks (``allocate(whole=True)``), writes the
partial block's KV back into a fresh block and samples from the stored row: no forward,
zero prefill tokens, and the tokens of the cold run (the request's seeded generator
draws from the same distribution, once, as it did then).

Entries are keyed by the whole prompt's chained hash in its namespace
(:meth:`~pagedkv.KVCache.prompt_match`, so salts and the model fingerprint keep them
apart) and hold the registration number of each full block: an entry is used only if
every block is cached under the same registration, i.e. none of them was evicted,
expired or reset since (a block recomputed and cached again does not count as the same;
that prompt is computed and its entry replaced). Entries are device tensors in one
least-recently-used index under a byte cap (``EngineConfig.repeat_cache_bytes``; their
tensor bytes count): a stale entry costs memory until it is replaced or ages out, never
a wrong token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedkv.cache import KVCache
from pagedkv.errors import CacheIntegrityError
from pagedkv.stores._lru import ByteLRU


@dataclass(frozen=True, slots=True)
class Replay:
    """One stored prompt: ``logits`` [V] of its last position; ``tail`` [layers, 2, r,
    Hkv, D] the KV of its ``r`` tokens past the last full block (``None`` when the
    prompt is block-aligned); ``registrations`` of its full blocks when stored."""

    registrations: tuple[int, ...]
    logits: torch.Tensor
    tail: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        tail = 0 if self.tail is None else self.tail.nbytes
        return self.logits.nbytes + tail


@dataclass(frozen=True)
class RepeatStats:
    """Counters of :class:`PromptRepeats` since the engine was built: ``hits`` (prompts
    answered from an entry), ``stores`` (entries written, replacements included),
    ``stale`` (entries found with a block cached anew, dropped), ``too_large`` (rows not
    kept: one entry exceeds the cap), ``evicted`` (dropped for room); ``entries`` and
    ``bytes_used`` now, within ``capacity_bytes``."""

    entries: int
    bytes_used: int
    capacity_bytes: int
    hits: int
    stores: int
    stale: int
    too_large: int
    evicted: int


class PromptRepeats:
    """Stored last-position logits (and partial last blocks) of whole prompts, for
    ``cache``, under ``capacity_bytes`` (>= 1; the engine builds none for 0)."""

    def __init__(self, cache: KVCache, capacity_bytes: int) -> None:
        self.cache = cache
        self._kv = cache.pool.kv  # [layers, 2, blocks, block_size, Hkv, D]
        self._lru = ByteLRU(capacity_bytes)
        self._entries: dict[str, Replay] = {}
        self._hits = self._stores = self._stale = self._too_large = self._evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, prompt: list[int], salt: object) -> Replay | None:
        """The entry of ``prompt`` if every full block of it is still the cached KV it
        was stored with (then it is the most recently used); else ``None``."""
        if not self._entries:
            return None
        match = self.cache.prompt_match(prompt, salt)
        if match is None:
            return None
        key = match.key.hex()
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.registrations != match.registrations:
            self._drop(key)
            self._stale += 1
            return None
        self._lru.touch(key)
        return entry

    def restore(self, entry: Replay, block: int) -> None:
        """Write the entry's partial-block KV into ``block`` (the sequence's last block,
        fresh from ``allocate(whole=True)``; -1 when the prompt is block-aligned): the
        prompt is answered from the entry."""
        self._hits += 1
        if entry.tail is not None:
            self._kv[:, :, block, : entry.tail.shape[2]].copy_(entry.tail)

    def store(self, prompt: list[int], salt: object, logits: torch.Tensor, block: int) -> None:
        """Keep ``logits`` [V] (copied) of a prompt whose KV was just computed, with the
        KV of its partial last block (held in ``block``; -1 when the prompt is
        block-aligned); nothing when a full block of it
        is not cached (a private or too short prompt) or the entry would exceed the cap."""
        match = self.cache.prompt_match(prompt, salt)
        if match is None:
            return
        r = len(prompt) % self.cache.block_size
        nbytes = logits.nbytes + r * self.cache.layout.bytes_per_token
        if nbytes > self._lru.capacity_bytes:
            self._too_large += 1
            return
        key = match.key.hex()
        self._drop(key)
        for victim in self._lru.victims(nbytes):
            self._drop(victim)
            self._evicted += 1
        tail = self._kv[:, :, block, :r].clone() if r else None
        self._entries[key] = Replay(match.registrations, logits.clone(), tail)
        self._lru.add(key, nbytes)
        self._stores += 1

    def clear(self) -> None:
        """Drop every entry (counters stay)."""
        for key in list(self._entries):
            self._drop(key)

    def _drop(self, key: str) -> None:
        if self._entries.pop(key, None) is not None:
            self._lru.pop(key)

    def stats(self) -> RepeatStats:
        return RepeatStats(
            len(self._entries), self._lru.bytes_used, self._lru.capacity_bytes, self._hits,
            self._stores, self._stale, self._too_large, self._evicted,
        )  # fmt: skip

    def check_integrity(self) -> None:
        """Raise :class:`~pagedkv.errors.CacheIntegrityError` when the entries and their
        byte index disagree (keys, sizes) or the bytes exceed the cap."""
        self._lru.check("PromptRepeats")
        if set(self._lru) != set(self._entries):
            raise CacheIntegrityError(
                f"PromptRepeats: {len(self._entries)} entries but {len(self._lru)} indexed keys"
            )
        for key, entry in self._entries.items():
            if self._lru.size(key) != entry.nbytes:
                raise CacheIntegrityError(
                    f"PromptRepeats: entry {key[:12]} holds {entry.nbytes} bytes, "
                    f"indexed as {self._lru.size(key)}"
                )
