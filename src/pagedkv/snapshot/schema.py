"""Field-by-field validation of the JSON documents a snapshot store holds.

:func:`~pagedkv.snapshot.jsondoc.decode_document` guarantees a bounded JSON value;
:class:`Fields` then reads one object's fields with their type and range checked,
raising :class:`~pagedkv.errors.SnapshotError` that names the document and the field
(``manifest of snapshot 'chat': field 'layout.block_size' must be an int in
[1, 2147483647], got 0``). Manifests and leases are both read through it.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pagedkv.errors import SnapshotError, SnapshotVersionError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"[0-9a-f]{64}")
KEY_RE = re.compile(r"[0-9A-Za-z._-]{1,200}")
# Seconds since the epoch that datetime can show: up to the end of year 9999.
MAX_TIMESTAMP = 253402300799.0
INT64 = 2**63 - 1
INT32 = 2**31 - 1
MAX_TEXT = 1 << 16


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class Fields:
    """Typed reads of the fields of one JSON object ``obj`` of document ``what``.

    ``path`` prefixes field names in messages (``"sequences[2]."``). Each reader takes
    the key and its constraints; ``optional=True`` returns ``default`` for a missing
    key *or* a ``null`` value.
    """

    def __init__(self, obj: Any, what: str, path: str = "") -> None:
        if not isinstance(obj, dict):
            where = f"field {path.rstrip('.')!r}" if path else "the document"
            raise SnapshotError(f"{what}: {where} must be a JSON object, got {_kind(obj)}")
        self.data, self.what, self.path = obj, what, path

    def fail(self, key: str, expected: str, value: Any) -> SnapshotError:
        return SnapshotError(
            f"{self.what}: field {self.path + key!r} must be {expected}, got {_shown(value)}"
        )

    def _get(self, key: str, optional: bool) -> Any:
        if key not in self.data:
            if optional:
                return None
            raise SnapshotError(f"{self.what}: field {self.path + key!r} is missing")
        return self.data[key]

    def integer(
        self, key: str, lo: int, hi: int, *, optional: bool = False, default: int | None = None
    ) -> Any:
        v = self._get(key, optional)
        if v is None and optional:
            return default
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.fail(key, f"an int in [{lo}, {hi}]", v)
        return v

    def number(
        self, key: str, lo: float, hi: float, *, optional: bool = False, default: float = 0.0
    ) -> float:
        v = self._get(key, optional)
        if v is None and optional:
            return default
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not math.isfinite(v)
            or not lo <= v <= hi
        ):
            raise self.fail(key, f"a number in [{lo:g}, {hi:g}]", v)
        return float(v)

    def text(
        self,
        key: str,
        pattern: re.Pattern[str] | None = None,
        *,
        max_len: int = MAX_TEXT,
        optional: bool = False,
        expected: str | None = None,
    ) -> Any:
        v = self._get(key, optional)
        if v is None and optional:
            return None
        ok = isinstance(v, str) and len(v) <= max_len
        if ok and pattern is not None:
            ok = pattern.fullmatch(v) is not None
        if not ok:
            raise self.fail(key, expected or f"a string of at most {max_len} characters", v)
        return v

    def const(self, key: str, value: str) -> None:
        if self._get(key, False) != value:
            raise self.fail(key, repr(value), self.data[key])

    def array(self, key: str) -> list[Any]:
        v = self._get(key, False)
        if not isinstance(v, list):
            raise self.fail(key, "a list", _kind(v))
        return v

    def obj(self, key: str, *, optional: bool = False) -> Fields:
        v = self._get(key, optional)
        if v is None and optional:
            v = {}
        if not isinstance(v, dict):
            raise self.fail(key, "a JSON object", _kind(v))
        return Fields(v, self.what, f"{self.path}{key}.")

    def digests(self, key: str) -> list[str]:
        """A list of sha256 hex digests (64 lowercase hex characters, nothing else)."""
        v = self.array(key)
        for i, d in enumerate(v):
            if not isinstance(d, str) or DIGEST_RE.fullmatch(d) is None:
                raise self.fail(f"{key}[{i}]", "a sha256 hex digest (64 of [0-9a-f])", d)
        return v


def check_header(obj: Any, fmt: str, version: int, what: str) -> None:
    """The document's ``format`` and ``version``: ``SnapshotVersionError`` if it is newer."""
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = obj.get("format") if isinstance(obj, dict) else _kind(obj)
        raise SnapshotError(f"{what} is not a pagedkv snapshot document (format {_shown(found)})")
    v = obj.get("version")
    if isinstance(v, bool) or not isinstance(v, int):
        raise SnapshotError(f"{what} has no valid integer 'version' (got {_shown(v)})")
    if v > version:
        raise SnapshotVersionError(
            f"{what} has format version {v}, but this pagedkv reads versions up to "
            f"{version}; upgrade pagedkv to read it"
        )
    if v < 1:
        raise SnapshotError(f"{what} has an invalid format version {v}")
