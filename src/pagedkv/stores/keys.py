"""Content-addressed page keys: ``<sha256 hex of the bytes>.pg``, written once here.

Snapshots store each page (a block's K and V bytes) under the SHA-256 of its bytes,
so equal pages are stored once; :class:`~pagedkv.stores.packs.PackStore` packs exactly
these keys. (Offload tiers key blocks by their chained prefix hash instead:
:meth:`pagedkv.tiers.TieredStore.key`.)
"""

from __future__ import annotations

import hashlib

import numpy as np

from pagedkv.stores.base import Buffer

PAGE_SUFFIX = ".pg"
DIGEST_HEX_LEN = 64
PAGE_KEY_LEN = DIGEST_HEX_LEN + len(PAGE_SUFFIX)
_HEX = frozenset("0123456789abcdef")


def sha256_hex(data: Buffer | np.ndarray) -> str:
    """The SHA-256 hex digest of ``data``: a page's content address. Releases the GIL,
    so rows hash in parallel on threads."""
    return hashlib.sha256(data.data if isinstance(data, np.ndarray) else data).hexdigest()


def page_key(digest: str) -> str:
    """The store key of the page with SHA-256 hex ``digest``."""
    return digest + PAGE_SUFFIX


def is_page_key(key: str) -> bool:
    """Whether ``key`` is a page key: 64 lowercase hex digits and ``.pg``."""
    return (
        len(key) == PAGE_KEY_LEN
        and key.endswith(PAGE_SUFFIX)
        and _HEX.issuperset(key[:DIGEST_HEX_LEN])
    )


def page_digest(key: str) -> str:
    """The hex digest a page key names (``key`` must be a page key)."""
    return key[:DIGEST_HEX_LEN]
