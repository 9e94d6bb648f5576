"""Deprecated location of :class:`~pagedkv.stores.packs.PackStore` (moved to
:mod:`pagedkv.stores.packs`, beside the other block stores); kept so existing imports
work. Import it from :mod:`pagedkv.stores`."""

from pagedkv.stores.pack_format import PACK_DIR
from pagedkv.stores.packs import PackStore

__all__ = ["PACK_DIR", "PackStore"]
