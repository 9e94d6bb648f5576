"""transformers integration: the "pagedkv" attention/mask functions, PagedCache and
the model support check.

>>> from pagedkv.integrations.transformers import PagedCache
>>> out = model.generate(**inputs, cache=PagedCache(model), max_new_tokens=32)

(``past_key_values=`` before transformers 5.24: ``cache_kwarg(model)`` gives the name.)
Implementation lives in :mod:`.attention` (attention + mask functions, metadata, the
per-forward switch), :mod:`.cache` (``PagedCache``) and :mod:`.support` (which models
run).
"""

from __future__ import annotations

from pagedkv.integrations.attention import (
    ATTN_NAME,
    PagedAttention,
    PagedAttentionMetadata,
    cache_kwarg,
    paged_attention_forward,
    paged_mask,
    register,
)
from pagedkv.integrations.cache import PagedCache
from pagedkv.integrations.support import (
    SUPPORTED_MODEL_TYPES,
    TESTED_MODEL_TYPES,
    ModelSupport,
    check_model_supported,
    kv_geometry,
)

__all__ = [
    "ATTN_NAME",
    "SUPPORTED_MODEL_TYPES",
    "TESTED_MODEL_TYPES",
    "ModelSupport",
    "PagedAttention",
    "PagedAttentionMetadata",
    "PagedCache",
    "cache_kwarg",
    "check_model_supported",
    "kv_geometry",
    "paged_attention_forward",
    "paged_mask",
    "register",
]
