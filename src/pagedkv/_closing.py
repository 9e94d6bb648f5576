"""The one ``with obj:`` of every pagedkv object that holds something to ``close()``."""

from __future__ import annotations

from typing import TypeVar

_C = TypeVar("_C", bound="Closing")


class Closing:
    """Mixin: ``with obj:`` gives ``obj`` and calls its ``close()`` on the way out (an
    error raised inside the block still propagates). Subclasses define ``close``."""

    __slots__ = ()

    def close(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define close()")

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
