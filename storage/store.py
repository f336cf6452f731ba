"""A walstate database: the opened file, its models, its reader and its one write path."""

from __future__ import annotations

import os

from .connection import Durability, open_database
from .reads import Reader
from .schema import bind_models, ensure_schema
from .writepath import WritePath


class Store:
    """Everything ``statemachine/`` needs from one SQLite file.

    ``readonly=True`` never creates or modifies the file and refuses files
    that are not walstate databases. ``group_commit`` lets concurrent state
    changes share one transaction (see :meth:`WritePath.commit`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "normal",
        busy_timeout: float = 5.0,
        readonly: bool = False,
        group_commit: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self.durability = durability
        self.readonly = readonly
        self.db = open_database(self.path, durability=durability, busy_timeout=busy_timeout, readonly=readonly)
        try:
            self.models = bind_models(self.db)
            schema = ensure_schema(self.db, self.models, self.path, create=not readonly)
            self.database_id = schema.database_id
            #: Schema versions this open upgraded the file through (empty when it was current).
            self.migrated = schema.applied
        except BaseException:
            self.db.close()
            raise
        self.read = Reader(self.db, self.path)
        self.write = WritePath(self.db, self.path, group_commit=group_commit)

    def close(self) -> None:
        """Close this thread's connection (other threads' close when they end)."""
        if not self.db.is_closed():
            self.db.close()
