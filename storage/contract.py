"""The storage contract: what ``statemachine/`` may use of a walstate database, whichever backend holds it.

Two implementations: :class:`walstate.storage.store.Store` (a SQLite file in
WAL mode) and :class:`walstate.storage.postgres.PgStore` (a PostgreSQL
database). :func:`open_store` picks one from the target: a
``postgresql://`` URL selects PostgreSQL, anything else is a SQLite path.
Both run the same statements through the same :class:`~.writepath.WritePath`
and :class:`~.reads.Reader` (dialect differences live in their subclasses and
in :mod:`.postgres`), and one contract suite (tests marked ``backends``) runs
every behaviour against both.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

from .connection import WriteLocked
from .reads import Reader
from .types import DEFAULT_FILE_MODE, DEFAULT_SYNC_INTERVAL, Durability
from .writepath import WritePath


class Storage(Protocol):
    """An opened walstate database (read-only attributes: stores are never re-pointed)."""

    @property
    def path(self) -> str:
        """What messages name: the file's path, or the URL without its password."""
        ...

    @property
    def durability(self) -> Durability: ...

    @property
    def readonly(self) -> bool: ...

    @property
    def db(self) -> WriteLocked:
        """The peewee database: its transaction stack, its write lock, and ``step.db`` for transactional steps."""
        ...

    @property
    def read(self) -> Reader: ...

    @property
    def write(self) -> WritePath: ...

    @property
    def database_id(self) -> str:
        """The database's stable random id (part of every idempotency key)."""
        ...

    @property
    def migrated(self) -> tuple[int, ...]:
        """Schema versions this open upgraded the database through."""
        ...

    @property
    def lease_clock(self) -> Callable[[], float]:
        """What leases are set and judged with: a clock every process agrees on and no wall-clock step moves."""
        ...

    def synced(self, local: Callable[[], float]) -> Callable[[], float]:
        """``local`` as wake-ups must use it (on PostgreSQL: corrected to the server's clock); leases use ``lease_clock``."""
        ...

    def close(self) -> None:
        """Close this thread's connection (and what else the store opened)."""
        ...


def open_store(
    target: str | os.PathLike[str],
    *,
    durability: Durability = "normal",
    busy_timeout: float = 5.0,
    readonly: bool = False,
    group_commit: bool = True,
    sync_interval: float | None = DEFAULT_SYNC_INTERVAL,
    database_id: str | None = None,
    file_mode: int | None = DEFAULT_FILE_MODE,
) -> Storage:
    """Open the walstate database at ``target``: a ``postgresql://`` URL or a SQLite file path.

    ``file_mode`` (SQLite only) is the permission bits of a file this creates: owner only by default.
    """
    # A string test, not storage.postgres's: SQLite users never import psycopg.
    if isinstance(target, str) and target.startswith(("postgresql://", "postgres://")):
        from .postgres import PgStore

        return PgStore(str(target), durability=durability, busy_timeout=busy_timeout, readonly=readonly,
                       group_commit=group_commit, database_id=database_id)
    from .store import Store

    return Store(target, durability=durability, busy_timeout=busy_timeout, readonly=readonly,
                 group_commit=group_commit, sync_interval=sync_interval, database_id=database_id,
                 file_mode=file_mode)


__all__ = ["Storage", "open_store"]
