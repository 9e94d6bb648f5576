"""Weight updates between steps: check and load a state dict in place, and the model
fingerprint the KV cache switches to (see :meth:`~pagedkv.Engine.update_weights`).

The cache's switch is O(1) (:meth:`~pagedkv.KVCache.set_model_fingerprint`); loading
is one in-place copy per tensor given, into the model's own storage, so CUDA graphs
captured on it stay valid.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from pagedkv.engine.identity import model_fingerprint

if TYPE_CHECKING:
    from pagedkv.cache import KVCache
    from pagedkv.engine.scheduler import Scheduler

#: what update_weights does with requests holding KV of the old weights
RUNNING_POLICIES = ("recompute", "continue")


def update(
    model: Any, cache: KVCache, scheduler: Scheduler, state_dict: Mapping[str, Any] | None,
    model_version: str | None, running: str,
) -> bool:  # fmt: skip
    """:meth:`Engine.update_weights` (its contract): check everything, load, restart or
    keep the requests holding KV, switch the fingerprint; whether it changed."""
    if running not in RUNNING_POLICIES:
        raise ValueError(f"running must be one of {RUNNING_POLICIES}, got {running!r}")
    if model_version is not None and not isinstance(model_version, str):
        raise TypeError(f"model_version must be a str or None, got {model_version!r}")
    if model_version == "":
        raise ValueError("model_version must not be empty (None: derive it from the weights)")
    tensors = None if state_dict is None else check_state_dict(model, state_dict)
    current = cache.model_fingerprint
    if model_version is not None:  # independent of the weights: known before loading
        fp = model_fingerprint(model, model_version)
        if fp == current:
            if tensors:
                raise ValueError(
                    f"model_version {model_version!r} is the current one: name new weights "
                    "with a new version"
                )
            return False
    if tensors:
        try:
            load_in_place(model, tensors)
        except BaseException:  # some tensors may be new: no KV cached so far may be reused
            _switch(cache, scheduler, f"{current}+{uuid.uuid4().hex[:16]}", running)
            raise
    if model_version is None:
        # Never one used before: the weights' sample may miss a partial update, or come
        # back to an earlier fingerprint whose blocks are still registered.
        fp = f"{model_fingerprint(model)}+{uuid.uuid4().hex[:16]}"
    return _switch(cache, scheduler, fp, running)


def _switch(cache: KVCache, scheduler: Scheduler, fingerprint: str, running: str) -> bool:
    if running == "recompute":
        scheduler.recompute_all()
    if scheduler.repeats is not None:  # stored logits are the old weights' (unmatchable
        scheduler.repeats.clear()  # under the new fingerprint anyway: free their memory)
    return cache.set_model_fingerprint(fingerprint)


def check_state_dict(model: Any, state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of ``state_dict`` that ``model`` has (a subset of its parameters and
    buffers is allowed: the others keep their values), checked before anything is
    loaded: ``KeyError`` naming unknown keys, ``TypeError`` for a non-tensor,
    ``ValueError`` for a shape or a floating/integer kind that does not match."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}"
        )
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(model.named_buffers(remove_duplicate=False))
    unknown = [k for k in state_dict if k not in own]
    if unknown:
        raise KeyError(
            f"state_dict has {len(unknown)} name(s) the model does not have, e.g. "
            f"{unknown[:3]}; names look like {list(own)[:3]}"
        )
    checked = {}
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            kind = type(value).__name__
            raise TypeError(f"state_dict[{name!r}] must be a torch.Tensor, got {kind}")
        target = own[name]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"state_dict[{name!r}] has shape {tuple(value.shape)}; the model's is "
                f"{tuple(target.shape)}"
            )
        if value.is_floating_point() != target.is_floating_point():
            raise ValueError(
                f"state_dict[{name!r}] is {value.dtype}; the model's is {target.dtype}"
            )
        checked[name] = value
    return checked


def load_in_place(model: Any, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (checked by :func:`check_state_dict`) into the model's storage."""
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(model.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value)


class WeightsAPI:
    """The Engine's :meth:`update_weights` (a part of :class:`~pagedkv.Engine`)."""

    model: Any
    cache: KVCache
    scheduler: Scheduler

    if TYPE_CHECKING:  # Engine's

        def _check_open(self) -> None: ...

    def update_weights(
        self, state_dict: Mapping[str, Any] | None = None, *, model_version: str | None = None,
        running: str = "recompute",
    ) -> bool:  # fmt: skip
        """New weights between steps: load ``state_dict`` in place (some or all of the
        model's names; ``None``: you changed the weights already) and switch the cache's
        model fingerprint in O(1): no KV of the old weights is used again (device, tiers,
        snapshots; see :meth:`KVCache.set_model_fingerprint`). ``model_version``: the new
        weights' identity (processes loading the same one share tier entries); default:
        derived from the weights and made unique. ``running="recompute"`` restarts the
        requests holding KV (tokens generated so far stay); ``"continue"``: they go on
        over their old KV. Retained requests keep theirs, which :meth:`snapshot` refuses.
        Returns whether the fingerprint changed (``False``: the current ``model_version``
        and no state dict). Bad arguments raise before anything is loaded."""
        self._check_open()
        return update(self.model, self.cache, self.scheduler, state_dict, model_version, running)
