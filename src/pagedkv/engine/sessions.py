"""Parking and resuming conversations: the engine side of :class:`~pagedkv.SnapshotStore`.

A conversation is one cache sequence. To park it, submit its request with
``retain=True``: when it finishes, its sequence stays in the cache instead of being
freed. :meth:`Engine.snapshot` then saves it (and releases it, unless ``keep=True``);
:meth:`Engine.release` frees it without saving. Retained sequences hold their blocks
like running requests do (``stats().retained_seqs``); they are never evicted behind
your back. If they leave too little of the pool for the request at the head of the
queue while nothing runs, that request fails with ``finish_reason="error"`` and an
error saying to release them (the engine never waits for blocks no one will free).

What a snapshot holds: the sequence's tokens whose KV is written (the conversation so
far, minus the last sampled token) and their KV pages, plus under the metadata key
``"pagedkv.engine"``: that last token (``next_token``), the request's sampling
params, its prompt length, generated count, finish reason, decoded text (with a
tokenizer) and, for seeded sampling, the generator state.

:meth:`Engine.resume` loads the sequence into the engine's cache under a new request
id, and queues a request whose prompt is the whole history: saved tokens +
``next_token`` + ``more_prompt``. Only the tokens without KV (``next_token`` and the
new prompt) are computed. With the same model, greedy decoding and batch-invariant
kernels, the continuation is token-identical to never having stopped, in this engine
or in another one built on another machine from the same model, dtype and block size.

A request's ``cache_salt`` is its sequence's salt in the cache, so the snapshot keeps it
(in the manifest's sequence entry). :meth:`Engine.resume` needs the same
``cache_salt`` (``SnapshotError`` otherwise) and loads the KV under it: the restored
blocks serve prefix hits only to requests with that salt.

How the code is split: :class:`~pagedkv.Engine` owns its retained requests and queues
what this module gives back; the functions here take what they need as arguments (the
cache, a store, a :class:`~pagedkv.engine.submit.RequestFactory`) and never see the
engine, so ``engine`` imports ``sessions`` and not the other way round.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, TypeAlias

import torch

from pagedkv.cache import KVCache
from pagedkv.engine.request import Request, SamplingParams
from pagedkv.engine.submit import RequestFactory
from pagedkv.errors import OutOfBlocks, SnapshotError
from pagedkv.snapshot import SnapshotInfo, SnapshotStore
from pagedkv.snapshot.manifest import describe_layout, layout_dict

META_KEY = "pagedkv.engine"
META_VERSION = 1

StoreSpec: TypeAlias = str | os.PathLike[str] | SnapshotStore


@contextmanager
def open_store(store: StoreSpec | None, default: StoreSpec | None) -> Iterator[SnapshotStore]:
    """``store`` (or the engine's ``default``) as a SnapshotStore; one opened here from a
    path or URL is closed on exit, a SnapshotStore passed in is left open."""
    spec = default if store is None else store
    if spec is None:
        raise ValueError(
            "no snapshot store: pass store= (a directory, a redis:// URL or a SnapshotStore) "
            "or build the engine with Engine(..., snapshot_store=...)"
        )
    if isinstance(spec, SnapshotStore):
        yield spec
        return
    with SnapshotStore(spec) as opened:
        yield opened


def snapshot_metadata(
    req: Request, text: str | None, metadata: dict[str, Any] | None
) -> dict[str, Any]:
    """The metadata a snapshot of finished request ``req`` is saved with: the user's
    ``metadata`` and, under :data:`META_KEY`, what :func:`resume` needs (``ValueError``
    if the user's metadata uses that key). ``text``: the request's decoded output."""
    user = dict(metadata or {})
    if META_KEY in user:
        raise ValueError(f"metadata key {META_KEY!r} is reserved for the engine")
    gen = req.generator
    meta = {
        "version": META_VERSION,
        "next_token": req.output[-1],
        "prompt_len": len(req.prompt),
        "num_generated": len(req.output),
        "finish_reason": req.finish_reason,
        "sampling": asdict(req.params),
        "text": text,
        "generator": None if gen is None else base64.b64encode(_state(gen)).decode(),
        "generator_device": None if gen is None else gen.device.type,
    }
    return {**user, META_KEY: meta}


def save(
    store: SnapshotStore,
    cache: KVCache,
    req: Request,
    name: str | None,
    metadata: dict[str, Any],
    overwrite: bool,
) -> SnapshotInfo:
    """Save finished request ``req``'s sequence with ``metadata`` (from
    :func:`snapshot_metadata`). ``SnapshotError`` if its KV is an earlier model's (it
    was computed before :meth:`Engine.update_weights`): saved under the new fingerprint
    it would be served as the new model's."""
    if cache.manager.generation_of(req.seq_id) != cache.manager.generation:
        raise SnapshotError(
            f"request {req.request_id} holds KV computed before the weights were updated; "
            "it cannot be saved under the new model (release() it and generate again)"
        )
    tokens = cache.token_ids(req.seq_id)
    # the cache holds every token but the last sampled one, whose KV is not written yet
    assert tokens == req.all_tokens[:-1], (len(tokens), req.num_tokens)
    return store.save(cache, [req.seq_id], name, metadata, overwrite=overwrite)


