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
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch

from pagedkv.engine import submit
from pagedkv.engine.request import Request, RequestOutput, SamplingParams
from pagedkv.errors import OutOfBlocks, SnapshotError
from pagedkv.snapshot import SnapshotInfo, SnapshotStore
from pagedkv.snapshot.manifest import describe_layout, layout_dict

if TYPE_CHECKING:
    from pagedkv.engine.engine import Engine

logger = logging.getLogger("pagedkv.engine")

META_KEY = "pagedkv.engine"
META_VERSION = 1

StoreSpec = str | os.PathLike[str] | SnapshotStore


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


def retained_request(engine: Engine, request: int | RequestOutput) -> Request:
    """The retained request behind an id or a RequestOutput; ``KeyError`` if there is none."""
    rid = request.request_id if isinstance(request, RequestOutput) else request
    req = engine._retained.get(rid)
    if req is None:
        raise KeyError(
            f"request {rid!r} is not retained: only a finished request submitted with "
            "retain=True (and not yet snapshotted or released) can be snapshotted; "
            f"retained now: {sorted(engine._retained)[:8]}"
        )
    return req


def release(engine: Engine, request: int | RequestOutput) -> None:
    """Free a retained request's sequence."""
    req = engine._retained.pop(retained_request(engine, request).request_id)
    engine.cache.free(req.seq_id)
    req.num_allocated = 0


def save(
    engine: Engine,
    request: int | RequestOutput,
    name: str | None,
    store: StoreSpec | None,
    metadata: dict[str, Any] | None,
    keep: bool,
    overwrite: bool,
) -> SnapshotInfo:
    """Save a retained request's sequence and the state needed to continue it; release
    it afterwards unless ``keep``."""
    req = retained_request(engine, request)
    user = dict(metadata or {})
    if META_KEY in user:
        raise ValueError(f"metadata key {META_KEY!r} is reserved for the engine")
    tokens = engine.cache.token_ids(req.seq_id)
    # the cache holds every token but the last sampled one, whose KV is not written yet
    assert tokens == req.all_tokens[:-1], (len(tokens), req.num_tokens)
    gen = req.generator
    meta = {
        "version": META_VERSION,
        "next_token": req.output[-1],
        "prompt_len": len(req.prompt),
        "num_generated": len(req.output),
        "finish_reason": req.finish_reason,
        "sampling": asdict(req.params),
        "text": engine._output(req).text,
        "generator": None if gen is None else base64.b64encode(_state(gen)).decode(),
        "generator_device": None if gen is None else gen.device.type,
    }
    with open_store(store, engine.snapshot_store) as target:
        info = target.save(
            engine.cache, [req.seq_id], name, {**user, META_KEY: meta}, overwrite=overwrite
        )
    if not keep:
        release(engine, req.request_id)
    return info


def resume(
    engine: Engine,
    name: str,
    more_prompt: str | Sequence[int],
    params: SamplingParams | None,
    store: StoreSpec | None,
    retain: bool,
    cache_salt: str | bytes | None = None,
) -> Request:
    """Load snapshot ``name`` into the cache and queue the request that continues it,
    under the snapshot's cache salt (``cache_salt`` must equal it)."""
    with open_store(store, engine.snapshot_store) as target:
        return _resume(engine, name, more_prompt, params, target, retain, cache_salt)


def _resume(engine, name, more_prompt, params, store: SnapshotStore, retain, cache_salt) -> Request:
    manifest = store.manifest(name)
    meta = manifest.metadata.get(META_KEY)
    if not isinstance(meta, dict) or len(manifest.sequences) != 1:
        raise SnapshotError(
            f"snapshot {name!r} was not saved by Engine.snapshot (no {META_KEY!r} metadata "
            "or not exactly one sequence); restore it with SnapshotStore.load(engine.cache, ...)"
        )
    if meta.get("version") != META_VERSION:
        raise SnapshotError(
            f"snapshot {name!r} has engine metadata version {meta.get('version')!r}; this "
            f"pagedkv resumes version {META_VERSION}"
        )
    cache = engine.cache
    if manifest.fingerprint != cache.fingerprint:
        raise SnapshotError(
            f"snapshot {name!r} was saved from model {manifest.model!r} with KV layout "
            f"[{describe_layout(manifest.layout)}], but this engine runs "
            f"{cache.model_fingerprint!r} with [{describe_layout(layout_dict(cache.layout))}]; "
            "resume it on an engine with the same model, dtype and block_size"
        )
    entry = manifest.sequences[0]
    try:
        saved = SamplingParams(**meta["sampling"])
        next_token = int(meta["next_token"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"snapshot {name!r} has malformed engine metadata: {exc}") from None
    if isinstance(more_prompt, str):
        if engine.tokenizer is None:
            raise ValueError("a string more_prompt needs a tokenizer: Engine(model, tokenizer)")
        more = engine.tokenizer(more_prompt, add_special_tokens=False)["input_ids"]
    elif isinstance(more_prompt, Iterable):
        more = list(more_prompt)  # its ids are checked with the history below
    else:
        raise TypeError(f"more_prompt must be a str or token ids, got {type(more_prompt).__name__}")
    history = [*entry.token_ids, next_token, *more]
    req = submit.make_request(
        engine, history, params or saved, retain=retain, cache_salt=cache_salt
    )
    if entry.salt != req.cache_salt:
        # the sequence's KV lives in its salt's namespace: another salt must not reach it
        raise SnapshotError(
            f"snapshot {name!r} was saved in another cache_salt namespace than "
            f"{'the shared one (cache_salt=None)' if cache_salt is None else 'the given one'}"
            "; resume it with the cache_salt of the request that made it"
        )
    _restore_generator(req, saved, meta)
    req.request_id = next(engine._ids)
    try:
        store.load(cache, name, {entry.seq_id: req.seq_id})
    except OutOfBlocks as exc:
        raise OutOfBlocks(
            f"no room to resume snapshot {name!r}: it needs {len(entry.pages)} KV blocks and "
            f"{cache.num_free_blocks} are free; let running requests finish, or release() "
            f"retained ones ({len(engine._retained)} held)"
        ) from exc
    req.num_computed = req.num_allocated = req.num_cached_tokens = entry.num_tokens
    counters = engine.scheduler.counters
    counters.prompt_tokens += len(history)
    counters.cached_tokens += entry.num_tokens
    engine._requests[req.request_id] = req
    # to the front: it already holds its blocks, so it should use them rather than idle
    engine.scheduler.add(req, front=True)
    engine._num_requests += 1
    return req


def fail_starved(engine: Engine) -> list[RequestOutput]:
    """Fail the head of the queue when nothing runs and the pool cannot admit it."""
    req = engine.scheduler.waiting[0]
    held = sum(len(engine.cache.block_table(r.seq_id)) for r in engine._retained.values())
    req.finish_reason = "error"
    req.error = (
        f"out of KV blocks: the request needs more than the {engine.cache.num_free_blocks} "
        "free blocks and nothing is running to free more"
    )
    if engine._retained:
        req.error += (
            f"; {len(engine._retained)} retained sequences hold {held} of "
            f"{engine.cache.num_blocks} blocks: snapshot() or release() them"
        )
    logger.warning("request %d failed: %s", req.request_id, req.error)
    engine.scheduler.finish(req)
    return [engine._output(req)]


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
