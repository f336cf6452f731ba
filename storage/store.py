"""A walstate database: the opened file, its models, its reader and its one write path."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any

from .connection import open_database
from .errors import ConfigurationError
from .leaseclock import sqlite_lease_clock
from .operations import SqlOperations
from .reads import Reader
from .schema import bind_models, ensure_schema
from .syncer import BACKSTOP_PAGES, WalSyncer
from .types import DEFAULT_FILE_MODE, DEFAULT_SYNC_INTERVAL, Durability
from .writepath import WritePath


class Store(SqlOperations):
    """Everything ``statemachine/`` needs from one SQLite file.

    ``readonly=True`` never creates or modifies the file and refuses files
    that are not walstate databases. ``group_commit`` lets concurrent state
    changes share one transaction (see :meth:`WritePath.commit`).

    ``sync_interval`` (``durability="normal"`` only) starts a background
    :class:`~walstate.storage.syncer.WalSyncer` that fsyncs the WAL at most
    every ``sync_interval`` seconds while it has unsynced commits, so a power
    cut loses at most about the last ``sync_interval`` of commits; ``None``
    turns it off (a power cut may then lose everything since the last
    checkpoint). ``"full"`` fsyncs every commit and needs no syncer.

    ``database_id`` is for tests (``walstate.testing``) only: a *new* file
    gets this id instead of a random one, so two files made for the same test
    give their steps the same idempotency keys. Raises ConfigurationError if
    the file already exists with another id. Production files must keep their
    random ids: the id is what tells two databases' idempotency keys apart.

    ``file_mode``: the permission bits of a file this creates (default 0o600,
    owner only; ``-wal`` and ``-shm`` get the same); ``None``: the umask's.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "normal",
        busy_timeout: float = 5.0,
        readonly: bool = False,
        group_commit: bool = True,
        sync_interval: float | None = DEFAULT_SYNC_INTERVAL,
        database_id: str | None = None,
        file_mode: int | None = DEFAULT_FILE_MODE,
    ) -> None:
        self.path = os.fspath(path)
        self.durability = durability
        self.readonly = readonly
        syncing = sync_interval is not None and durability == "normal" and not readonly
        self.db = open_database(self.path, durability=durability, busy_timeout=busy_timeout, readonly=readonly,
                                autocheckpoint=BACKSTOP_PAGES if syncing else None, file_mode=file_mode)
        try:
            self.models = bind_models(self.db)
            schema = ensure_schema(self.db, self.models, self.path, create=not readonly, database_id=database_id)
            if database_id is not None and schema.database_id != database_id:
                raise ConfigurationError(f"{self.path}: this file's database id is {schema.database_id!r}, not "
                                         f"{database_id!r}; an existing file keeps its id (use a new file)")
            self.database_id = schema.database_id
            #: Schema versions this open upgraded the file through (empty when it was current).
            self.migrated = schema.applied
            try:
                #: What leases are set and judged with (never an engine's clock): see :mod:`.leaseclock`.
                self.lease_clock = sqlite_lease_clock(self.db.connection(), write=not readonly)
            except self.db.driver_errors as exc:
                raise self.db.translate(exc, self.path, "reading the file's lease clock") from exc
        except BaseException:
            self.db.close()
            raise
        self.read = Reader(self.db, self.path)
        self.write = WritePath(self.db, self.path, group_commit=group_commit, lease_clock=self.lease_clock)
        _stores.add(self)
        self.syncer: WalSyncer | None = None
        if syncing:
            assert sync_interval is not None
            try:
                self.syncer = WalSyncer(self.path, sync_interval)
            except BaseException:
                self.db.close()
                raise

    def synced(self, local: Callable[[], float]) -> Callable[[], float]:
        """``local`` unchanged: every process on one file reads the same machine's clock (leases: ``lease_clock``)."""
        return local

    def close(self) -> None:
        """Stop the syncer (after a last sync) and close this thread's connection (other threads' close when they end)."""
        if self.syncer is not None:
            self.syncer.stop()
        if not self.db.is_closed():
            self.db.close()
        self.db.close_writer()  # also when this thread never opened a connection of its own

    def _after_fork_in_child(self) -> None:
        # SQLite forbids using the parent's connection in a child: drop it
        # (without closing it) and the write path's locks, which another
        # thread of the parent may have held at the fork.
        self.db.after_fork_in_child()
        self.write.after_fork_in_child()


# Every open store of this process, SQLite or PostgreSQL (both fork the same way).
_stores: weakref.WeakSet[Any] = weakref.WeakSet()
_forking: list[Any] = []


def _before_fork() -> None:
    # No write transaction of this process may be open at fork(): SQLite's
    # per-process lock records are copied into the child, which would then see
    # the file locked for good. So fork() waits for in-flight writes (a
    # transactional step's handler included) to commit.
    _forking[:] = list(_stores)
    for store in _forking:
        store.db.write_lock.acquire()


def _after_fork_in_parent() -> None:
    for store in reversed(_forking):
        store.db.write_lock.release()
    _forking.clear()


def _after_fork_in_child() -> None:
    _forking.clear()
    for store in list(_stores):
        store._after_fork_in_child()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
