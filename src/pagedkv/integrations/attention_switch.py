"""Which attention a model's configs name while paged forwards run, and what a forward
that is not paged runs instead.

transformers picks the attention function from the config's ``_attn_implementation`` at every
layer call. :func:`switch_on` sets the configs of one model to "pagedkv" for a paged
forward and :func:`switch_off` restores them: the first paged forward that enters
switches a config, the last that leaves restores it exactly (two threads may run paged
forwards of one model). Meanwhile a plain forward that meets "pagedkv" (another
thread's, or a config set to it by hand) runs :func:`fallback_implementation`: the
implementation the config had before, else :data:`DEFAULT_FALLBACK`.

Each config's own ``_attn_implementation_internal`` is read and written (the value
behind transformers' ``_attn_implementation`` property, whose setter also rewrites the
sub-configs; those are switched and restored as configs of their own here).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

ATTN_NAME = "pagedkv"
#: The attention used by a "pagedkv" model outside paged forwards when nothing else is
#: known (transformers' own default).
DEFAULT_FALLBACK = "sdpa"

# Entries exist only while a paged forward runs; the saved value is also what a plain
# forward meeting "pagedkv" in the meantime delegates to.
_switch_lock = threading.Lock()
_switched: dict[int, list[Any]] = {}  # id(config) -> [config, saved implementation, depth]


def attention_configs(model: torch.nn.Module) -> list[Any]:
    """The distinct configs the model's modules read ``_attn_implementation`` from;
    ``TypeError`` when there is none (not a transformers model)."""
    seen: dict[int, Any] = {}
    for m in model.modules():
        cfg = m.__dict__.get("config")  # a plain attribute; skips Module.__getattr__
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            seen.setdefault(id(cfg), cfg)
    if not seen:
        raise TypeError(
            f"{type(model).__name__} has no transformers config: PagedAttention needs a "
            "transformers PreTrainedModel"
        )
    return list(seen.values())


def switch_on(configs: Sequence[Any]) -> None:
    """Point ``configs`` at the "pagedkv" attention (pair every call with :func:`switch_off`)."""
    with _switch_lock:
        for cfg in configs:
            entry = _switched.get(id(cfg))
            if entry is None:
                _switched[id(cfg)] = [cfg, cfg._attn_implementation_internal, 1]
            else:
                entry[2] += 1
            cfg._attn_implementation_internal = ATTN_NAME


def switch_off(configs: Sequence[Any]) -> None:
    """Undo the matching :func:`switch_on` (the last one out restores each config)."""
    with _switch_lock:
        for cfg in configs:
            entry = _switched.get(id(cfg))
            if entry is None:
                continue
            entry[2] -= 1
            if entry[2] == 0:
                cfg._attn_implementation_internal = entry[1]
                del _switched[id(cfg)]


def fallback_implementation(config: Any) -> str:
    """What a non-paged forward of a "pagedkv" model runs: the implementation the model
    had before the paged forward now running switched it, else :data:`DEFAULT_FALLBACK`."""
    entry = _switched.get(id(config))
    saved = entry[1] if entry is not None else None
    if saved is None or saved == ATTN_NAME or not isinstance(saved, str):
        return DEFAULT_FALLBACK
    return saved


def fallback_attention(module: torch.nn.Module) -> Callable[..., Any]:
    """The attention function a non-paged call of ``module`` goes to."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = fallback_implementation(getattr(module, "config", None))
    if impl == "eager":  # not registered: each modeling file has its own eager function
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            return eager
        impl = DEFAULT_FALLBACK
    return ALL_ATTENTION_FUNCTIONS.get_interface(impl, ALL_ATTENTION_FUNCTIONS["sdpa"])


def paged_mask(**kwargs: Any) -> Any:
    """Mask function registered for "pagedkv": the fallback implementation's mask.

    Paged forwards never reach it (they hand transformers a prepared 4D placeholder,
    which is used as-is, see :meth:`PagedAttention.no_mask
    <pagedkv.integrations.attention.PagedAttention.no_mask>`): causality and padding are
    the kernels' job there. It runs only for plain forwards of a model whose config says
    "pagedkv", which must get exactly the mask their fallback attention expects.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    impl = fallback_implementation(kwargs.get("config"))
    if impl not in ALL_MASK_ATTENTION_FUNCTIONS:
        return None  # transformers builds no mask for such implementations either
    return ALL_MASK_ATTENTION_FUNCTIONS[impl](**kwargs)
