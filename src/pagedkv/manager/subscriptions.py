"""Who hears the manager's KV events: subscribe, unsubscribe, batches, other threads.

:class:`EventSource` is the part of :class:`~pagedkv.manager.BlockManager` that hands
out subscriptions (it subclasses it). The hub exists only while someone subscribes:
a finished operation checks one flag (``_observed``: pressure callbacks or events),
and that is all events cost without subscribers. What the events mean is in :mod:`pagedkv.events`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from pagedkv._validate import check_callable
from pagedkv.events import EventHub, KVEvent, Subscriber
from pagedkv.manager.allocator import BlockAllocator
from pagedkv.manager.pressure import PressureWatch


class EventSource:
    """KV event subscriptions of a block manager."""

    _events: EventHub | None
    _alloc: BlockAllocator
    _watch: PressureWatch | None
    _observed: bool

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(events)`` after each operation that stored or removed blocks.

        ``events`` is a list of :class:`~pagedkv.events.BlockStored`,
        :class:`~pagedkv.events.BlockRemoved` and :class:`~pagedkv.events.AllBlocksCleared`
        in the order they happened. Returns a function that unsubscribes (idempotent).
        A callback that raises is logged on ``pagedkv.events`` and unsubscribed; the
        operation that triggered it has completed and stays done.
        """
        check_callable(callback, "callback", "(events: list) -> None")
        hub = self._events
        if hub is None:
            hub = self._events = self._alloc.events = EventHub()
            self._observed = True
        hub.subscribers.append(callback)
        done = False

        def unsubscribe() -> None:
            nonlocal done
            if not done:
                done = True
                hub.remove(callback)
                self._drop_idle_hub(hub)

        return unsubscribe

    def _drop_idle_hub(self, hub: EventHub) -> None:
        # Without subscribers the hub goes, so operations pay nothing again; not while a
        # batch is open (its end() still comes).
        if hub is self._events and not hub.subscribers and not hub.depth:
            self._events = self._alloc.events = None
            self._observed = self._watch is not None

    @property
    def subscribers(self) -> int:
        """How many callbacks are subscribed."""
        return 0 if self._events is None else len(self._events.subscribers)

    def publish_events(self, events: Iterable[KVEvent]) -> None:
        """Queue events of another component (a tier: ``medium="cpu"``, ...) for the next
        batch; thread-safe, and they are dropped while nobody subscribes. They are
        delivered on the thread of the next operation that ends a batch, or by
        :meth:`deliver_events`."""
        hub = self._events
        if hub is not None:
            hub.publish(events)

    def deliver_events(self) -> None:
        """Deliver every queued event now (e.g. tier events after a flush)."""
        hub = self._events
        if hub is not None and not hub.depth:
            hub.deliver()

    @contextmanager
    def event_batch(self) -> Iterator[None]:
        """Deliver the events of every operation inside as one batch, at the end (an
        engine step, a cache operation made of several manager operations)."""
        hub = self._events
        if hub is None:  # nobody listens now; one who subscribes inside gets per-op batches
            yield
            return
        hub.depth += 1
        try:
            yield
        finally:
            hub.depth -= 1
            hub.end()
            self._drop_idle_hub(hub)
