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
content always has equal digests. A compressed layout (``"kv_dtype": "float8_e4m3fn"``
etc. in ``layout``) has pages of the one-byte payload, then the float32 scales of the
block ``(layer, k/v, head)``; the digest covers both. Why K and V together: K and V of a token are
computed from the same prefix, so they are equal or differ together; splitting them
found no extra sharing (``benchmarks/bench_snapshot.py``: 70 vs 70 MiB unique on a
90 %-shared fork) and doubles the keys, files and round trips per byte.

Nothing here is ever unpickled; a manifest from a newer format version is refused
(:class:`~pagedkv.errors.SnapshotVersionError`) rather than guessed at. A
``checksum`` over the canonical JSON catches accidental change; every field is then
checked for its type and range (:mod:`pagedkv.snapshot.schema`), so a manifest
edited by hand, checksum and all, still cannot make a reader fail any other way than
with a ``SnapshotError`` naming the field. Unknown top-level fields are ignored.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagedkv._kv_formats import QUANT_FORMATS, SCALE_BYTES, dtype_name
from pagedkv.errors import SnapshotError
from pagedkv.snapshot.jsondoc import MAX_INT_DIGITS, decode_document
from pagedkv.snapshot.schema import (
    INT32,
    INT64,
    MAX_TEXT,
    MAX_TIMESTAMP,
    NAME_RE,
    Fields,
    check_header,
)

if TYPE_CHECKING:
    from pagedkv.storage.layout import KVLayout

FORMAT = "pagedkv.snapshot"
VERSION = 1
PAGE_HASH = "sha256"
PAGE_UNIT = "block"

