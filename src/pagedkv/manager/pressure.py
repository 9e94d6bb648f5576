"""Memory pressure: levels from the fraction of blocks in use, and who hears of changes."""

from __future__ import annotations

import enum
from collections.abc import Callable


class MemoryPressure(enum.IntEnum):
    """How full the pool is with blocks in use (cached blocks are reclaimable)."""

    LOW = 0
    MEDIUM = 1
    HIGH = 2
    CRITICAL = 3


PressureCallback = Callable[[MemoryPressure], None]
_ABOVE = (MemoryPressure.MEDIUM, MemoryPressure.HIGH, MemoryPressure.CRITICAL)


def pressure_level(used: int, total: int, watermarks: tuple[float, float, float]) -> MemoryPressure:
    """The level of ``used`` of ``total`` blocks: the highest watermark reached."""
    fraction = used / total
    level = MemoryPressure.LOW
    for threshold, above in zip(watermarks, _ABOVE):
        if fraction >= threshold:
            level = above
    return level


class PressureWatch:
    """Callbacks to call, in order, when the level changes (the manager holds one only
    once someone subscribed, so an operation without listeners pays nothing)."""

    __slots__ = ("watermarks", "level", "callbacks")

    def __init__(self, watermarks: tuple[float, float, float], level: MemoryPressure) -> None:
        self.watermarks = watermarks
        self.level = level
        self.callbacks: list[PressureCallback] = []

    def update(self, used: int, total: int) -> None:
        """Call every callback with the new level if it changed."""
        level = pressure_level(used, total, self.watermarks)
        if level != self.level:
            self.level = level
            for cb in list(self.callbacks):
                cb(level)
