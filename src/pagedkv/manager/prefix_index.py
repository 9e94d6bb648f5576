"""The prefix index: registered full blocks, found by the exact input of their hash.

A block's chained hash is ``H(parent_hash || namespace || token bytes)``. The index
is keyed by that input rather than by the digest: a lookup then needs no digest at
all (a hit reads the block's stored hash to continue the chain), only a miss pays
for one, and a hit is a byte-exact match of the tokens.

Owned by the block manager, which reads :attr:`PrefixIndex.hashes` on its hot paths;
nothing else writes these tables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from pagedkv.manager.eviction import BlockMeta
from pagedkv.manager.hashing import ROOT, as_token_array, chain_hashes, namespace
from pagedkv.manager.sequence import SeqRecord

#: ``hashes[b]`` / ``keys[b]`` of a block that is not registered (a digest is never empty).
UNREGISTERED = b""


class PromptMatch(NamedTuple):
    """Every full block of a prompt is cached: which registrations hold them, and the
    prompt's identity (:meth:`PrefixIndex.prompt_match`).

    ``key``: the chained hash of the whole prompt in its namespace: the last full
    block's chain hash, chained once more over the partial last block's tokens when
    there is one. ``registrations``: the registration number of each full block's
    cached block, in order; a block dropped and registered again gets a new number, so
    an equal tuple means the very same cached KV.
    """

    key: bytes
    registrations: tuple[int, ...]


# Salts of these exact types are remembered with their namespace digest.
_CACHEABLE_SALTS = (str, bytes, int, type(None))
_NS_CACHE_SIZE = 4096


class PrefixIndex:
    """Which block holds each registered full block of tokens, per namespace.

    ``hashes[b]`` / ``keys[b]``: block ``b``'s chained hash and its index key (the
    hash's input), :data:`UNREGISTERED` (empty, so false) when ``b`` is not registered;
    ``by_key``: key -> block.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        digest: Callable[[bytes], bytes],
        extra_keys: tuple[object, ...],
        meta: BlockMeta,
    ) -> None:
        self.block_size = block_size
        self.digest = digest
        self.extra_keys = extra_keys
        self.hashes: list[bytes] = [UNREGISTERED] * num_blocks
        self.keys: list[bytes] = [UNREGISTERED] * num_blocks
        self.by_key: dict[bytes, int] = {}
        self._meta = meta
        self._registrations = 0
        self._ns_cache: dict[object, bytes] = {None: namespace(None, extra_keys)}

    def __len__(self) -> int:
        return len(self.by_key)

    def namespace(self, salt: object) -> bytes:
        """The namespace digest of ``salt`` (``TypeError`` for a salt of a bad type)."""
        # Exact types: True == 1 and hash(True) == hash(1), so an isinstance check would
        # let a (rejected) bool salt alias a cached int salt.
        ns = self._ns_cache.get(salt) if type(salt) in _CACHEABLE_SALTS else None
        if ns is None:
            ns = namespace(salt, self.extra_keys)  # validates the salt's type
            if len(self._ns_cache) < _NS_CACHE_SIZE:
                self._ns_cache[salt] = ns
        return ns

    def set_extra_keys(self, extra_keys: tuple[object, ...]) -> None:
        """Hash new blocks (and look prompts up) under ``extra_keys`` from now on; blocks
        registered before stay indexed under their old namespaces, where no prompt looks."""
        self._ns_cache = {None: namespace(None, extra_keys)}  # validates the keys first
        self.extra_keys = extra_keys

    @property
    def stamp(self) -> int:
        """The registration stamp of the last block registered (0: none yet)."""
        return self._registrations

    def prefix_keys(self, token_ids: Sequence[int], salt: object) -> list[tuple[bytes, bytes]]:
        """(index key, chained hash) of each full block of ``token_ids``."""
        raw = as_token_array(token_ids).tobytes()
        ns = self.namespace(salt)
        step = 4 * self.block_size
        digest = self.digest
        parent = ROOT
        out = []
        for s in range(0, len(raw) - step + 1, step):
            key = parent + ns + raw[s : s + step]
            parent = digest(key)
            out.append((key, parent))
        return out

    def block_hashes(self, seq: SeqRecord, start: int, stop: int) -> list[bytes]:
        """Chained hashes of full blocks ``start..stop`` of a live sequence."""
        # A registered block's hash is its chain hash in every sequence that holds it
        # (hits match by the exact hash input), so no digest is needed; only a block
        # left anonymous (its content was cached elsewhere) forces a recompute.
        hashes, blocks = self.hashes, seq.blocks
        out = [hashes[blocks[i]] for i in range(start, stop)]
        if UNREGISTERED in out:
            return chain_hashes(seq.tokens, self.block_size, seq.ns, self.digest)[start:stop]
        return out

    def match(self, raw: bytes, ns: bytes, limit: int) -> list[int]:
        """Registered blocks matching the first (at most ``limit``) full blocks of ``raw``
        (uint32 token bytes) in namespace ``ns``; changes nothing."""
        step = 4 * self.block_size
        index, hashes = self.by_key, self.hashes
        parent = ROOT
        hits = []
        for s in range(0, limit * step, step):
            block = index.get(parent + ns + raw[s : s + step])
            if block is None:
                break
            hits.append(block)
            parent = hashes[block]
        return hits

    def prompt_match(
        self, raw: bytes, ns: bytes, usable: Callable[[list[int]], list[int]]
    ) -> PromptMatch | None:
        """The :class:`PromptMatch` of a prompt (uint32 token bytes ``raw``) whose full
        blocks are all registered and ``usable`` (the policy's filter); ``None`` when one
        is not. Changes nothing; a digest only for a partial last block."""
        step = 4 * self.block_size
        full = len(raw) // step
        hits = self.match(raw, ns, full)
        if hits:
            hits = usable(hits)
        if len(hits) < full:
            return None
        parent = self.hashes[hits[-1]] if hits else ROOT
        tail = raw[full * step :]
        key = self.digest(parent + ns + tail) if tail else parent
        registered_at = self._meta.registered_at
        return PromptMatch(key, tuple(registered_at[b] for b in hits))

    def register(self, block: int, key: bytes, block_hash: bytes) -> bool:
        """Index a block that just became full; False (nothing changes) if its content
        already has a block, which then stays the one found."""
        if key in self.by_key or self.hashes[block]:
            return False
        self.by_key[key] = block
        self.hashes[block] = block_hash
        self.keys[block] = key
        self._registrations += 1
        self._meta.registered_at[block] = self._registrations
        self._meta.hits[block] = 0
        return True

    def register_blocks(
        self,
        blocks: list[int],
        start: int,
        stop: int,
        raw: bytes,
        offset: int,
        ns: bytes,
        parent: bytes,
        anonymous: list[int],
    ) -> bytes:
        """Register a sequence's blocks ``start..stop`` that just became full, chaining
        hashes from ``parent``; returns the last block's hash.

        Block ``i``'s tokens are ``raw`` (uint32 bytes) from block ``i - offset`` on. A
        block whose content already has a block stays unregistered and is appended to
        ``anonymous`` (the other block stays the one found).
        """
        # The loop inlines register(): a call per block would cost more than the rest.
        step, digest = 4 * self.block_size, self.digest
        by_key, hashes, keys = self.by_key, self.hashes, self.keys
        registered_at, hits = self._meta.registered_at, self._meta.hits
        stamp = self._registrations
        for i in range(start, stop):
            at = (i - offset) * step
            key = parent + ns + raw[at : at + step]
            parent = digest(key)
            b = blocks[i]
            if key in by_key or hashes[b]:
                anonymous.append(b)
                continue
            by_key[key] = b
            hashes[b] = parent
            keys[b] = key
            stamp += 1
            registered_at[b] = stamp
            hits[b] = 0
        self._registrations = stamp
        return parent

    def drop(self, block: int) -> bytes:
        """Unregister ``block`` (registered); returns the hash it had."""
        h = self.hashes[block]
        del self.by_key[self.keys[block]]
        self.hashes[block] = self.keys[block] = UNREGISTERED
        return h

    def violations(self, prefix_caching: bool) -> list[str]:
        """What disagrees between the index and the per-block tables (empty: all holds)."""
        problems = []
        registered = [b for b, h in enumerate(self.hashes) if h]
        if registered and not prefix_caching:
            problems.append(f"prefix caching is off but {len(registered)} blocks are registered")
        if len(registered) != len(self.by_key):
            problems.append(
                f"index has {len(self.by_key)} entries but {len(registered)} blocks are registered"
            )
        for key, b in self.by_key.items():
            if self.keys[b] != key:
                problems.append(f"index entry for block {b} does not match the block's key")
                break
        for b in registered:
            key = self.keys[b]
            if not key or self.digest(key) != self.hashes[b]:
                problems.append(
                    f"block {b}: its registered hash is not the digest of its index key"
                )
                break
        return problems
