"""Argument checks shared by pagedkv's packages: one wording for each kind of mistake.

Each check returns the value it accepted (``self.n = check_int(n, "n", minimum=1)``)
and raises ``TypeError`` for a value of the wrong type and ``ValueError`` for one of
the right type but out of range, naming the argument (prefixed by ``who``, e.g.
``"KVPool"``, when given). ``bool`` is never accepted as a number. No imports beyond
the standard library: the pure-Python block manager uses these.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Container, Hashable, Mapping
from typing import TypeVar


def _name(name: str, who: str) -> str:
    return f"{who}: {name}" if who else name


def _shown(value: object) -> str:
    return f"{type(value).__name__} ({value!r:.40})"


def check_int(value: object, name: str, *, minimum: int | None = None, who: str = "") -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{_name(name, who)} must be an int, got {_shown(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{_name(name, who)} must be >= {minimum}, got {value}")
    return value


def check_number(
    value: object, name: str, *, positive: bool = False, unit: str = "", who: str = ""
) -> float:
    """``value`` (an int or float, not a bool, not NaN) as a float; ``positive``: > 0.

    ``unit`` names what the number counts (``"seconds"``) in the messages.
    """
    return _number(value, name, positive, unit, who, "")


def check_optional_number(
    value: object, name: str, *, positive: bool = False, unit: str = "", who: str = ""
) -> float | None:
    """``None``, or what :func:`check_number` accepts (its messages then add "or None")."""
    if value is None:
        return None
    return _number(value, name, positive, unit, who, " or None")


def _number(value: object, name: str, positive: bool, unit: str, who: str, alt: str) -> float:
    what = f"a {'positive ' if positive else ''}number{f' of {unit}' if unit else ''}{alt}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{_name(name, who)} must be {what}, got {_shown(value)}")
    if math.isnan(value) or (positive and not value > 0):
        raise ValueError(f"{_name(name, who)} must be {what}, got {value!r}")
    return float(value)


def check_bool(value: object, name: str, *, who: str = "") -> bool:
    """``value`` if it is ``True`` or ``False`` (not 0/1, not None)."""
    if not isinstance(value, bool):
        raise TypeError(f"{_name(name, who)} must be True or False, got {_shown(value)}")
    return value


def check_str(value: object, name: str, *, who: str = "") -> str:
    """``value`` if it is a str."""
    if not isinstance(value, str):
        raise TypeError(f"{_name(name, who)} must be a str, got {type(value).__name__}")
    return value


def check_callable(value: object, name: str, signature: str, *, who: str = "") -> Callable:
    """``value`` if it is callable; ``signature`` says what it is called with, e.g.
    ``"(block_id, block_hash) -> None"``."""
    if not callable(value):
        raise TypeError(
            f"{_name(name, who)} must be callable {signature}, got {type(value).__name__}"
        )
    return value


def check_path(value: object, name: str, *, who: str = "") -> str:
    """``value`` (a non-empty ``str`` or ``os.PathLike`` of str) as an absolute path."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(
            f"{_name(name, who)} must be a path (str or os.PathLike), got {type(value).__name__}"
        )
    if not value or "\0" in value:
        raise ValueError(f"{_name(name, who)} must be a non-empty path without NUL, got {value!r}")
    return os.path.abspath(value)


_V = TypeVar("_V")

# -- sequence ids ---------------------------------------------------------------------


def unknown_sequence(seq_id: object) -> KeyError:
    """The ``KeyError`` for a sequence id nothing holds (to raise ``from None``)."""
    return KeyError(f"unknown sequence {seq_id!r}: allocate() it first (or it was already freed)")


def unhashable_id(value: object, name: str = "seq_id") -> TypeError:
    """The ``TypeError`` for an id that cannot be one (to raise ``from None``)."""
    return TypeError(f"{name} must be hashable, got {type(value).__name__}")


def live_entry(table: Mapping[Hashable, _V], seq_id: Hashable) -> _V:
    """``table[seq_id]`` for a live sequence id; else the :func:`unknown_sequence`
    ``KeyError``, or for an id that cannot be one the :func:`unhashable_id` ``TypeError``."""
    try:
        return table[seq_id]
    except KeyError:
        raise unknown_sequence(seq_id) from None
    except TypeError:
        raise unhashable_id(seq_id) from None


def check_new_id(
    live: Container[object], seq_id: object, name: str = "seq_id",
    fix: str = "free() it or use a new id",
) -> None:  # fmt: skip
    """Raise unless ``seq_id`` is hashable and not in ``live``: ``TypeError`` /
    ``ValueError`` naming the argument ``name`` and saying ``fix``."""
    try:
        is_live = seq_id in live
    except TypeError:
        raise unhashable_id(seq_id, name) from None
    if is_live:
        raise ValueError(f"sequence {seq_id!r} is already live; {fix}")