_LAYOUT_KEYS = ("num_layers", "num_kv_heads", "head_dim", "block_size", "dtype", "bytes_per_block")
_DTYPE_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_HEX_RE = re.compile(r"(?:[0-9a-f]{2})*")
_QUANT_NAMES = ", ".join(dtype_name(d) for d in QUANT_FORMATS)
_QUANT_RE = re.compile("|".join(dtype_name(d) for d in QUANT_FORMATS))
MAX_BYTES_PER_BLOCK = 1 << 30  # 1 GiB: far above any real block, and a buffer verify can hold


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid snapshot name (``TypeError``/``ValueError`` if not)."""
    if not isinstance(name, str):
        raise TypeError(f"a snapshot name must be a str, got {type(name).__name__} {name!r:.60}")
    if NAME_RE.fullmatch(name) is None:
        raise ValueError(
            f"invalid snapshot name {name!r:.140}: use 1-128 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit (e.g. 'chat-42' or 'run_2026.11.23')"
        )
    return name


def layout_dict(layout: KVLayout) -> dict[str, Any]:
    """The JSON form of a ``KVLayout`` (dtype as its short name, e.g. ``"bfloat16"``). A
    quantized layout adds ``kv_dtype`` (e.g. ``"float8_e4m3fn"``): its pages are the
    payload then the float32 scales (see ``KVLayout``); unquantized ones have no such key,
    so their manifests are as they always were."""
    d = {
        "num_layers": layout.num_layers,
        "num_kv_heads": layout.num_kv_heads,
        "head_dim": layout.head_dim,
        "block_size": layout.block_size,
        "dtype": str(layout.dtype).removeprefix("torch."),
        "bytes_per_block": layout.bytes_per_block,
    }
    if getattr(layout, "quantized", False):
        d["kv_dtype"] = str(layout.kv_dtype).removeprefix("torch.")
    return d


def describe_layout(d: dict[str, Any]) -> str:
    """A one-line human form of a layout dict, for error messages and tables."""
    stored = f", stored as {d['kv_dtype']}" if "kv_dtype" in d else ""
    return (
        f"{d['num_layers']} layers x {d['num_kv_heads']} kv heads x head_dim {d['head_dim']}, "
        f"block_size {d['block_size']}, {d['dtype']}{stored}"
    )


def encode_salt(salt: object) -> dict[str, Any] | None:
    """JSON form of a cache salt (``None``, ``str``, ``bytes`` or an int64 ``int``)."""
    if salt is None:
        return None
    if isinstance(salt, bytes):
        if 2 * len(salt) > MAX_TEXT:
            raise ValueError(f"a salt of {len(salt)} bytes is too long to save (max 32 KiB)")
        return {"type": "bytes", "value": salt.hex()}
    if isinstance(salt, str):
        if len(salt) > MAX_TEXT or not _is_unicode(salt):
            raise ValueError("a str salt must be valid Unicode of at most 65536 characters")
        return {"type": "str", "value": salt}
    if isinstance(salt, int) and not isinstance(salt, bool):
        if not -INT64 <= salt <= INT64:
            raise ValueError(f"an int salt must fit in 64 bits to be saved, got {salt}")
        return {"type": "int", "value": salt}
    raise TypeError(f"a salt must be None, str, bytes or int to be saved; got {type(salt)}")


def decode_salt(obj: Any, what: str = "manifest", path: str = "salt") -> object:
    """Inverse of :func:`encode_salt`; raises ``SnapshotError`` on a malformed value."""
    if obj is None:
        return None
    if not isinstance(obj, dict) or set(obj) != {"type", "value"}:
        raise SnapshotError(
            f"{what}: field {path!r} must be null or {{'type': ..., 'value': ...}}, got {obj!r:.60}"
        )
    f = Fields(obj, what, path + ".")
    kind = f.text("type", expected="'str', 'bytes' or 'int'")
    if kind == "bytes":
        return bytes.fromhex(f.text("value", _HEX_RE, expected="lowercase hex of even length"))
    if kind == "str":
        return f.text("value")
    if kind == "int":
        return f.integer("value", -INT64, INT64)
    raise f.fail("type", "'str', 'bytes' or 'int'", kind)


def check_seq_id(seq_id: object) -> int | str:
    """A sequence id a manifest can hold: an int64 ``int`` or a short valid-Unicode ``str``."""
    if isinstance(seq_id, bool) or not isinstance(seq_id, (int, str)):
        raise TypeError(f"snapshots save int or str sequence ids, got {seq_id!r:.60}")
    if isinstance(seq_id, int) and not -INT64 <= seq_id <= INT64:
        raise ValueError(f"an int sequence id must fit in 64 bits to be saved, got {seq_id}")
    if isinstance(seq_id, str) and (len(seq_id) > MAX_TEXT or not _is_unicode(seq_id)):
        raise ValueError("a str sequence id must be valid Unicode of at most 65536 characters")
    return seq_id


def _is_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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

    def encode(self) -> builtins.bytes:  # the field ``bytes`` shadows the type here
        """Canonical JSON with a ``checksum`` over everything else (see :func:`parse_manifest`)."""
        body = self.to_json()
        doc = {**body, "checksum": _checksum(body)}
        return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def parse_manifest(raw: object, what: str = "manifest") -> Manifest:
    """Decode and validate a manifest; raise ``SnapshotError`` naming what is wrong.

    :class:`~pagedkv.errors.SnapshotVersionError` (a ``SnapshotError``) for a manifest
    of a newer format version.
    """
    obj = decode_document(raw, what)
    check_header(obj, FORMAT, VERSION, what)
    checksum = obj.pop("checksum", None)
    if checksum != _checksum(obj):
        raise SnapshotError(
            f"{what} fails its checksum (stored {str(checksum)[:20]}..., computed "
            f"{_checksum(obj)[:20]}...): it was modified or corrupted"
        )
    f = Fields(obj, what)
    f.const("page_hash", PAGE_HASH)
    f.const("page_unit", PAGE_UNIT)
    layout = _parse_layout(f.obj("layout"))
    sequences: list[SequenceEntry] = []
    seen: set[int | str] = set()
    for i, s in enumerate(f.array("sequences")):
        entry = _parse_sequence(Fields(s, what, f"sequences[{i}]."), layout["block_size"])
        if entry.seq_id in seen:
            raise SnapshotError(f"{what}: sequence id {entry.seq_id!r:.60} appears twice")
        seen.add(entry.seq_id)
        sequences.append(entry)
    counts = f.obj("bytes", optional=True)
    timings = f.obj("save", optional=True)
    return Manifest(
        name=f.text("name", NAME_RE, expected="a snapshot name"),
        created=f.number("created", 0.0, MAX_TIMESTAMP),
        fingerprint=f.text("fingerprint"),
        layout=layout,
        sequences=sequences,
        metadata=f.obj("metadata", optional=True).data,
        parent=f.text("parent", NAME_RE, optional=True, expected="null or a snapshot name"),
        bytes={k: counts.integer(k, 0, INT64) for k in counts.data},
        save={k: timings.number(k, 0.0, 10.0**MAX_INT_DIGITS) for k in timings.data},
        model=f.text("model", optional=True),
    )


def _parse_layout(f: Fields) -> dict[str, Any]:
    if set(f.data) not in (set(_LAYOUT_KEYS), {*_LAYOUT_KEYS, "kv_dtype"}):
        raise SnapshotError(
            f"{f.what}: field 'layout' must have exactly the keys {', '.join(_LAYOUT_KEYS)} "
            f"(and kv_dtype for a compressed one); got {', '.join(sorted(map(str, f.data)))[:200]}"
        )
    dims = {k: f.integer(k, 1, INT32) for k in _LAYOUT_KEYS[:4]}
    dtype = f.text("dtype", _DTYPE_RE, expected="a torch dtype name such as 'bfloat16'")
    bytes_per_block = f.integer("bytes_per_block", 1, MAX_BYTES_PER_BLOCK)
    elements = 2 * dims["num_layers"] * dims["num_kv_heads"] * dims["head_dim"]
    elements *= dims["block_size"]
    if "kv_dtype" in f.data:
        kv = f.text("kv_dtype", _QUANT_RE, expected="a compressed format: " + _QUANT_NAMES)
        scales = SCALE_BYTES * dims["num_layers"] * dims["num_kv_heads"]
        if bytes_per_block != elements + scales:
            want = f"{elements} one-byte elements + {scales} bytes of scales"
            raise f.fail("bytes_per_block", want, bytes_per_block)
        return {**dims, "dtype": dtype, "bytes_per_block": bytes_per_block, "kv_dtype": kv}
    if bytes_per_block not in (elements, 2 * elements, 4 * elements, 8 * elements):
        raise f.fail(
            "bytes_per_block",
            f"2 x num_layers x num_kv_heads x head_dim x block_size = {elements} elements "
            "times an element size of 1, 2, 4 or 8 bytes",
            bytes_per_block,
        )
    return {**dims, "dtype": dtype, "bytes_per_block": bytes_per_block}


def _parse_sequence(f: Fields, block_size: int) -> SequenceEntry:
    raw_id = f.data.get("seq_id")
    try:
        seq_id = check_seq_id(raw_id)
    except (TypeError, ValueError):
        raise f.fail("seq_id", "an int64 or a str of at most 65536 characters", raw_id) from None
    tokens = f.array("token_ids")
    # C-speed checks first (a long conversation has millions of tokens), the loop only
    # to name the bad one
    if (
        not all(type(t) is int for t in tokens)
        or min(tokens, default=0) < 0
        or (max(tokens, default=0) >= 2**32)
    ):
        i, t = next(
            (i, t) for i, t in enumerate(tokens) if type(t) is not int or not 0 <= t < 2**32
        )
        raise f.fail(f"token_ids[{i}]", "a token id in [0, 2**32)", t)
    n = len(tokens)
    if n == 0:
        raise f.fail("token_ids", "a non-empty list", tokens)
    f.integer("num_tokens", n, n, optional=True)
    pages = f.digests("pages")
    need = -(-n // block_size)
    if len(pages) != need:
        raise f.fail("pages", f"{need} digests ({n} tokens in blocks of {block_size})", pages)
    fill = n - (need - 1) * block_size
    f.integer("last_page_fill", fill, fill)
    salt = decode_salt(f.data.get("salt"), f.what, f.path + "salt")
    return SequenceEntry(seq_id, tokens, pages, fill, salt)
