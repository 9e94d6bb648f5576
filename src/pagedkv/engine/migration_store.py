"""Migration across processes and machines, through a snapshot store (the slow path).

:meth:`Engine.migrate(request_id, store=..., name=...) <pagedkv.Engine.migrate>` parks a
queued or running request: its sequence (the tokens whose KV is written, and their KV
pages) is saved as snapshot ``name`` with the whole request state under the metadata key
:data:`META_KEY` — prompt length, the tokens without KV (the last sampled token, or the
rest of a prompt being prefilled), the output so far, sampling params, the random
generator's state, stop criteria, streaming position, ``cache_salt``, priority,
``retain`` — and the request leaves the engine. A waiting request is saved without KV.
:meth:`Engine.resume_migrated(name) <pagedkv.Engine.resume_migrated>` loads it into
another engine (another process, another machine with the same model, dtype and block
size) under a new request id, which serves it from its next step; the snapshot is
deleted then unless ``keep=True`` (its pages go at the store's next ``gc``). The result
is the same as never having moved, as for a move between engines in one process
(:mod:`pagedkv.engine.migration`).

Unlike a move between engines, the save is a stop-and-copy of the whole sequence: the
store reads the cache paused, and the request is out of every batch from the save to
its first step on the other engine. The functions take what they need (the core, the
store) and never see the engine.
"""

from __future__ import annotations

import base64
import time
from dataclasses import asdict
from typing import Any

import torch

from pagedkv.engine.core import EngineCore
from pagedkv.engine.migration import MigrationResult, check_between_steps, has_kv, lookup
from pagedkv.engine.request import Request, SamplingParams, Status
from pagedkv.engine.sampling import make_generator
from pagedkv.engine.sessions import engine_metadata, load_sequence
from pagedkv.errors import SnapshotError
from pagedkv.snapshot import SnapshotStore
from pagedkv.snapshot.manifest import decode_salt, encode_salt

META_KEY = "pagedkv.migration"
META_VERSION = 1


def park(
    core: EngineCore, store: SnapshotStore, request_id: int, name: str | None, overwrite: bool
) -> MigrationResult:
    """Save request ``request_id`` of ``core`` as snapshot ``name`` and take it out of the
    engine (see the module doc); nothing changes if the save fails."""
    t0 = time.perf_counter()
    core.drain()  # overlap: a step in flight holds the request's next token on the device
    req = lookup(core, request_id)
    kv = has_kv(req)
    if kv:
        check_between_steps(core, req)
    meta = _state(req, kv)
    info = store.save(core.cache, [req.seq_id] if kv else [], name, {META_KEY: meta},
                      overwrite=overwrite)  # fmt: skip
    core.detach(request_id)
    if kv or req.status is Status.SWAPPED:
        core.cache.free(req.seq_id)
    now = time.perf_counter()
    return MigrationResult(
        request_id, None, str(core.cache.device), str(store.location), kv, info.num_tokens, 0,
        info.num_pages if kv else 0, 0, info.written_bytes, "store" if kv else None, now - t0,
        now - t0, info.name,
    )  # fmt: skip


def _state(req: Request, kv: bool) -> dict[str, Any]:
    computed = req.num_computed if kv else 0
    gen = req.generator
    return {
        "version": META_VERSION,
        "prompt_len": len(req.prompt),
        "num_computed": computed,
        "rest": req.token_slice(computed, req.num_tokens),  # tokens without KV
        "sampling": asdict(req.params),
        "eos_token_ids": sorted(req.eos_token_ids),
        "generator": None if gen is None else base64.b64encode(_raw(gen)).decode(),
        "generator_device": None if gen is None else gen.device.type,
        "cache_salt": encode_salt(req.cache_salt),
        "priority": req.priority,
        "retain": req.retain,
        "streamed": req.streamed,
        "num_cached_tokens": req.num_cached_tokens,
        "num_preemptions": req.num_preemptions,
        "source_request_id": req.request_id,
    }


def _raw(gen: torch.Generator) -> bytes:
    return bytes(gen.get_state().numpy().tobytes())


def unpark(
    core: EngineCore, store: SnapshotStore, name: str, *, vocab_size: int, keep: bool
) -> int:
    """Load request snapshot ``name`` (saved by :func:`park`) into ``core``'s engine and
    queue it; returns its new request id. ``SnapshotError`` for a snapshot not saved by
    :func:`park`, another model or layout, malformed state; ``OutOfBlocks`` when the
    cache has no room now. Nothing changes when it raises."""
    cache = core.cache
    manifest = store.manifest(name)
    meta = engine_metadata(
        manifest, name, cache, META_KEY, META_VERSION, sequences=(0, 1),
        saved_by="Engine.migrate(..., store=)", what="migration state",
    )  # fmt: skip
    entry = manifest.sequences[0] if manifest.sequences else None
    req = _request(meta, entry, name, core.new_id(), cache.device, vocab_size)
    if entry is not None:
        load_sequence(store, cache, name, entry, req.seq_id)
    if not keep:
        try:
            store.delete(name)
        except BaseException:
            if entry is not None:
                cache.free(req.seq_id)
            raise
    core.adopt(req)
    return req.request_id


def _request(
    meta: dict[str, Any], entry: Any, name: str, new_id: int, device: torch.device, vocab: int
) -> Request:
    """The request saved in ``meta`` (and ``entry``'s tokens), under ``new_id``."""
    try:
        params = SamplingParams(**meta["sampling"])
        computed, prompt_len = int(meta["num_computed"]), int(meta["prompt_len"])
        tokens = (list(entry.token_ids) if entry is not None else []) + list(meta["rest"])
        if any(type(t) is not int or not 0 <= t < vocab for t in tokens):
            raise ValueError(f"token ids must be ints in [0, {vocab})")
        salt = decode_salt(meta["cache_salt"], f"request snapshot {name!r}", "cache_salt")
        if salt is not None and not isinstance(salt, (str, bytes, int)):
            raise ValueError(f"cache_salt must be a str, bytes or int, got {salt!r:.60}")
        req = Request(
            new_id, tokens[:prompt_len], params, None,
            frozenset(int(t) for t in meta["eos_token_ids"]), output=tokens[prompt_len:],
            num_computed=computed, num_allocated=computed,
            num_cached_tokens=int(meta["num_cached_tokens"]),
            num_preemptions=int(meta["num_preemptions"]), streamed=int(meta["streamed"]),
            retain=bool(meta["retain"]), cache_salt=salt, priority=int(meta["priority"]),
        )  # fmt: skip
        if not params.greedy:
            req.generator = make_generator(params.seed, device)
            state = meta["generator"]
            if state is not None and meta.get("generator_device") == device.type:
                raw = bytearray(base64.b64decode(state, validate=True))
                req.generator.set_state(torch.frombuffer(raw, dtype=torch.uint8))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise SnapshotError(f"request snapshot {name!r} has malformed state: {exc}") from None
    if (entry is not None and entry.num_tokens != computed) or not (
        computed < len(tokens) and 0 < prompt_len <= len(tokens)
    ):
        raise SnapshotError(
            f"request snapshot {name!r} is inconsistent: {computed} tokens with KV, "
            f"{len(tokens)} in all, a prompt of {prompt_len}"
        )
    if entry is not None and entry.salt != salt:
        raise SnapshotError(f"request snapshot {name!r}: its sequence's salt is not its request's")
    return req
