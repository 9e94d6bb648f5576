"""The Engine's migration methods: ``migrate`` and ``resume_migrated`` (a part of
:class:`~pagedkv.Engine`, which subclasses :class:`MigrationAPI`). They validate and
delegate: between engines to :mod:`pagedkv.engine.migration`, through a store to
:mod:`pagedkv.engine.migration_store`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, overload

from pagedkv.engine import migration_store, sessions
from pagedkv.engine.core import EngineCore
from pagedkv.engine.migration import Migration, MigrationResult, Migrator
from pagedkv.engine.sessions import StoreSpec
from pagedkv.errors import EngineClosedError


class MigrationAPI:
    """Moving requests to another engine (see :meth:`migrate`)."""

    core: EngineCore
    vocab_size: int
    snapshot_store: StoreSpec | None

    if TYPE_CHECKING:  # Engine's read-only property

        @property
        def closed(self) -> bool: ...

    @overload
    def migrate(
        self, request_id: int, target: Any = None, *, background: Literal[False] = False,
        store: StoreSpec | None = None, name: str | None = None, overwrite: bool = False,
    ) -> MigrationResult: ...  # fmt: skip
    @overload
    def migrate(
        self, request_id: int, target: Any = None, *, background: Literal[True],
        store: None = None, name: None = None, overwrite: bool = False,
    ) -> Migration: ...  # fmt: skip
    def migrate(
        self, request_id: int, target: Any = None, *, background: bool = False,
        store: StoreSpec | None = None, name: str | None = None, overwrite: bool = False,
    ) -> MigrationResult | Migration:  # fmt: skip
        """Move a queued or running request to engine ``target`` (same model, dtype and
        block size), or park it in a snapshot store for another process
        (:meth:`resume_migrated`); in batch-invariant mode its tokens are identical to
        never having moved (greedy and seeded sampling).

        ``background=False``: copy its KV now and switch; returns the
        :class:`~pagedkv.engine.migration.MigrationResult` (the request's new id on
        ``target``, blocks and bytes copied, the pause). ``background=True``: start the
        copy on a thread of its own and return a
        :class:`~pagedkv.engine.migration.Migration` at once; keep stepping both engines
        (this one keeps decoding the request) and call its ``finish()`` between steps,
        when ``ready()``, for a short stop-and-copy. Between engines of different devices
        (``cpu``, ``cuda:i``) the bytes go device to device or through pinned host memory.

        ``store`` (a directory, a ``redis://`` URL or a SnapshotStore; default the
        engine's ``snapshot_store``) instead of ``target``: save the request (its KV and
        state) as snapshot ``name`` (generated when ``None``; an existing one needs
        ``overwrite``) and drop it here (see :mod:`pagedkv.engine.migration_store`).

        The request leaves this engine only at the switch (a stream following it here
        ends with ``finish_reason="migrated"``; the target reports its output). Raises
        ``KeyError`` (unknown request), ``ValueError`` (a finished one, a bad target,
        another model), ``TypeError``, :class:`~pagedkv.errors.OutOfBlocks` (no room on
        the target), ``MigrationError``, ``SnapshotError``; on any error this engine
        still serves the request, unchanged. Both engines must not be stepping meanwhile
        (see :mod:`pagedkv.engine.migration`).
        """
        if self.closed:
            raise EngineClosedError("this Engine is closed: nothing to migrate")
        if not isinstance(background, bool):
            raise TypeError(f"background must be True or False, got {background!r}")
        if target is not None:
            if store is not None or name is not None:
                raise ValueError("pass either target= (an Engine) or store= and name=, not both")
            migrator = Migrator(self, target)
            if not background:
                with migrator:
                    return migrator.migrate(request_id)
            try:
                started = migrator.start(request_id)
            except BaseException:
                migrator.close()
                raise
            started.owns_migrator = True
            return started
        if background:
            raise ValueError(
                "background=True moves to an engine (target=); through a store the request "
                "is parked in one stop-and-copy"
            )
        with sessions.open_store(store, self.snapshot_store) as opened:
            return migration_store.park(self.core, opened, request_id, name, overwrite)

    def resume_migrated(
        self, name: str, *, store: StoreSpec | None = None, keep: bool = False
    ) -> int:
        """Take over the request parked as snapshot ``name`` by :meth:`migrate` (in this or
        another process) and serve it from the next step; returns its id here. Its output
        so far is in its outputs; the snapshot is deleted unless ``keep``. Raises
        ``SnapshotError`` (unknown name, not a parked request, another model or layout)
        or :class:`~pagedkv.errors.OutOfBlocks` (no room now); nothing changes then."""
        if self.closed:
            raise EngineClosedError("this Engine is closed: build a new one to resume")
        with sessions.open_store(store, self.snapshot_store) as opened:
            return migration_store.unpark(
                self.core, opened, name, vocab_size=self.vocab_size, keep=keep
            )
