"""ManagerConfig: how a block manager caches, evicts and hashes — its options, validated once.

:class:`~pagedkv.manager.BlockManager` keyword arguments and
:class:`~pagedkv.KVCache`'s ``manager=`` both end up here; nothing else checks them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pagedkv._validate import check_bool, check_int, check_optional_number, check_str
from pagedkv.manager.eviction import policy_name
from pagedkv.manager.hashing import hash_function, namespace

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


@dataclass(frozen=True)
class ManagerConfig:
    """Options of a :class:`~pagedkv.manager.BlockManager` (everything but its size).

    Args:
        prefix_caching: reuse cached full blocks whose token prefix (and salt) match.
        eviction: ``"lru"`` (default), ``"fifo"`` or ``"lfu"`` (any case; kept lower case).
        ttl_seconds: cached blocks idle longer than this are dropped first and never
            matched (``None``: no expiry).
        extra_keys: folded into every block hash (model fingerprint, adapter id): KV is
            never shared across different extra keys. Each is ``None``, ``str``,
            ``bytes`` or ``int``; kept as a tuple.
        hash_algo: ``"sha256"`` (default) or ``"xxh3_128"``.
        watermarks: used-fraction thresholds of MEDIUM / HIGH / CRITICAL pressure.
        min_prefix_tokens: a prompt with fewer tokens than this is private (as with
            ``allocate(..., share_prefix=False)``): it gets no prefix hit and none of
            its blocks is ever registered (0, the default: every prompt shares).
        max_cached_blocks: at most this many evictable cached blocks (ref 0, not
            pinned); a release that would leave more evicts the excess by the policy
            (``on_evict`` is called, the blocks become free). Pinned blocks do not
            count. ``None`` (default): no cap beyond the pool.
        ghost_bytes: host bytes for the hashes of recently evicted / expired blocks
            (``explain`` tells them from blocks never seen): about 73 bytes each with
            SHA-256, so the default 4 MiB remembers the last ~57,000; 0 keeps none.

    Raises ``TypeError`` for a value of the wrong type and ``ValueError`` for a wrong
    value, naming the field.
    """

    prefix_caching: bool = True
    eviction: str = "lru"
    ttl_seconds: float | None = None
    extra_keys: Sequence[object] = ()
    hash_algo: str = "sha256"
    watermarks: tuple[float, float, float] = (0.6, 0.8, 0.95)
    min_prefix_tokens: int = 0
    max_cached_blocks: int | None = None
    ghost_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        check_bool(self.prefix_caching, "prefix_caching")
        set_field = object.__setattr__  # frozen: normalised values are set once, here
        set_field(self, "eviction", policy_name(self.eviction))
        ttl = check_optional_number(self.ttl_seconds, "ttl_seconds", positive=True, unit="seconds")
        set_field(self, "ttl_seconds", ttl)
        keys = self.extra_keys
        if isinstance(keys, (str, bytes)) or not isinstance(keys, Iterable):
            raise TypeError("extra_keys must be a sequence of keys, e.g. ('model-v2',)")
        set_field(self, "extra_keys", tuple(keys))
        namespace(None, self.extra_keys)  # each key's type (TypeError naming extra_keys)
        hash_function(check_str(self.hash_algo, "hash_algo"))
        w = self.watermarks
        if not isinstance(w, (tuple, list)):
            raise TypeError(f"watermarks must be three increasing fractions in (0, 1], got {w!r}")
        if (
            len(w) != 3
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w)
            or not 0 < w[0] < w[1] < w[2] <= 1
        ):
            raise ValueError(f"watermarks must be three increasing fractions in (0, 1], got {w!r}")
        set_field(self, "watermarks", (float(w[0]), float(w[1]), float(w[2])))
        check_int(self.min_prefix_tokens, "min_prefix_tokens", minimum=0)
        if self.max_cached_blocks is not None:
            check_int(self.max_cached_blocks, "max_cached_blocks", minimum=0)
        check_int(self.ghost_bytes, "ghost_bytes", minimum=0)

    def override(
        self,
        *,
        prefix_caching: bool | None = None,
        eviction: str | None = None,
        ttl_seconds: float | None = None,
        hash_algo: str | None = None,
        watermarks: tuple[float, float, float] | None = None,
        min_prefix_tokens: int | None = None,
        max_cached_blocks: int | None = None,
        ghost_bytes: int | None = None,
    ) -> ManagerConfig:
        """This config with every option given (not ``None``) replaced, validated again.

        (So ``max_cached_blocks`` can be set here but not lifted: build a new config.)
        """
        return ManagerConfig(
            prefix_caching=self.prefix_caching if prefix_caching is None else prefix_caching,
            eviction=self.eviction if eviction is None else eviction,
            ttl_seconds=self.ttl_seconds if ttl_seconds is None else ttl_seconds,
            extra_keys=self.extra_keys,
            hash_algo=self.hash_algo if hash_algo is None else hash_algo,
            watermarks=self.watermarks if watermarks is None else watermarks,
            min_prefix_tokens=(
                self.min_prefix_tokens if min_prefix_tokens is None else min_prefix_tokens
            ),
            max_cached_blocks=(
                self.max_cached_blocks if max_cached_blocks is None else max_cached_blocks
            ),
            ghost_bytes=self.ghost_bytes if ghost_bytes is None else ghost_bytes,
        )

    def bookkeeping_bytes(self, num_blocks: int, block_size: int) -> int:
        """Host bytes a manager of this size and config holds with every block in use
        (an estimate; see :meth:`BlockManager.bookkeeping_bytes`)."""
        return bookkeeping_bytes(
            num_blocks, block_size, prefix_caching=self.prefix_caching, hash_algo=self.hash_algo
        )


def bookkeeping_bytes(
    num_blocks: int, block_size: int, *, prefix_caching: bool = True, hash_algo: str = "sha256"
) -> int:
    """Host bytes a manager of this size holds with every block in use (an estimate).

    The constructor allocates ~88 bytes per block; sequences and registered hashes add
    the rest as blocks fill (~440 bytes per block in all at ``block_size=16`` with
    prefix caching).
    """
    check_int(num_blocks, "num_blocks", minimum=1)
    check_int(block_size, "block_size", minimum=1)
    per_block = _EAGER_BYTES_PER_BLOCK + (17 * block_size) // 4
    if prefix_caching:
        digest_bytes = len(hash_function(check_str(hash_algo, "hash_algo"))(b""))
        per_block += _REGISTERED_BYTES_PER_BLOCK + digest_bytes + 4 * block_size
    return num_blocks * per_block
