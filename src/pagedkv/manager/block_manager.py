"""The block manager: paged KV bookkeeping over integer block ids (no tensors here).

Every block is in exactly one state:

* **free** — never used or invalidated; on the ``_free`` stack;
* **in use** — ref count > 0, held by one or more sequences;
* **cached** — ref count 0 with its hash registered, findable by later prompts;
  evictable (in the policy) unless its prefix is pinned (then in ``_pinned``).

``free + in use + cached == num_blocks`` always; :meth:`BlockManager.check_integrity`
checks it and everything else that must hold.

The prefix index is keyed by the exact input of the chained hash
(``parent_hash || namespace || token bytes``) rather than by the digest: a lookup
then needs no digest at all (a hit reads the block's stored hash to continue the
chain), only a miss pays for one, and a hit is a byte-exact match of the tokens.

Reference counts of prefix hits are shared per *chain*: the blocks a prompt found
cached (a path from the root of the prefix tree, named by its last block) hold one
reference each for all live sequences that found that same chain, counted in
``_chains``. Requests that share a system prompt then take and drop that prompt's
blocks in O(1); only the first to find the chain and the last to free it touch
every block. So ``_ref[b]`` = sequences holding ``b`` outside a chain + live chains
through ``b``, and a block is in use exactly when some live sequence's table holds it.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Hashable, Sequence

from pagedkv import _resources
from pagedkv.errors import CacheIntegrityError, OutOfBlocks
from pagedkv.manager import integrity
from pagedkv.manager.eviction import BlockMeta, make_policy
from pagedkv.manager.hashing import (
    ROOT,
    as_token_array,
    chain_hashes,
    hash_function,
    namespace,
)
from pagedkv.manager.stats import CacheStats, MemoryPressure

EvictCallback = Callable[[int, bytes], None]
_CACHEABLE_SALTS = (str, bytes, int, type(None))
PressureCallback = Callable[[MemoryPressure], None]


class _Seq:
    __slots__ = ("blocks", "tokens", "last_hash", "ns", "chain", "anonymous")

    def __init__(
        self, blocks: list[int], tokens: array, last_hash: bytes, ns: bytes, chain: int = 0
    ):
        self.blocks = blocks  # physical block of each logical block
        # blocks[:chain] are a prefix hit held through _chains[blocks[chain - 1]]
        # (one shared reference per block); blocks[chain:] hold a reference each.
        self.chain = chain
        self.tokens = tokens  # every token id (uint32)
        # Chained hash of the last full block (ROOT if none), the parent of the next one.
        # Only this one is kept: a per-sequence list of every hash would cost an
        # allocation per block and a dereference per block when the sequence is freed.
        self.last_hash = last_hash
        self.ns = ns  # namespace digest (salt + extra keys)
        # Full blocks left unregistered (their content was cached elsewhere when they
        # filled); every other full block is registered while the sequence holds it,
        # so free() needs no per-block hash lookup. Usually empty.
        self.anonymous: list[int] = []


# Host bytes of bookkeeping per block, measured with tracemalloc (CPython 3.11, 64-bit) on
# managers of 64k blocks filled with 1k-token sequences, block sizes 1 to 256:
# - allocated by the constructor: 7 per-block lists (8 bytes a slot) + the free
#   stack's int objects (32): 88;
# - held by a sequence: its token ids (4 per token) + its table slot: ~4.25 per token;
# - registered (prefix caching): the hash (33 + digest bytes) and index key (33 + 32 +
#   4 per token) objects, the index entry and the registration stamp: ~184 + digest +
#   4 per token.
# The estimate lands within 2 % of the measurement at every block size tried.
_EAGER_BYTES_PER_BLOCK = 88
_REGISTERED_BYTES_PER_BLOCK = 184


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class BlockManager:
    """Ref-counted paged blocks with prefix caching, copy-on-write and eviction.

    Args:
        num_blocks: physical blocks in the pool (> 0).
        block_size: tokens per block (> 0).
        prefix_caching: reuse cached full blocks whose token prefix (and salt) match.
        eviction: ``"lru"`` (default), ``"fifo"`` or ``"lfu"``.
        ttl_seconds: cached blocks idle longer than this are dropped first and never
            matched (``None``: no expiry).
        extra_keys: folded into every block hash (model fingerprint, adapter id):
            KV is never shared across different extra keys.
        hash_algo: ``"sha256"`` (default) or ``"xxh3_128"``.
        watermarks: used-fraction thresholds of MEDIUM / HIGH / CRITICAL pressure.
        on_evict: called as ``on_evict(block_id, block_hash)`` when a cached block is
            evicted, before it is handed out again (tiers copy the bytes out there).
            It must not raise.
        clock: time source for TTL (seconds, monotonic); for tests.

    Every operation is atomic: on bad input or when blocks run out it raises and
    leaves the state exactly as it was.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        prefix_caching: bool = True,
        eviction: str = "lru",
        ttl_seconds: float | None = None,
        extra_keys: Sequence[object] = (),
        hash_algo: str = "sha256",
        watermarks: tuple[float, float, float] = (0.6, 0.8, 0.95),
        on_evict: EvictCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_int(num_blocks, "num_blocks", 1)
        _check_int(block_size, "block_size", 1)
        if ttl_seconds is not None and (
            isinstance(ttl_seconds, bool)
            or not isinstance(ttl_seconds, (int, float))
            or not ttl_seconds > 0
        ):
            raise ValueError(f"ttl_seconds must be a positive number or None, got {ttl_seconds!r}")
        if (
            not isinstance(watermarks, (tuple, list))
            or len(watermarks) != 3
            or not all(isinstance(w, (int, float)) for w in watermarks)
            or not 0 < watermarks[0] < watermarks[1] < watermarks[2] <= 1
        ):
            raise ValueError(
                f"watermarks must be three increasing fractions in (0, 1], got {watermarks!r}"
            )
        if on_evict is not None and not callable(on_evict):
            raise TypeError("on_evict must be callable (block_id, block_hash) -> None")
        if isinstance(extra_keys, (str, bytes)) or not hasattr(extra_keys, "__iter__"):
            raise TypeError("extra_keys must be a sequence of keys, e.g. ('model-v2',)")
        if not callable(clock):
            raise TypeError("clock must be a callable returning seconds, e.g. time.monotonic")
        if not isinstance(hash_algo, str):
            raise TypeError(f"hash_algo must be a str, got {type(hash_algo).__name__}")
        self._digest = hash_function(hash_algo)
        need = self.bookkeeping_bytes(
            num_blocks, block_size, prefix_caching=prefix_caching, hash_algo=hash_algo
        )
        _resources.require_memory(
            "BlockManager", "num_blocks", num_blocks, need,
            unit_bytes=need // num_blocks, detail="bookkeeping with every block in use",
        )  # fmt: skip
        self._extra_keys = tuple(extra_keys)
        self._ns_cache: dict[object, bytes] = {None: namespace(None, self._extra_keys)}

        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = bool(prefix_caching)
        self.hash_algo = hash_algo
        self.ttl_seconds = ttl_seconds
        self.watermarks = tuple(watermarks)
        self._on_evict = on_evict
        self._clock = clock

        self._hash: list[bytes | None] = [None] * num_blocks  # registered hash
        self._key: list[bytes | None] = [None] * num_blocks  # its index key
        self._cached_at = [0.0] * num_blocks
        self._meta = BlockMeta(num_blocks)
        self._ref = self._meta.ref  # > 0: in use; < 0: listed by LRU (see LRUPolicy); else 0
        self._policy = make_policy(eviction, self._meta)
        self.eviction = eviction.lower()
        self._count_hits = self.eviction == "lfu"  # per-block hit counts rank LFU only
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pops 0, 1, 2, ...
        self._pinned: set[int] = set()  # cached blocks kept from eviction
        self._pins: dict[bytes, int] = {}  # block hash -> pin count
        self._index: dict[bytes, int] = {}  # hash input -> block
        self._chains: dict[int, int] = {}  # last block of a held hit chain -> sequences
        self._seqs: dict[Hashable, _Seq] = {}
        self._copies: list[tuple[int, int]] = []
        self._registrations = 0

        self._query_tokens = 0
        self._hit_tokens = 0
        self._evictions = 0
        self._cow_copies = 0
        self._blocks_allocated = 0
        self._pressure_cbs: list[PressureCallback] = []
        self._pressure = MemoryPressure.LOW

    @staticmethod
    def bookkeeping_bytes(
        num_blocks: int,
        block_size: int,
        *,
        prefix_caching: bool = True,
        hash_algo: str = "sha256",
    ) -> int:
        """Host bytes a manager of this size holds with every block in use (an estimate).

        The constructor allocates ~88 bytes per block; sequences and registered
        hashes add the rest as blocks fill (~440 bytes per block in all at
        ``block_size=16`` with prefix caching). The constructor refuses, with
        :class:`~pagedkv.errors.ResourceError`, a size whose estimate exceeds the
        available host memory.
        """
        _check_int(num_blocks, "num_blocks", 1)
        _check_int(block_size, "block_size", 1)
        if not isinstance(hash_algo, str):
            raise TypeError(f"hash_algo must be a str, got {type(hash_algo).__name__}")
        per_block = _EAGER_BYTES_PER_BLOCK + (17 * block_size) // 4
        if prefix_caching:
            digest_bytes = len(hash_function(hash_algo)(b""))
            per_block += _REGISTERED_BYTES_PER_BLOCK + digest_bytes + 4 * block_size
        return num_blocks * per_block

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: never used + evictable cached."""
        return len(self._free) + len(self._policy)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with ref count > 0."""
        return self.num_blocks - len(self._free) - len(self._policy) - len(self._pinned)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a new sequence of ``num_tokens`` fits without prefix hits."""
        _check_int(num_tokens, "num_tokens", 0)
        return -(-num_tokens // self.block_size) <= self.num_free_blocks

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def seq_ids(self) -> list:
        """Live sequence ids, oldest first."""
        return list(self._seqs)

    def _seq(self, seq_id: Hashable) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(
                f"unknown sequence {seq_id!r}: allocate() it first (or it was already freed)"
            ) from None

    def block_table(self, seq_id: Hashable) -> list[int]:
        """Physical block of each logical block of the sequence (a copy)."""
        return list(self._seq(seq_id).blocks)

    def num_tokens(self, seq_id: Hashable) -> int:
        """Tokens the sequence holds slots for."""
        return len(self._seq(seq_id).tokens)

    def token_ids(self, seq_id: Hashable) -> list[int]:
        """Every token id of the sequence."""
        return self._seq(seq_id).tokens.tolist()

    def block_hashes(
        self, seq_id: Hashable, start: int = 0, stop: int | None = None
    ) -> list[bytes]:
        """Chained hash of full blocks ``start..stop`` (default: all of them; empty
        without prefix caching)."""
        seq = self._seq(seq_id)
        full = len(seq.tokens) // self.block_size
        _check_int(start, "start", 0)
        stop = full if stop is None else min(_check_int(stop, "stop", 0), full)
        if not self.prefix_caching or start >= stop:
            return []
        # A registered block's hash is its chain hash in every sequence that holds it
        # (hits match by the exact hash input), so no digest is needed; only a block
        # left anonymous (its content was cached elsewhere) forces a recompute.
        hashes, blocks = self._hash, seq.blocks
        out = [hashes[blocks[i]] for i in range(start, stop)]
        if None in out:
            return chain_hashes(seq.tokens, self.block_size, seq.ns, self._digest)[start:stop]
        return out

    def slot_mapping(self, seq_id: Hashable, start: int = 0, stop: int | None = None) -> list[int]:
        """``block_id * block_size + offset`` of tokens ``start..stop`` of the sequence."""
        seq = self._seq(seq_id)
        n = len(seq.tokens)
        _check_int(start, "start", 0)
        if stop is None:
            stop = n
        _check_int(stop, "stop", 0)
        if stop > n:
            raise ValueError(f"stop={stop} is past the sequence's {n} tokens")
        if start > stop:
            raise ValueError(f"start={start} is after stop={stop}")
        bs = self.block_size
        blocks = seq.blocks
        out: list[int] = []
        pos = start
        while pos < stop:
            i, off = divmod(pos, bs)
            end = min(stop, (i + 1) * bs)
            base = blocks[i] * bs
            out.extend(range(base + off, base + off + end - pos))
            pos = end
        return out

    # --------------------------------------------------------------- namespaces

    def _namespace(self, salt: object) -> bytes:
        # Exact types: True == 1 and hash(True) == hash(1), so an isinstance check would
        # let a (rejected) bool salt alias a cached int salt.
        ns = self._ns_cache.get(salt) if type(salt) in _CACHEABLE_SALTS else None
        if ns is None:
            ns = namespace(salt, self._extra_keys)  # validates the salt's type
            if len(self._ns_cache) < 4096:
                self._ns_cache[salt] = ns
        return ns

    def _prefix_keys(self, token_ids: Sequence[int], salt: object) -> list[tuple[bytes, bytes]]:
        """(index key, chained hash) of each full block of ``token_ids``."""
        raw = as_token_array(token_ids).tobytes()
        ns = self._namespace(salt)
        step = 4 * self.block_size
        digest = self._digest
        parent = ROOT
        out = []
        for s in range(0, len(raw) - step + 1, step):
            key = parent + ns + raw[s : s + step]
            parent = digest(key)
            out.append((key, parent))
        return out

    def hash_blocks(self, token_ids: Sequence[int], salt: object = None) -> list[bytes]:
        """Chained hashes of the full blocks of ``token_ids`` in ``salt``'s namespace."""
        return [h for _, h in self._prefix_keys(token_ids, salt)]

    def _match(self, raw: bytes, ns: bytes, limit: int) -> list[int]:
        """Cached/in-use blocks matching the first full blocks of ``raw`` (no change)."""
        step = 4 * self.block_size
        index, hashes = self._index, self._hash
        parent = ROOT
        hits = []
        for s in range(0, limit * step, step):
            block = index.get(parent + ns + raw[s : s + step])
            if block is None:
                break
            hits.append(block)
            parent = hashes[block]
        if self.ttl_seconds is not None and hits:
            # Expired blocks are not matched, but not dropped here either: lookup() and
            # a failing allocate() must change nothing. _expire() drops them on commit.
            deadline = self._clock() - self.ttl_seconds
            ref, cached_at, policy = self._ref, self._cached_at, self._policy
            for i, b in enumerate(hits):
                if ref[b] <= 0 and b in policy and cached_at[b] < deadline:
                    return hits[:i]
        return hits

    def lookup(self, token_ids: Sequence[int], salt: object = None) -> int:
        """Tokens a new :meth:`allocate` of ``token_ids`` would find cached (no change)."""
        arr = as_token_array(token_ids)
        if not self.prefix_caching or not arr:
            return 0
        limit = (len(arr) - 1) // self.block_size
        return len(self._match(arr.tobytes(), self._namespace(salt), limit)) * self.block_size

    # -------------------------------------------------------------- allocation

    def _out_of_blocks(self, need: int, what: str) -> OutOfBlocks:
        return OutOfBlocks(
            f"{what} needs {need} new block(s) but only {self.num_free_blocks} are free or "
            f"evictable ({self.num_used_blocks} of {self.num_blocks} in use, "
            f"{len(self._pinned)} pinned); free or preempt a sequence, unpin prefixes, "
            f"or use a larger pool"
        )

    def _take(self) -> int:
        """Hand out one block (caller checked availability): free first, else evict."""
        if self._free:
            block = self._free.pop()
        else:
            block = self._policy.pop()
            evicted_hash = self._drop_registration(block)
            self._evictions += 1
            if self._on_evict is not None:
                self._on_evict(block, evicted_hash)
        self._ref[block] = 1
        self._blocks_allocated += 1
        return block

    def _drop_registration(self, block: int) -> bytes:
        h = self._hash[block]
        del self._index[self._key[block]]
        self._hash[block] = None
        self._key[block] = None
        return h

    def _register(self, block: int, key: bytes, h: bytes) -> bool:
        """Index a block that just became full; False if it stays anonymous."""
        if key in self._index or self._hash[block] is not None:
            return False  # the same content already has a block
        self._index[key] = block
        self._hash[block] = h
        self._key[block] = key
        self._registrations += 1
        self._meta.registered_at[block] = self._registrations
        self._meta.hits[block] = 0
        return True

    def allocate(self, seq_id: Hashable, token_ids: Sequence[int], salt: object = None) -> int:
        """Start sequence ``seq_id`` with its prompt; return how many tokens are cached.

        Reserves ``ceil(len / block_size)`` blocks, reusing (with a reference) the
        longest chain of cached full blocks that match the prompt in ``salt``'s
        namespace. The result is a multiple of ``block_size`` and at most ``len - 1``:
        one token is always left to compute. Full blocks of the prompt become
        findable at once; the caller writes their KV in the same step.

        Raises ``ValueError`` for a live ``seq_id`` or an empty prompt, ``TypeError``/
        ``ValueError`` for bad token ids, :class:`OutOfBlocks` when the pool is full;
        nothing changes in any of these cases.
        """
        try:
            live = seq_id in self._seqs
        except TypeError:
            raise TypeError(f"seq_id must be hashable, got {type(seq_id).__name__}") from None
        if live:
            raise ValueError(f"sequence {seq_id!r} is already live; free() it or use a new id")
        arr = as_token_array(token_ids)
        n = len(arr)
        if n == 0:
            raise ValueError("token_ids is empty: a prompt needs at least one token")
        ns = self._namespace(salt)
        bs = self.block_size
        raw = arr.tobytes()
        num_full = n // bs
        if self.prefix_caching:
            hits = self._match(raw, ns, (n - 1) // bs)
        else:
            hits = []
        ref, chains = self._ref, self._chains
        need = -(-n // bs) - len(hits)
        held = bool(hits) and hits[-1] in chains  # then every hit block is in use
        if held:
            reclaimed = 0
        else:
            reclaimed = sum(1 for b in hits if ref[b] <= 0 and b not in self._pinned)
        if need > self.num_free_blocks - reclaimed:
            raise self._out_of_blocks(need, f"allocate({seq_id!r}, {n} tokens)")

        # Commit: nothing below can fail (on_evict must not raise).
        if held:
            chains[hits[-1]] += 1
        elif hits:
            chains[hits[-1]] = 1
            policy, pinned = self._policy, self._pinned
            for b in hits:
                if ref[b] <= 0:
                    if b in pinned:
                        pinned.discard(b)
                    else:
                        policy.remove(b)  # leaves ref 0
                ref[b] += 1
        if self._count_hits:
            meta_hits = self._meta.hits
            for b in hits:
                meta_hits[b] += 1
        if self.ttl_seconds is not None:
            self._expire()  # after the hits left the policy; frees expired blocks first
        blocks = hits + [self._take() for _ in range(need)]
        parent = self._hash[hits[-1]] if hits else ROOT
        seq = self._seqs[seq_id] = _Seq(blocks, arr, parent, ns, len(hits))
        if self.prefix_caching:
            digest = self._digest
            step = 4 * bs
            for i in range(len(hits), num_full):
                key = parent + ns + raw[i * step : (i + 1) * step]
                parent = digest(key)
                if not self._register(blocks[i], key, parent):
                    seq.anonymous.append(blocks[i])
            seq.last_hash = parent
        self._query_tokens += n
        self._hit_tokens += len(hits) * bs
        if self._pressure_cbs:
            self._update_pressure()
        return len(hits) * bs

    def append(self, seq_id: Hashable, token_ids: Sequence[int]) -> None:
        """Reserve slots for more tokens of a live sequence.

        A shared (ref > 1), partly filled last block is copied on write first: a
        fresh block replaces it in this sequence and ``(src, dst)`` is queued for
        :meth:`take_copies`. Blocks that become full are registered for reuse.
        """
        seq = self._seqs.get(seq_id)
        if seq is None:
            seq = self._seq(seq_id)  # raises the KeyError
        arr = as_token_array(token_ids)
        k = len(arr)
        if k == 0:
            raise ValueError("token_ids is empty: append() needs at least one token")
        bs = self.block_size
        n = len(seq.tokens)
        blocks = seq.blocks
        new_blocks = -(-(n + k) // bs) - len(blocks)
        cow = n % bs != 0 and self._ref[blocks[-1]] > 1
        if (new_blocks or cow) and new_blocks + cow > self.num_free_blocks:
            raise self._out_of_blocks(new_blocks + cow, f"append({seq_id!r}, {k} tokens)")

        if self.ttl_seconds is not None:
            self._expire()  # expired cached blocks are taken before live ones are evicted
        if cow:
            src = blocks[-1]
            dst = self._take()
            self._ref[src] -= 1  # was > 1: stays in use by the other holders
            blocks[-1] = dst
            self._copies.append((src, dst))
            self._cow_copies += 1
        for _ in range(new_blocks):
            blocks.append(self._take())
        tokens = seq.tokens
        tokens.extend(arr)
        if self.prefix_caching and (n + k) // bs > n // bs:
            digest = self._digest
            parent = seq.last_hash
            for i in range(n // bs, (n + k) // bs):
                key = parent + seq.ns + tokens[i * bs : (i + 1) * bs].tobytes()
                parent = digest(key)
                if not self._register(blocks[i], key, parent):
                    seq.anonymous.append(blocks[i])
            seq.last_hash = parent
        if self._pressure_cbs:
            self._update_pressure()

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Make ``child_id`` a sequence with the parent's tokens, sharing every block.

        The first append to a shared, partly filled last block copies it on write.
        """
        parent = self._seq(parent_id)
        try:
            live = child_id in self._seqs
        except TypeError:
            raise TypeError(f"child_id must be hashable, got {type(child_id).__name__}") from None
        if live:
            raise ValueError(f"sequence {child_id!r} is already live; fork into a new id")
        ref, k = self._ref, parent.chain
        if k:
            self._chains[parent.blocks[k - 1]] += 1
        for b in parent.blocks[k:]:
            ref[b] += 1
        child = self._seqs[child_id] = _Seq(
            list(parent.blocks), array("I", parent.tokens), parent.last_hash, parent.ns, k
        )
        child.anonymous = list(parent.anonymous)
        if self._pressure_cbs:
            self._update_pressure()

    def free(self, seq_id: Hashable) -> None:
        """Drop the sequence's references.

        A block left unreferenced stays findable as cached (evictable) when its hash
        is registered, and becomes free otherwise. Unknown id -> ``KeyError``.
        """
        try:
            seq = self._seqs.pop(seq_id)
        except KeyError:
            raise KeyError(
                f"unknown sequence {seq_id!r}: it was never allocated or is already freed"
            ) from None
        ref = self._ref
        blocks, k = seq.blocks, seq.chain
        cached: list[int] = []
        # Tail blocks first: within one release the tail becomes least recently used,
        # so eviction takes a sequence's unique suffix before its (shared) prefix.
        for b in reversed(blocks[k:] if k else blocks):
            r = ref[b] - 1
            ref[b] = r
            if not r:
                cached.append(b)
        if cached:
            # Which of them are registered, without a (cache-missing) look at each
            # block's hash: every full block but the anonymous ones; the last block
            # may be partial, and nothing is registered without prefix caching.
            if not self.prefix_caching:
                self._free.extend(cached)
                cached = []
            else:
                if len(seq.tokens) % self.block_size and cached[0] == blocks[-1]:
                    self._free.append(cached.pop(0))
                if seq.anonymous:
                    anonymous = set(seq.anonymous)
                    self._free.extend(b for b in cached if b in anonymous)
                    cached = [b for b in cached if b not in anonymous]
        if k:
            chains, tail = self._chains, blocks[k - 1]
            holders = chains[tail] - 1
            if holders:
                chains[tail] = holders
            else:  # the chain's last holder: its blocks drop their shared reference
                del chains[tail]
                for b in reversed(blocks[:k]):
                    r = ref[b] - 1
                    ref[b] = r
                    if not r:
                        cached.append(b)  # a hit block is always registered
        if cached:
            self._cache_released(cached)
        if self._pressure_cbs:
            self._update_pressure()

    def _cache_released(self, blocks: list[int]) -> None:
        """Registered blocks whose last reference was dropped: evictable, or pinned."""
        if self._pins:
            pins, hashes = self._pins, self._hash
            for b in [b for b in blocks if hashes[b] in pins]:
                self._pinned.add(b)
            blocks = [b for b in blocks if hashes[b] not in pins]
        self._policy.add_many(blocks)
        if self.ttl_seconds is not None:
            now = self._clock()
            for b in blocks:
                self._cached_at[b] = now

    def take_copies(self) -> list[tuple[int, int]]:
        """Copy-on-write copies ``(src_block, dst_block)`` owed to storage since last call.

        Storage must copy every block's KV before the caller writes into ``dst``.
        """
        copies, self._copies = self._copies, []
        return copies

    # ------------------------------------------------------ pins, expiry, reset

    def pin(self, token_ids: Sequence[int], salt: object = None) -> int:
        """Keep the cached blocks of this prefix from eviction until :meth:`unpin`.

        Pins are by content: blocks of the prefix registered later are protected
        too. Pins nest (pin twice, unpin twice). Returns how many of the prefix's
        full blocks are resident (cached or in use) now.
        """
        keys = self._prefix_keys(token_ids, salt)
        if not keys:
            raise ValueError(
                f"token_ids has no full block (block_size={self.block_size}); "
                "only full blocks are cached and can be pinned"
            )
        if self.ttl_seconds is not None:
            self._expire()  # an expired block is gone, not revived by a pin
        resident = 0
        for key, h in keys:
            self._pins[h] = self._pins.get(h, 0) + 1
            block = self._index.get(key)
            if block is not None:
                resident += 1
                if self._ref[block] <= 0 and block in self._policy:
                    self._policy.remove(block)
                    self._pinned.add(block)
        return resident

    def unpin(self, token_ids: Sequence[int], salt: object = None) -> int:
        """Undo one :meth:`pin` of this prefix; returns the number of blocks unpinned.

        Raises ``ValueError`` (and changes nothing) if the prefix is not pinned.
        """
        keys = self._prefix_keys(token_ids, salt)
        if not keys or any(h not in self._pins for _, h in keys):
            raise ValueError(
                "token_ids: this prefix is not pinned (pin() it first, with the same salt)"
            )
        released = []
        for key, h in keys:
            count = self._pins[h] - 1
            if count:
                self._pins[h] = count
                continue
            del self._pins[h]
            block = self._index.get(key)
            if block is not None and block in self._pinned:
                self._pinned.discard(block)
                released.append(block)
        # Tail first, as in free(): evicting the head first would orphan the rest.
        released.reverse()
        self._policy.add_many(released)
        if self.ttl_seconds is not None:
            now = self._clock()
            for block in released:
                self._cached_at[block] = now
        return len(keys)

    def _expire(self) -> None:
        """Invalidate cached blocks idle for longer than ``ttl_seconds``."""
        deadline = self._clock() - self.ttl_seconds
        policy = self._policy
        while True:
            block = policy.oldest()
            if block is None or self._cached_at[block] >= deadline:
                return
            policy.remove(block)
            self._drop_registration(block)
            self._free.append(block)
            self._evictions += 1

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (they become free). Pins are kept.

        Returns False, changing nothing, while any block is in use.
        """
        if self.num_used_blocks:
            return False
        for block in [*self._policy.order(), *self._pinned]:
            self._drop_registration(block)
        # Nothing is in use: every block is free, handed out 0, 1, 2, ... as when new.
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._ref[:] = [0] * self.num_blocks  # clears LRU stamps (the list is shared)
        self._policy = make_policy(self.eviction, self._meta)
        self._pinned.clear()
        return True

    # -------------------------------------------------------- pressure, stats

    def on_pressure(self, callback: PressureCallback) -> None:
        """Call ``callback(level)`` whenever the memory-pressure level changes."""
        if not callable(callback):
            raise TypeError("on_pressure() takes a callable (MemoryPressure) -> None")
        self._pressure_cbs.append(callback)
        self._pressure = self.pressure

    @property
    def pressure(self) -> MemoryPressure:
        """Current level from the fraction of blocks in use."""
        used = self.num_used_blocks / self.num_blocks
        level = MemoryPressure.LOW
        for threshold, lvl in zip(
            self.watermarks, (MemoryPressure.MEDIUM, MemoryPressure.HIGH, MemoryPressure.CRITICAL)
        ):
            if used >= threshold:
                level = lvl
        return level

    def _update_pressure(self) -> None:
        level = self.pressure
        if level != self._pressure:
            self._pressure = level
            for cb in list(self._pressure_cbs):
                cb(level)

    def stats(self) -> CacheStats:
        """Counters and occupancy (see :class:`CacheStats`)."""
        used = self.num_used_blocks
        bs = self.block_size
        partial: dict[int, int] = {}
        for seq in self._seqs.values():
            fill = len(seq.tokens) % bs
            if fill:
                partial[seq.blocks[-1]] = fill
        unused = sum(bs - fill for fill in partial.values())
        return CacheStats(
            num_blocks=self.num_blocks,
            block_size=bs,
            used_blocks=used,
            cached_blocks=len(self._policy) + len(self._pinned),
            free_blocks=len(self._free),
            pinned_blocks=len(self._pinned),
            num_sequences=len(self._seqs),
            query_tokens=self._query_tokens,
            hit_tokens=self._hit_tokens,
            hit_rate=self._hit_tokens / self._query_tokens if self._query_tokens else 0.0,
            evictions=self._evictions,
            cow_copies=self._cow_copies,
            blocks_allocated=self._blocks_allocated,
            utilization=used / self.num_blocks,
            fragmentation=unused / (used * bs) if used else 0.0,
            pressure=self.pressure,
        )

    def eviction_order(self) -> list[int]:
        """Evictable cached blocks in the order they would be evicted."""
        return self._policy.order()

    def check_integrity(self) -> None:
        """Raise :class:`CacheIntegrityError` naming the numbers that disagree."""
        problems = integrity.violations(self)
        if problems:
            raise CacheIntegrityError("; ".join(problems))

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"BlockManager(num_blocks={self.num_blocks}, block_size={self.block_size}, "
            f"used={s.used_blocks}, cached={s.cached_blocks}, free={s.free_blocks}, "
            f"sequences={s.num_sequences})"
        )

    def discard(self, seq_id: Hashable) -> None:
        """Free ``seq_id`` and forget, rather than cache, the blocks its KV never reached.

        For undoing an :meth:`allocate` whose KV was never written (a copy into this
        pool failed): like :meth:`free`, except that every block past the sequence's
        prefix hit that no other sequence holds becomes free with its hash unregistered,
        so no later prompt finds bytes that are not its tokens' KV. The prefix-hit blocks
        are cached as after :meth:`free`. Unknown id -> ``KeyError``, nothing changed.
        """
        seq = self._seq(seq_id)
        own = seq.blocks[seq.chain :]
        self.free(seq_id)
        for b in own:
            if self._ref[b] > 0 or self._hash[b] is None:
                continue  # still held by a fork, or already free
            if b in self._pinned:
                self._pinned.discard(b)
            else:
                self._policy.remove(b)
            self._drop_registration(b)
            self._free.append(b)
