"""PagedCache: a ``transformers.Cache`` whose K/V live in a pagedkv block pool.

``model.generate(..., cache=PagedCache(model))`` (``past_key_values=`` before
transformers 5.24; :func:`~pagedkv.integrations.attention.cache_kwarg` says which) runs
plain batched generation (greedy or sampling) on the pool. Each batch row is one paged
sequence; left padding is neither stored nor attended, so outputs equal those of the
default cache. ``copy.deepcopy`` forks every row (copy-on-write), for transformers'
prompt-reuse recipe.

How a forward becomes paged: the cache puts a forward pre-hook and an always-called
forward hook on the model it was made for. A forward of that model that carries *this*
cache gets its :class:`~pagedkv.integrations.attention.PagedAttentionMetadata` built
from the input and padding mask (blocks are reserved here), passed as the
``pagedkv_metadata`` kwarg, and runs inside
:class:`~pagedkv.integrations.attention.PagedAttention` (the model's attention is
switched for that forward only). Every other forward is untouched. ``close()``, or
dropping the cache, removes the hooks and frees the cache's sequences.
"""

from __future__ import annotations

import itertools
import weakref
from array import array
from collections.abc import Callable
from typing import Any

import torch

from pagedkv._extras import optional_imports
from pagedkv.integrations.attention import (
    PagedAttention,
    PagedAttentionMetadata,
    forward_params,
)
from pagedkv.integrations.cache_rows import CacheRows, PagedLayer, check_kv_cache, make_kv_cache
from pagedkv.integrations.support import check_model_supported

with optional_imports(__name__):
    from transformers.cache_utils import Cache

_uids = itertools.count()