def resume(
    store: SnapshotStore,
    name: str,
    more_prompt: str | Sequence[int],
    params: SamplingParams | None,
    *,
    cache: KVCache,
    factory: RequestFactory,
    new_id: Callable[[], int],
    retain: bool,
    cache_salt: str | bytes | None,
    num_retained: int,
) -> Request:
    """Load snapshot ``name`` into ``cache`` under a new request id (from ``new_id()``)
    and return the request that continues it, not queued yet (see
    :meth:`~pagedkv.engine.scheduler.Scheduler.add_resident`): its prompt is the saved
    history + the saved next token + ``more_prompt``, its KV resident up to that token.
    ``cache_salt`` must equal the snapshot's; ``num_retained`` is for the error message
    when the pool has no room. Nothing changes when it raises."""
    manifest = store.manifest(name)
    meta = engine_metadata(
        manifest, name, cache, META_KEY, META_VERSION, sequences=(1,),
        saved_by="Engine.snapshot", what="engine metadata",
        otherwise="; restore it with SnapshotStore.load(engine.cache, ...)",
    )  # fmt: skip
    entry = manifest.sequences[0]
    try:
        saved = SamplingParams(**meta["sampling"])
        next_token = int(meta["next_token"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"snapshot {name!r} has malformed engine metadata: {exc}") from None
    history = [*entry.token_ids, next_token, *_more_ids(more_prompt, factory.tokenizer)]
    req = factory.make_request(history, params or saved, retain=retain, cache_salt=cache_salt)
    if entry.salt != req.cache_salt:
        # the sequence's KV lives in its salt's namespace: another salt must not reach it
        raise SnapshotError(
            f"snapshot {name!r} was saved in another cache_salt namespace than "
            f"{'the shared one (cache_salt=None)' if cache_salt is None else 'the given one'}"
            "; resume it with the cache_salt of the request that made it"
        )
    _restore_generator(req, saved, meta)
    req.request_id = new_id()
    load_sequence(store, cache, name, entry, req.seq_id,
                  f", or release() retained ones ({num_retained} held)")  # fmt: skip
    req.num_computed = req.num_allocated = req.num_cached_tokens = entry.num_tokens
    return req


def _more_ids(more_prompt: object, tokenizer: Any) -> list[int]:
    if isinstance(more_prompt, str):
        if tokenizer is None:
            raise ValueError("a string more_prompt needs a tokenizer: Engine(model, tokenizer)")
        return list(tokenizer(more_prompt, add_special_tokens=False)["input_ids"])
    if isinstance(more_prompt, Iterable):
        return list(more_prompt)  # its ids are checked with the history
    raise TypeError(f"more_prompt must be a str or token ids, got {type(more_prompt).__name__}")


def _state(gen: torch.Generator) -> bytes:
    return bytes(gen.get_state().numpy().tobytes())


def _restore_generator(req: Request, saved: SamplingParams, meta: dict[str, Any]) -> None:
    """Continue the saved random stream when resuming with the same seed on the same
    kind of device: seeded sampling then also continues as if never stopped."""
    state, device = meta.get("generator"), meta.get("generator_device")
    gen = req.generator
    if gen is None or state is None or req.params.seed is None or req.params.seed != saved.seed:
        return
    if device != gen.device.type:
        return
    raw = base64.b64decode(state)
    gen.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def engine_metadata(
    manifest: Any, name: str, cache: KVCache, key: str, version: int, *,
    sequences: tuple[int, ...], saved_by: str, what: str, otherwise: str = "",
) -> dict[str, Any]:  # fmt: skip
    """The ``key`` metadata of snapshot ``name`` that an engine saved (``saved_by``), after
    checking it: a dict, ``len(manifest.sequences)`` one of ``sequences``, the ``version``
    this pagedkv reads, the model and KV layout of ``cache``; ``SnapshotError`` saying
    which does not hold (``what`` names the metadata, ``otherwise`` ends the first error)."""
    meta = manifest.metadata.get(key)
    if not isinstance(meta, dict) or len(manifest.sequences) not in sequences:
        count = " or ".join(map(str, sequences))
        raise SnapshotError(
            f"snapshot {name!r} was not saved by {saved_by} (no {key!r} metadata, or not "
            f"{count} sequence(s)){otherwise}"
        )
    if meta.get("version") != version:
        raise SnapshotError(
            f"snapshot {name!r} has {what} version {meta.get('version')!r}; this pagedkv "
            f"reads version {version}"
        )
    if manifest.fingerprint != cache.fingerprint:
        raise SnapshotError(
            f"snapshot {name!r} was saved from model {manifest.model!r} with KV layout "
            f"[{describe_layout(manifest.layout)}], but this engine runs "
            f"{cache.model_fingerprint!r} with [{describe_layout(layout_dict(cache.layout))}]; "
            "resume it on an engine with the same model, dtype and block_size"
        )
    return meta


def load_sequence(
    store: SnapshotStore, cache: KVCache, name: str, entry: Any, seq_id: int, hint: str = ""
) -> None:
    """Load sequence ``entry`` of snapshot ``name`` into ``cache`` as ``seq_id``; without
    room, ``OutOfBlocks`` saying how many blocks it needs (``hint``: more ways to make
    room). Nothing changes when it raises."""
    try:
        store.load(cache, name, {entry.seq_id: seq_id})
    except OutOfBlocks as exc:
        raise OutOfBlocks(
            f"no room to resume snapshot {name!r}: it needs {len(entry.pages)} KV blocks and "
            f"{cache.num_free_blocks} are free; let running requests finish{hint}"
        ) from exc
