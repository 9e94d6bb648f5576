"""Argument checks of :class:`~pagedkv.snapshot.store.SnapshotStore`'s public methods.

Each raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, bad
value) saying what was expected, before the store reads or writes anything. What a
save accepts is exactly what a manifest can hold (:mod:`pagedkv.snapshot.jsondoc`
bounds), so a snapshot that saves is a snapshot that loads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

from pagedkv.snapshot.jsondoc import MAX_DEPTH, check_json_value
from pagedkv.snapshot.manifest import check_seq_id
from pagedkv.snapshot.pager import CachePager

MAX_METADATA_BYTES = 16 << 20
_TEXTS = (str, bytes, bytearray, memoryview)


def check_pager(pager: object) -> CachePager:
    if not isinstance(pager, CachePager):
        raise TypeError(
            f"pager must be a CachePager (a KVCache, or a SyntheticPager in tests), got "
            f"{type(pager).__name__}"
        )
    return pager


def seq_id_list(seq_ids: object, method: str) -> list[int | str] | None:
    """``None`` or the ids of an iterable; a ``str`` (one id's characters) is refused."""
    if seq_ids is None:
        return None
    if isinstance(seq_ids, _TEXTS):
        raise TypeError(
            f"{method}: seq_ids must be a list of sequence ids, got a "
            f"{type(seq_ids).__name__} {seq_ids!r:.40}; for one sequence pass [{seq_ids!r:.40}]"
        )
    if isinstance(seq_ids, Mapping):
        raise TypeError(
            f"{method}: seq_ids must be a list of sequence ids, got a mapping "
            "(a {saved id: new id} mapping is what load() takes)"
        )
    if not isinstance(seq_ids, Iterable):
        raise TypeError(
            f"{method}: seq_ids must be a list of sequence ids, got {type(seq_ids).__name__}"
        )
    ids = [check_seq_id(s) for s in seq_ids]
    if len(set(ids)) != len(ids):
        dup = sorted({s for s in ids if ids.count(s) > 1}, key=str)
        raise ValueError(f"{method}: seq_ids has duplicates: {dup[:8]}")
    return ids


def id_mapping(seq_ids: object) -> dict[int | str, Hashable] | None:
    """``None`` or a ``{saved id: new id}`` dict (new ids hashable and distinct)."""
    if seq_ids is None:
        return None
    if not isinstance(seq_ids, Mapping):
        raise TypeError(
            "load: seq_ids maps saved sequence ids to new ones ({saved id: new id}, e.g. "
            f"{{7: 'chat-7'}}), got a {type(seq_ids).__name__} {seq_ids!r:.40}"
        )
    mapping: dict[int | str, Hashable] = {}
    for old, new in seq_ids.items():
        check_seq_id(old)
        try:
            hash(new)
        except TypeError:
            raise TypeError(
                f"load: the new id for {old!r:.40} is not hashable: {new!r:.40}"
            ) from None
        mapping[old] = new
    return mapping


def check_metadata(metadata: object) -> dict[str, Any]:
    """A JSON copy of ``metadata`` (a mapping with str keys), bounded as manifests are."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(
            f"metadata must be a mapping of str keys to JSON values, got {type(metadata).__name__}"
        )
    meta = dict(metadata)
    try:
        # a manifest is an object holding the metadata object: one level less
        check_json_value(meta, "metadata", max_depth=MAX_DEPTH - 1)
    except TypeError as e:
        raise TypeError(
            f"metadata must be JSON-serialisable (str keys, plain values): {e}"
        ) from None
    text = json.dumps(meta, separators=(",", ":"), allow_nan=False)
    if len(text) > MAX_METADATA_BYTES:
        raise ValueError(
            f"metadata is {len(text)} bytes as JSON, more than {MAX_METADATA_BYTES}; keep "
            "large data elsewhere and store a reference to it"
        )
    result: dict[str, Any] = json.loads(text)
    return result


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r:.40}")
    return value


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r:.40}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def seconds(name: str, value: object) -> float:
    """A non-negative number of seconds (``math.inf``: forever)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be >= 0 seconds, got {value}")
    return float(value)
