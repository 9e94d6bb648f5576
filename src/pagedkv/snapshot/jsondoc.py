"""Bounded JSON: the one decoder for every JSON document pagedkv reads from a store.

Manifests, leases and gc markers come from files or Redis keys that anyone with
access to the store can write, so a document is hostile until proven otherwise.
:func:`decode_document` bounds what ``json.loads`` is asked to do before it does it:

- size: at most ``max_bytes`` (a truncated or runaway file is refused unread);
- encoding: strict UTF-8 (``json.loads(bytes)`` would also guess UTF-16/32);
- depth: at most ``max_depth`` nested arrays/objects, counted by a scan of the bytes
  *before* parsing, so no nesting reaches the recursion limit of the parser;
- numbers: integers of at most ``MAX_INT_DIGITS`` digits, floats finite (``1e400``,
  ``NaN``, ``Infinity`` are refused rather than turned into ``inf``/``nan``);
- objects: no duplicate keys (the last one would silently win);
- strings: encodable as UTF-8 (a lone surrogate ``"\\ud800"`` parses, then breaks
  whoever prints or hashes it).

Everything it refuses raises :class:`~pagedkv.errors.SnapshotError` naming the
document and the limit; the caller then validates the schema field by field.
:func:`check_json_value` is the writing side: what pagedkv writes (user metadata)
must be readable back under the same limits.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from pagedkv.errors import SnapshotError

MAX_DOC_BYTES = 256 << 20
MAX_DEPTH = 32
MAX_INT_DIGITS = 20  # |x| < 10**20 > 2**64: every int a manifest needs, no bignum games

# A JSON string: a quote, then plain bytes and backslash escapes up to the closing quote
# or, unterminated, to the end. It cannot fail once it saw a quote, so the scan is one
# linear pass (a pattern that demands the closing quote backtracks from every quote
# after an unterminated one: quadratic on hostile input).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
# A \uD800-\uDFFF escape: the only way JSON can carry a surrogate (strict UTF-8 cannot).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_SCAN_CHUNK = 1 << 20
# Digits -> "1", anything else -> " ": a long digit run is then one substring search.
_DIGIT_RUNS = bytes(0x31 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_RUN = b"1" * (MAX_INT_DIGITS + 1)


def decode_document(
    raw: object, what: str, *, max_bytes: int = MAX_DOC_BYTES, max_depth: int = MAX_DEPTH
) -> Any:
    """Parse ``raw`` (bytes) as JSON under the limits above; ``SnapshotError`` otherwise."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise SnapshotError(f"{what} is a {type(raw).__name__}, not bytes")
    data = bytes(raw)
    if len(data) > max_bytes:
        raise SnapshotError(
            f"{what} is {len(data)} bytes, more than the {max_bytes} a pagedkv document may "
            "hold (damaged or not written by pagedkv)"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SnapshotError(f"{what} is not valid JSON (not UTF-8: {e})") from None
    depth = nesting_depth(data)
    if depth > max_depth:
        raise SnapshotError(
            f"{what} nests {depth} levels of arrays/objects, more than the {max_depth} allowed "
            "(damaged or not written by pagedkv)"
        )
    # A per-int hook costs more than the parse; only a document with a long digit run
    # somewhere (maybe inside a string) needs it.
    long_ints = _LONG_RUN in data.translate(_DIGIT_RUNS)
    try:
        obj = json.loads(
            text,
            parse_int=_parse_int if long_ints else None,
            parse_float=_parse_float,
            parse_constant=_refuse_constant,
            object_pairs_hook=_unique_keys,
        )
    except _Refused as e:
        raise SnapshotError(f"{what} is not valid pagedkv JSON: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise SnapshotError(f"{what} is not valid JSON (corrupt or truncated): {e}") from None
    try:
        if _SURROGATE_ESCAPE.search(text):  # a valid pair is fine; a lone one is not
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise SnapshotError(
            f"{what} holds a string that is not valid Unicode (a lone surrogate escape)"
        ) from None
    return obj


def nesting_depth(data: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in JSON ``data``, ignoring brackets in strings.

    Strings are cut out with one regular expression, every byte but brackets is
    dropped (``bytes.translate``), and the running depth is a cumulative sum: C speed,
    no recursion. An unterminated string leaves its brackets counted, which can only
    over-count a document that is invalid anyway.
    """
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    arr = np.frombuffer(brackets, dtype=np.uint8)
    deepest = level = 0
    for start in range(0, len(arr), _SCAN_CHUNK):
        chunk = arr[start : start + _SCAN_CHUNK]
        steps = np.where((chunk == ord("[")) | (chunk == ord("{")), 1, -1).astype(np.int64)
        run = np.cumsum(steps) + level
        deepest = max(deepest, int(run.max()))
        level = int(run[-1])
    return deepest


def check_json_value(value: Any, what: str, *, max_depth: int = MAX_DEPTH) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``value`` is JSON that decodes back as is.

    Plain JSON only: ``dict`` with ``str`` keys, ``list``/``tuple``, ``str`` (valid
    Unicode), ``int`` of at most ``MAX_INT_DIGITS`` digits, finite ``float``, ``bool``,
    ``None``, nested at most ``max_depth`` levels. Iterative (no recursion limit).
    """
    stack: list[tuple[Any, str, int]] = [(value, what, 1)]
    while stack:
        v, path, depth = stack.pop()
        if v is None or isinstance(v, bool):
            continue
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{path} is not valid Unicode (a lone surrogate)") from None
        elif isinstance(v, int):
            if len(str(abs(v))) > MAX_INT_DIGITS:
                raise ValueError(f"{path} is an int of more than {MAX_INT_DIGITS} digits")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError(f"{path} is {v!r}; JSON holds only finite numbers")
        elif isinstance(v, (dict, list, tuple)):
            if depth > max_depth:
                raise ValueError(f"{path} nests more than {max_depth} levels")
            if isinstance(v, dict):
                for k, item in v.items():
                    if not isinstance(k, str):
                        raise TypeError(f"{path} has a key {k!r} that is not a str")
                    stack.append((k, f"{path} key {k[:40]!r}", depth))
                    stack.append((item, f"{path}[{k[:40]!r}]", depth + 1))
            else:
                stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(v))
        else:
            raise TypeError(
                f"{path} is a {type(v).__name__}; use plain JSON values "
                "(dict with str keys, list, str, int, float, bool, None)"
            )


class _Refused(ValueError):
    """A value the JSON grammar allows but pagedkv documents never hold."""


def _parse_int(s: str) -> int:
    if len(s.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(s.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(s)


def _parse_float(s: str) -> float:
    x = float(s)
    if not math.isfinite(x):
        raise _Refused(f"the number {s[:40]} does not fit a float")
    return x


def _refuse_constant(s: str) -> None:
    raise _Refused(f"{s} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"the key {key[:40]!r} appears twice in one object")
            seen.add(key)
    return out


# A str field is matched whole: `$` would also accept a trailing "\n".
def fullmatch(pattern: re.Pattern[str], value: object) -> bool:
    """Whether ``value`` is a ``str`` that ``pattern`` matches entirely."""
    return isinstance(value, str) and pattern.fullmatch(value) is not None
