"""Chained block hashes: the identity of a full block of tokens.

``h_i = H(h_{i-1} || namespace || tokens_i)`` over full blocks only. ``H`` is SHA-256
by default (xxh3-128 on request); token ids are packed as little-endian uint32, so a
hash is identical across processes, machines and Python versions (never Python's
``hash()``, never a per-process seed). The namespace folds in the cache salt (tenant
isolation) and extra keys (model fingerprint, adapter id): KV is never shared across
them.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Callable, Iterable, Sequence, Sized

#: Parent of the first block of every sequence.
ROOT = b"\x00" * 16

HASH_ALGOS: dict[str, Callable[[bytes], bytes]] = {
    "sha256": lambda data: hashlib.sha256(data).digest(),
}
try:  # xxhash is a declared dependency, but keep the manager importable without it
    import xxhash

    HASH_ALGOS["xxh3_128"] = xxhash.xxh3_128_digest
except ImportError:  # pragma: no cover
    pass

_BIG_ENDIAN = sys.byteorder == "big"
_MAX_TOKEN = 2**32 - 1


def hash_function(name: str) -> Callable[[bytes], bytes]:
    """The digest function registered as ``name`` (``"sha256"`` or ``"xxh3_128"``)."""
    try:
        return HASH_ALGOS[name]
    except KeyError:
        raise ValueError(
            f"hash_algo={name!r} is not available; choose one of {sorted(HASH_ALGOS)}"
        ) from None


def namespace(salt: object = None, extra_keys: Iterable[object] = ()) -> bytes:
    """16-byte digest of the salt and extra keys; blocks in different namespaces never match.

    ``salt`` and each extra key may be ``None``, ``str``, ``bytes`` or ``int``.
    """
    h = hashlib.sha256(b"pagedkv-ns-v1")
    for part in (salt, *extra_keys):
        if part is None:
            h.update(b"N")
        elif isinstance(part, bytes):
            h.update(b"B%d:" % len(part) + part)
        elif isinstance(part, str):
            raw = part.encode()
            h.update(b"S%d:" % len(raw) + raw)
        elif isinstance(part, int) and not isinstance(part, bool):
            h.update(b"I%d;" % part)
        else:
            raise TypeError(
                f"salt and extra_keys must be None, str, bytes or int; got {type(part).__name__}"
            )
    return h.digest()[:16]


def as_token_array(token_ids: object, name: str = "token_ids") -> array:
    """Validate token ids and pack them as a uint32 array (C speed on the good path).

    Raises ``TypeError`` for a non-sequence or a non-int element and ``ValueError`` for
    a negative id or one that does not fit 32 bits, naming the offending element.
    """
    if type(token_ids) is list:  # the common case: skip the type checks below
        try:
            return array("I", token_ids) if not _BIG_ENDIAN else _le(array("I", token_ids))
        except (TypeError, OverflowError):
            pass  # fall through to name the bad element
    if isinstance(token_ids, (str, bytes, bytearray, memoryview)) or not (
        isinstance(token_ids, Sized) and isinstance(token_ids, Iterable)
    ):
        raise TypeError(
            f"{name} must be a sequence of non-negative ints (e.g. a list), "
            f"got {type(token_ids).__name__}"
        )
    try:
        arr = array("I", token_ids)
    except (TypeError, OverflowError):
        for i, t in enumerate(token_ids):
            if isinstance(t, bool) or not hasattr(t, "__index__"):
                raise TypeError(
                    f"{name}[{i}] must be an int token id, got {type(t).__name__} ({t!r})"
                ) from None
            if not 0 <= int(t) <= _MAX_TOKEN:
                raise ValueError(
                    f"{name}[{i}] = {int(t)} is not a valid token id (must be in [0, 2**32))"
                ) from None
        raise
    return _le(arr) if _BIG_ENDIAN else arr


def _le(arr: array) -> array:  # pragma: no cover - hashes are over little-endian ids
    arr.byteswap()
    return arr


def chain_hashes(
    tokens: Sequence[int] | array,
    block_size: int,
    ns: bytes,
    digest: Callable[[bytes], bytes],
    parent: bytes = ROOT,
) -> list[bytes]:
    """Chained hashes of every full block of ``tokens`` (a pure function)."""
    raw = tokens.tobytes() if isinstance(tokens, array) else as_token_array(tokens).tobytes()
    step = 4 * block_size
    out = []
    for start in range(0, len(raw) - step + 1, step):
        parent = digest(parent + ns + raw[start : start + step])
        out.append(parent)
    return out
