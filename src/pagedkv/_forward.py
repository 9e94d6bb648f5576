"""Read-only properties that read an attribute path through (``self.config.eviction``)."""

from __future__ import annotations

from operator import attrgetter
from typing import Any


def read_through(path: str, doc: str | None = None) -> Any:
    """A read-only property returning ``self.<path>`` (a dotted path; the getter runs in C).

    Typed ``Any`` so that the class annotates the attribute with the value's type.
    """
    return property(attrgetter(path), doc=doc)
