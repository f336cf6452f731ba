"""A walstate database: the opened file, its models, its reader and its one write path."""

from __future__ import annotations

import os

from .connection import Durability, open_database
from .reads import Reader
from .schema import bind_models, ensure_schema
from .syncer import DEFAULT_SYNC_INTERVAL, WalSyncer
from .writepath import WritePath


class Store:
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
    ) -> None:
        self.path = os.fspath(path)
        self.durability = durability
        self.readonly = readonly
        self.db = open_database(self.path, durability=durability, busy_timeout=busy_timeout, readonly=readonly)
        try:
            self.models = bind_models(self.db)
            self.database_id = ensure_schema(self.db, self.models, self.path, create=not readonly)
        except BaseException:
            self.db.close()
            raise
        self.read = Reader(self.db, self.path)
        self.write = WritePath(self.db, self.path, group_commit=group_commit)
        self.syncer: WalSyncer | None = None
        if sync_interval is not None and durability == "normal" and not readonly:
            try:
                self.syncer = WalSyncer(self.path, sync_interval)
            except BaseException:
                self.db.close()
                raise

    def close(self) -> None:
        """Stop the syncer (after a last sync) and close this thread's connection (other threads' close when they end)."""
        if self.syncer is not None:
            self.syncer.stop()
        if not self.db.is_closed():
            self.db.close()
