"""transformers integration: the "pagedkv" attention/mask functions, PagedCache and
the model support check.

>>> from pagedkv.integrations.transformers import PagedCache
>>> out = model.generate(**inputs, past_key_values=PagedCache(model), max_new_tokens=32)

Implementation lives in :mod:`.attention` (attention + mask functions, metadata),
:mod:`.cache` (``PagedCache``) and :mod:`.support` (which models run).
"""

from __future__ import annotations

from pagedkv.integrations.attention import (
    ATTN_NAME,
    PagedAttentionMetadata,
    paged_attention_forward,
    paged_mask,
    register,
    use_paged_attention,
)
from pagedkv.integrations.cache import PagedCache
from pagedkv.integrations.support import (
    SUPPORTED_MODEL_TYPES,
    check_model_supported,
    kv_geometry,
)

__all__ = [
    "ATTN_NAME",
    "SUPPORTED_MODEL_TYPES",
    "PagedAttentionMetadata",
    "PagedCache",
    "check_model_supported",
    "kv_geometry",
    "paged_attention_forward",
    "paged_mask",
    "register",
    "use_paged_attention",
]
