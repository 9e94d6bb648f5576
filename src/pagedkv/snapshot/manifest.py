"""The snapshot manifest: a JSON document that names every page of every sequence.

Format (version 1)::

    {"format": "pagedkv.snapshot", "version": 1, "name": "chat-42",
     "created": 1795000000.0, "parent": null,
     "fingerprint": "<pager fingerprint: model + layout>",
     "model": "<the pager's model_fingerprint, when it has one, for messages>" | null,
     "layout": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "block_size": 4,
                "dtype": "float16", "bytes_per_block": 256},
     "checksum": "sha256:<hex of the canonical JSON of every other field>",
     "page_hash": "sha256", "page_unit": "block",
     "metadata": {...user JSON...},
     "sequences": [{"seq_id": 7, "num_tokens": 9, "token_ids": [...],
                    "salt": null | {"type": "str"|"bytes"|"int", "value": ...},
                    "pages": ["<sha256 hex of the page bytes>", ...],
                    "last_page_fill": 1}],
     "bytes": {"logical": ..., "unique": ..., "written": ...},
     "save": {"seconds": ..., "bytes_read": ...}}

A page is the bytes of one block, K and V together, ordered (layer, k/v, token, head,
dim); the token slots of the last page beyond ``last_page_fill`` are zero so equal
content always has equal digests. Why K and V together: K and V of a token are
computed from the same prefix, so they are equal or differ together; splitting them
found no extra sharing (``benchmarks/bench_snapshot.py``: 70 vs 70 MiB unique on a
90 %-shared fork) and doubles the keys, files and round trips per byte.

Nothing here is ever unpickled; a manifest from a newer format version is refused
rather than guessed at. A ``checksum`` over the canonical JSON catches any change.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from pagedkv.errors import SnapshotError

FORMAT = "pagedkv.snapshot"
LEASE_FORMAT = "pagedkv.snapshot.lease"
VERSION = 1
PAGE_HASH = "sha256"
PAGE_UNIT = "block"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_LAYOUT_KEYS = ("num_layers", "num_kv_heads", "head_dim", "block_size", "dtype", "bytes_per_block")


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid snapshot name, else raise ``ValueError``."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"invalid snapshot name {name!r}: use 1-128 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit (e.g. 'chat-42' or 'run_2026.11.23')"
        )
    return name


def layout_dict(layout: Any) -> dict[str, Any]:
    """The JSON form of a ``KVLayout`` (dtype as its short name, e.g. ``"bfloat16"``)."""
    return {
        "num_layers": layout.num_layers,
        "num_kv_heads": layout.num_kv_heads,
        "head_dim": layout.head_dim,
        "block_size": layout.block_size,
        "dtype": str(layout.dtype).removeprefix("torch."),
        "bytes_per_block": layout.bytes_per_block,
    }


def describe_layout(d: dict[str, Any]) -> str:
    """A one-line human form of a layout dict, for error messages and tables."""
    return (
        f"{d['num_layers']} layers x {d['num_kv_heads']} kv heads x head_dim {d['head_dim']}, "
        f"block_size {d['block_size']}, {d['dtype']}"
    )


def encode_salt(salt: object) -> dict[str, Any] | None:
    """JSON form of a cache salt (``None``, ``str``, ``bytes`` or ``int``)."""
    if salt is None:
        return None
    if isinstance(salt, bytes):
        return {"type": "bytes", "value": salt.hex()}
    if isinstance(salt, str):
        return {"type": "str", "value": salt}
    if isinstance(salt, int) and not isinstance(salt, bool):
        return {"type": "int", "value": salt}
    raise TypeError(f"a salt must be None, str, bytes or int to be saved; got {type(salt)}")


def decode_salt(obj: Any) -> object:
    """Inverse of :func:`encode_salt`; raises ``SnapshotError`` on a malformed value."""
    if obj is None:
        return None
    kind = obj.get("type") if isinstance(obj, dict) else None
    value = obj.get("value") if isinstance(obj, dict) else None
    if kind == "bytes" and isinstance(value, str):
        return bytes.fromhex(value)
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    raise SnapshotError(f"malformed salt in manifest: {obj!r}")


@dataclass(frozen=True)
class SequenceEntry:
    """One saved sequence: its tokens and the digests of its pages, in block order."""

    seq_id: int | str
    token_ids: list[int]
    pages: list[str]
    last_page_fill: int
    salt: object = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq_id": self.seq_id,
            "num_tokens": self.num_tokens,
            "token_ids": self.token_ids,
            "salt": encode_salt(self.salt),
            "pages": self.pages,
            "last_page_fill": self.last_page_fill,
        }


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest (see the module docstring for the JSON form)."""

    name: str
    created: float
    fingerprint: str
    layout: dict[str, Any]
    sequences: list[SequenceEntry]
    metadata: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None
    bytes: dict[str, int] = field(default_factory=dict)
    save: dict[str, float] = field(default_factory=dict)
    model: str | None = None

    def page_digests(self) -> set[str]:
        """Every distinct page digest the manifest references."""
        return {d for s in self.sequences for d in s.pages}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "created": self.created,
            "parent": self.parent,
            "fingerprint": self.fingerprint,
            "model": self.model,
            "layout": dict(self.layout),
            "page_hash": PAGE_HASH,
            "page_unit": PAGE_UNIT,
            "metadata": self.metadata,
            "sequences": [s.to_json() for s in self.sequences],
            "bytes": dict(self.bytes),
            "save": dict(self.save),
        }

    def encode(self) -> bytes:
        """Canonical JSON with a ``checksum`` over everything else (see :func:`parse_manifest`)."""
        body = self.to_json()
        return json.dumps({**body, "checksum": _checksum(body)}, separators=(",", ":")).encode()