class PagedCache(Cache):
    """A transformers ``Cache`` backed by a paged :class:`pagedkv.KVCache`.

    ``PagedCache(model, num_blocks=None, block_size=16)`` checks the model is supported
    and allocates a pool on the model's device and dtype (``num_blocks`` defaults to
    1024; the pool does not grow, so size it for batch x ceil((prompt + new tokens) /
    block_size)); ``kv_dtype="fp8"`` (or ``"fp8_e5m2"``, ``"int8"``) stores the KV
    quantized (:class:`~pagedkv.storage.KVLayout`). ``kv_cache=``: use an existing
    :class:`~pagedkv.KVCache` of the same geometry instead (its prefix caching must be
    off: token ids are not known here).
    The model is not changed: its attention is switched only inside forwards that carry
    this cache. Raises :class:`~pagedkv.errors.UnsupportedModelError` for unsupported
    models and ``NotImplementedError`` for beam search (``num_beams > 1``), which needs
    cache reordering. :meth:`reset` frees the sequences for a new ``generate()``;
    :meth:`close` (or dropping the object) also detaches it from the model.
    """

    def __init__(
        self,
        model: Any,
        *,
        num_blocks: int | None = None,
        block_size: int = 16,
        kv_cache: Any = None,
        kv_dtype: Any = None,
    ) -> None:
        if model is None or not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"PagedCache needs the transformers model it serves, got {type(model).__name__}"
            )
        check_model_supported(model)
        if kv_cache is None:
            kv_cache = make_kv_cache(model, num_blocks, block_size, kv_dtype)
        else:
            if kv_dtype is not None:
                raise ValueError("pass kv_dtype or kv_cache (whose layout has its kv_dtype)")
            check_kv_cache(model, kv_cache)
        self._setup(model, kv_cache, CacheRows(kv_cache, PagedAttention(model), next(_uids)))

    def _setup(self, model: Any, kv_cache: Any, live: CacheRows, seen: int = 0) -> None:
        super().__init__(layers=[PagedLayer() for _ in range(model.config.num_hidden_layers)])
        self.kv_cache = kv_cache
        self._model = model
        self._live = live
        self._seen = seen  # columns (padding included) processed so far
        self._broken: str | None = None  # why the cache cannot continue (failed forward)
        self._pending = 0  # columns of the forward in progress
        live.handles = [
            model.register_forward_pre_hook(_weak_hook(self._before_forward), with_kwargs=True),
            model.register_forward_hook(_weak_hook(self._after_forward), always_call=True),
        ]
        self._finalizer = weakref.finalize(self, live.release)

    # -- what transformers calls ------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Return k/v unchanged: the paged attention function writes them into the pool
        (it knows which rows are padding). Refuses forwards that are not paged."""
        if not self._live.in_forward:
            raise RuntimeError(
                "this PagedCache is used in a forward that is not paged: pass it to the "
                "model it was created with (model.generate(..., cache=...) or model(...)); "
                "it cannot serve another model or a submodule"
                + ("" if self._finalizer.alive else ", and it is closed")
            )
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns processed so far (padding included, as transformers counts them)."""
        return self._seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length()

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    def reset(self) -> None:
        """Free every sequence's blocks; the cache can be used for a new generate()."""
        self._live.end_forward()
        self._live.free_rows()
        self._seen, self._broken = 0, None

    def close(self) -> None:
        """Free the sequences and remove the hooks from the model (idempotent). The
        same happens when the cache is garbage-collected."""
        self._finalizer()

    def __enter__(self) -> PagedCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- copies -----------------------------------------------------------------------
    def __deepcopy__(self, memo: dict) -> PagedCache:
        """An independent cache on the same pool whose rows fork this cache's sequences:
        blocks are shared (no KV copied) until one side writes into a shared, partly
        filled block (copy-on-write). This cache is unchanged."""
        self._check_usable("deep-copied")
        if self._live.in_forward:
            raise RuntimeError("a PagedCache cannot be copied inside a forward")
        rows = self._live.fork(next(_uids))  # raises having freed what it forked
        twin = PagedCache.__new__(PagedCache)
        twin._setup(self._model, self.kv_cache, rows, self._seen)  # checked when made
        memo[id(self)] = twin
        return twin

    def __copy__(self):
        raise TypeError(
            "a shallow copy of a PagedCache would share its sequences; use copy.deepcopy "
            "(copy-on-write fork of every row)"
        )

    def __reduce_ex__(self, protocol):
        raise TypeError("a PagedCache cannot be pickled: its KV lives in a device pool")

    # -- unsupported generation modes -------------------------------------------------
    def _unsupported(self, what: str):
        raise NotImplementedError(
            f"PagedCache does not support {what} (beam search / num_beams > 1, "
            "contrastive or assisted decoding); use greedy or sampling, or the default cache"
        )

    def reorder_cache(self, beam_idx) -> None:
        self._unsupported("reordering the batch")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._unsupported("repeating batch rows")

    def batch_select_indices(self, indices) -> None:
        self._unsupported("selecting batch rows")

    def crop(self, max_length: int) -> None:
        self._unsupported("cropping")

    # -- one paged forward ------------------------------------------------------------
    def _check_usable(self, what: str) -> None:
        if not self._finalizer.alive:
            raise RuntimeError(f"this PagedCache is closed and cannot be {what}")
        if self._broken is not None:
            raise RuntimeError(
                f"this PagedCache cannot be {what}: {self._broken}; call reset() to reuse it"
            )

    def _before_forward(self, module: Any, args: tuple, kwargs: dict) -> Any:
        if args:  # name positional arguments, so that the cache and mask are found
            kwargs = {**dict(zip(forward_params(module), args)), **kwargs}
            args = ()
        if _forward_cache(kwargs) is not self:
            return None  # not this cache's forward: untouched
        return self._begin(args, kwargs)

    def _after_forward(self, module: Any, args: tuple, output: Any) -> None:
        # An always-called hook gets no output when the forward raised.
        self._end(ok=output is not None)

    def _begin(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Reserve this forward's slots, build its metadata, switch the attention."""
        live = self._live
        if live.in_forward:  # the previous forward was interrupted (KeyboardInterrupt)
            live.end_forward()
            self._broken = "its previous forward did not finish"
        self._check_usable("used for another forward")
        ids = kwargs.get("input_ids")
        x = ids if ids is not None else kwargs.get("inputs_embeds")
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError("a PagedCache forward needs input_ids [B, L] or inputs_embeds")
        bsz, q_len = x.shape[0], x.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            raise ValueError(
                "PagedCache needs the 2D padding mask [batch, past + new tokens] (or none); "
                "a prepared 4D mask cannot be run on the paged kernels"
            )
        meta = self._metadata(mask, bsz, q_len, x.device)
        kwargs = dict(kwargs, attention_mask=live.paged.no_mask(x.device), pagedkv_metadata=meta)
        self._pending = q_len
        live.paged.enter()
        live.in_forward = True
        return args, kwargs

    def _end(self, ok: bool) -> None:
        live = self._live
        if not live.in_forward:
            return
        live.end_forward()
        if ok:
            self._seen += self._pending
        else:  # some layers may have written this step's KV, others not
            self._broken = "a forward failed after reserving its KV slots"

    def _metadata(self, attention_mask, bsz: int, q_len: int, device) -> PagedAttentionMetadata:
        live = self._live
        if not live.lens:
            live.lens = [0] * bsz
        elif len(live.lens) != bsz:
            self._unsupported(f"a batch size change ({len(live.lens)} -> {bsz})")
        if attention_mask is not None:
            real = attention_mask[:, -q_len:].to(torch.bool)
            counts = real.sum(1).tolist()
            token_index = None if all(c == q_len for c in counts) else real.flatten().nonzero()
            if token_index is not None:
                token_index = token_index.squeeze(1)
        else:
            counts, token_index = [q_len] * bsz, None
        cache = self.kv_cache
        bs = cache.block_size
        need = sum(-(-(have + n) // bs) - -(-have // bs) for have, n in zip(live.lens, counts))
        if need > cache.num_free_blocks:
            from pagedkv.errors import OutOfBlocks

            raise OutOfBlocks(
                f"PagedCache needs {need} more KV blocks for this step but the pool has "
                f"{cache.num_free_blocks} free of {cache.num_blocks}; create it with a larger "
                "num_blocks (batch x ceil((prompt + new tokens) / block_size))"
            )
        if q_len == 1 and live.lens and all(live.lens) and all(c == 1 for c in counts):
            slots, tables = self._decode_step(cache)
        else:
            slots, tables = self._grow(cache, counts)
        width = max(1, max(len(t) for t in tables))
        ints = array("i")  # the int32 metadata: tables (zero-padded), lengths, cu_seqlens
        for t in tables:
            ints.extend(t)
            if len(t) < width:
                ints.extend([0] * (width - len(t)))
        n_tab, n_seq = len(ints), bsz
        ints.extend(live.lens)
        ints.extend(itertools.accumulate(counts, initial=0))
        # in one host-to-device copy (pinned on CUDA: no staging); array -> tensor
        # without a Python-int conversion per element
        host = torch.frombuffer(ints, dtype=torch.int32)
        host_slots = torch.frombuffer(array("q", slots), dtype=torch.int64) if slots else (
            torch.empty(0, dtype=torch.int64))  # fmt: skip
        if device.type == "cuda":
            host, host_slots = host.pin_memory(), host_slots.pin_memory()
        dev = host.to(device, non_blocking=True)
        return PagedAttentionMetadata(
            kv=cache.pool.kv,
            slots=host_slots.to(device, non_blocking=True),
            block_tables=dev[:n_tab].view(bsz, width),
            seq_lens=dev[n_tab : n_tab + n_seq],
            cu_seqlens_q=dev[n_tab + n_seq :],
            max_q_len=max(counts) if counts else 0,
            is_decode=q_len == 1 and all(c == 1 for c in counts),
            token_index=token_index,
            kv_scales=cache.pool.scales,
            static_kv_scales=cache.layout.static_scales,
            layers=live.layers,
        )

    def _grow(self, cache, counts: list[int]) -> tuple[list[int], list[list[int]]]:
        """Reserve ``counts[b]`` new tokens of each row: (their slots, the block tables)."""
        live = self._live
        slots: list[int] = []
        grown = 0
        try:
            for b, n in enumerate(counts):
                if n == 0:
                    continue
                sid, before = live.seq_id(b), live.lens[b]
                # Token ids are unknown here (the attention sees hidden states only), and
                # this pool has prefix caching off, so placeholder ids are harmless.
                if before == 0:
                    cache.allocate(sid, [0] * n)
                else:
                    cache.append(sid, [0] * n)
                slots.extend(cache.slot_mapping(sid, before, before + n))
                live.lens[b] = before + n
                grown += 1
        except BaseException:  # a copy-on-write copy did not fit: earlier rows grew
            if grown:
                self._broken = "a step ran out of KV blocks after some rows had grown"
            raise
        tables = [cache.block_table(live.seq_id(b)) if n else [] for b, n in enumerate(live.lens)]
        return slots, tables

    def _decode_step(self, cache) -> tuple[list[int], list[list[int]]]:
        """:meth:`_grow` by one token of every row, all rows holding tokens already (a
        decode step): one ``append_each``, slots read off the block tables."""
        live = self._live
        sids = live.seq_ids()
        try:
            cache.append_each(sids, [0] * len(sids))
        except BaseException:  # out of blocks part way: the rows before it grew
            before = live.lens
            live.lens = [cache.num_tokens(sid) for sid in sids]
            if live.lens != before:
                self._broken = "a step ran out of KV blocks after some rows had grown"
            raise
        bs = cache.block_size
        tables = [cache.block_table(sid) for sid in sids]
        slots = [t[n // bs] * bs + n % bs for t, n in zip(tables, live.lens)]
        live.lens = [n + 1 for n in live.lens]
        return slots, tables


def _forward_cache(kwargs: dict) -> Any:
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _weak_hook(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` as a model hook that does not keep its object alive (a cache must be
    collectable while its model lives); a no-op once the object is gone."""
    ref = weakref.WeakMethod(method)

    def hook(*args: Any) -> Any:
        bound = ref()
        return None if bound is None else bound(*args)

    return hook


__all__ = ["PagedCache"]
