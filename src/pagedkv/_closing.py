"""The one ``with obj:`` of every pagedkv object that holds something to ``close()``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TypeVar

_C = TypeVar("_C", bound="Closing")


class Closing(ABC):
    """Mixin: ``with obj:`` gives ``obj`` and calls its ``close()`` on the way out (an
    error raised inside the block still propagates). Subclasses define ``close``: a class
    without one cannot be instantiated (abstract)."""

    __slots__ = ()

    @abstractmethod
    def close(self) -> None:
        """Release what the object holds (idempotent in every subclass)."""

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