def _checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _check_header(obj: Any, fmt: str, what: str) -> None:
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise SnapshotError(f"{what} is not a pagedkv snapshot document (format {found!r})")
    version = obj.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SnapshotError(f"{what} has no valid integer 'version' (got {version!r})")
    if version > VERSION:
        raise SnapshotError(
            f"{what} has format version {version}, but this pagedkv reads versions up to "
            f"{VERSION}; upgrade pagedkv to read it"
        )
    if version < 1:
        raise SnapshotError(f"{what} has an invalid format version {version}")


def parse_manifest(raw: bytes, what: str = "manifest") -> Manifest:
    """Decode and validate a manifest; raise ``SnapshotError`` naming what is wrong."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnapshotError(f"{what} is not valid JSON (corrupt or truncated): {e}") from None
    _check_header(obj, FORMAT, what)
    checksum = obj.pop("checksum", None)
    if checksum != _checksum(obj):
        raise SnapshotError(
            f"{what} fails its checksum (stored {str(checksum)[:20]}..., computed "
            f"{_checksum(obj)[:20]}...): it was modified or corrupted"
        )
    try:
        layout = obj["layout"]
        if not isinstance(layout, dict) or set(layout) != set(_LAYOUT_KEYS):
            raise SnapshotError(f"{what}: layout must have keys {_LAYOUT_KEYS}, got {layout!r}")
        if obj.get("page_hash") != PAGE_HASH or obj.get("page_unit") != PAGE_UNIT:
            raise SnapshotError(
                f"{what}: unsupported page_hash/page_unit "
                f"{obj.get('page_hash')!r}/{obj.get('page_unit')!r}"
            )
        bs = layout["block_size"]
        if not isinstance(bs, int) or bs <= 0:
            raise SnapshotError(f"{what}: invalid block_size {bs!r}")
        sequences = []
        seen: set = set()
        for i, s in enumerate(obj["sequences"]):
            sequences.append(_parse_sequence(s, bs, f"{what}: sequence #{i}"))
            if sequences[-1].seq_id in seen:
                raise SnapshotError(f"{what}: sequence id {sequences[-1].seq_id!r} appears twice")
            seen.add(sequences[-1].seq_id)
        metadata = obj.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise SnapshotError(f"{what}: metadata must be a JSON object")
        return Manifest(
            name=validate_name(obj["name"]),
            created=float(obj["created"]),
            fingerprint=str(obj["fingerprint"]),
            layout=layout,
            sequences=sequences,
            metadata=metadata,
            parent=obj.get("parent"),
            bytes={k: int(v) for k, v in (obj.get("bytes") or {}).items()},
            save={k: float(v) for k, v in (obj.get("save") or {}).items()},
            model=None if obj.get("model") is None else str(obj["model"]),
        )
    except SnapshotError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SnapshotError(f"{what} is malformed: {type(e).__name__}: {e}") from None


def _parse_sequence(s: Any, block_size: int, what: str) -> SequenceEntry:
    seq_id = s["seq_id"]
    if isinstance(seq_id, bool) or not isinstance(seq_id, (int, str)):
        raise SnapshotError(f"{what}: seq_id must be an int or a str, got {seq_id!r}")
    tokens = s["token_ids"]
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in tokens
    ):
        raise SnapshotError(f"{what}: token_ids must be a list of uint32 ints")
    pages = s["pages"]
    if not isinstance(pages, list) or not all(
        isinstance(p, str) and _DIGEST_RE.match(p) for p in pages
    ):
        raise SnapshotError(f"{what}: pages must be a list of sha256 hex digests")
    n = len(tokens)
    if s.get("num_tokens", n) != n or n == 0:
        raise SnapshotError(f"{what}: num_tokens {s.get('num_tokens')} != len(token_ids) {n}")
    expected_pages = -(-n // block_size)
    if len(pages) != expected_pages:
        raise SnapshotError(
            f"{what}: {n} tokens need {expected_pages} pages of {block_size}, found {len(pages)}"
        )
    fill = n - (expected_pages - 1) * block_size
    if s["last_page_fill"] != fill:
        raise SnapshotError(f"{what}: last_page_fill {s['last_page_fill']} != {fill}")
    return SequenceEntry(seq_id, tokens, pages, fill, decode_salt(s.get("salt")))


@dataclass(frozen=True)
class Lease:
    """A pending save: written before any page, deleted after the manifest.

    ``gc`` keeps every page a live lease names, so a save in progress never loses a
    page it counted on. A lease is live while its process runs (same host) or for a
    grace period after ``created`` (any host).
    """

    lease_id: str
    name: str
    created: float
    host: str
    pid: int
    pages: list[str]

    def encode(self) -> bytes:
        obj = {"format": LEASE_FORMAT, "version": VERSION, **asdict(self)}
        return json.dumps(obj, separators=(",", ":")).encode()


def parse_lease(raw: bytes) -> Lease:
    """Decode a lease; raise ``SnapshotError`` when it is not one."""
    try:
        obj = json.loads(raw)
        _check_header(obj, LEASE_FORMAT, "lease")
        return Lease(
            str(obj["lease_id"]),
            str(obj["name"]),
            float(obj["created"]),
            str(obj["host"]),
            int(obj["pid"]),
            [str(p) for p in obj["pages"]],
        )
    except SnapshotError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"lease is malformed: {type(e).__name__}: {e}") from None


@dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot holds, and for the result of a save, how the save went.

    ``logical_bytes`` counts every page of every sequence; ``unique_bytes`` the
    distinct pages (what the snapshot would take alone); ``written_bytes`` the pages
    the save actually added to the store (the rest were already there).
    ``dedup_ratio = logical_bytes / unique_bytes``. ``seconds``/``gbps`` are the save's
    wall time and ``logical_bytes / seconds`` (0 for a fork).
    """

    name: str
    created: float
    parent: str | None
    fingerprint: str
    layout: dict[str, Any]
    seq_ids: list[int | str]
    num_tokens: int
    num_pages: int
    unique_pages: int
    logical_bytes: int
    unique_bytes: int
    written_bytes: int
    metadata: dict[str, Any]
    seconds: float = 0.0

    @property
    def num_sequences(self) -> int:
        return len(self.seq_ids)

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def gbps(self) -> float:
        return self.logical_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def created_iso(self) -> str:
        return datetime.fromtimestamp(self.created, tz=timezone.utc).isoformat(timespec="seconds")

    @classmethod
    def from_manifest(cls, m: Manifest) -> SnapshotInfo:
        bpb = int(m.layout["bytes_per_block"])
        num_pages = sum(len(s.pages) for s in m.sequences)
        unique = len(m.page_digests())
        return cls(
            name=m.name,
            created=m.created,
            parent=m.parent,
            fingerprint=m.fingerprint,
            layout=dict(m.layout),
            seq_ids=[s.seq_id for s in m.sequences],
            num_tokens=sum(s.num_tokens for s in m.sequences),
            num_pages=num_pages,
            unique_pages=unique,
            logical_bytes=num_pages * bpb,
            unique_bytes=unique * bpb,
            written_bytes=int(m.bytes.get("written", 0)),
            metadata=dict(m.metadata),
            seconds=float(m.save.get("seconds", 0.0)),
        )


@dataclass(frozen=True)
class VerifyReport:
    """The result of reading back every page of a snapshot and checking its digest.

    ``ok`` is true only when the manifest parsed and every page is present with the
    right length and digest. ``error`` explains a manifest that is missing or bad.
    """

    name: str
    ok: bool
    num_pages: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    error: str | None = None
    bytes_checked: int = 0
    seconds: float = 0.0

    @property
    def gbps(self) -> float:
        return self.bytes_checked / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class GcReport:
    """What :meth:`SnapshotStore.gc` removed and kept.

    ``pages_protected`` are unreferenced pages kept because a live lease (a save or
    fork in progress) names them. ``bytes_freed`` is ``None`` when the backend cannot
    tell (Redis).
    """

    pages_deleted: int
    bytes_freed: int | None
    pages_kept: int
    pages_protected: int
    leases_removed: int
    seconds: float
