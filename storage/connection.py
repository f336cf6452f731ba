"""Opening a SQLite file for walstate: pragmas as data, read back and checked.

SQLite's settings are easy to get silently wrong: ``synchronous`` is per
connection, WAL is per file, and ``:memory:`` or some file systems refuse WAL
without an error. So every connection gets the same pragmas (peewee applies
them on connect) and :func:`open_database` reads them back; a wrong value is a
:class:`ConfigurationError`, never a silent downgrade.
"""

from __future__ import annotations

import os
import pathlib
import sqlite3
import threading
from typing import Any

import peewee

from .errors import (
    ConfigurationError,
    DatabaseBusy,
    DatabaseError,
    DatabaseFull,
    DatabaseUnavailable,
    NotADatabase,
    WriteFailed,
)
from .types import DEFAULT_FILE_MODE, Durability


_SYNCHRONOUS = {"normal": 1, "full": 2}



class WriteLocked(peewee.Database):
    """One in-process write lock shared by every writer of a walstate database (either backend).

    walstate's write path takes :attr:`write_lock` before it begins a write
    transaction; so does a transaction that user code opens with
    ``db.atomic()`` (through :meth:`begin`). Threads of one process therefore
    queue on a Python lock instead of one holding the database's lock while
    another holds ours, which is how a handler's own ``step.db.atomic()``
    around ``once()`` used to wait for the busy timeout. The lock is
    re-entrant: inside such a transaction, walstate's own writes on the same
    thread become savepoints of it.

    Mixed in before the peewee database class. Besides the lock it gives the
    write path and the readers what differs between backends: :meth:`raw` (a
    connection with sqlite3's small API), :attr:`driver_errors` and
    :meth:`translate`.
    """

    write_lock: threading.RLock
    _held: threading.local
    #: The driver's exception classes: what :meth:`translate` maps to walstate's hierarchy.
    driver_errors: tuple[type[BaseException], ...] = (sqlite3.Error, peewee.PeeweeException)
    #: Statement that opens a write transaction.
    begin_write = "BEGIN IMMEDIATE"
    #: "sqlite" or "postgresql": for the few statements that cannot be spelled the same in both.
    dialect = "sqlite"

    def _init_lock(self) -> None:
        self.write_lock = threading.RLock()
        self._held = threading.local()

    def raw(self) -> Any:
        """This thread's connection, with ``execute``/``executemany``/``in_transaction`` as sqlite3 has them."""
        return self.connection()

    def writer(self) -> Any:
        """The connection for walstate's own write transactions, used only under :attr:`write_lock`.

        This thread's connection here; SQLite's database gives one connection
        shared by every thread (see :meth:`WalstateDatabase.writer`).
        """
        return self.raw()

    def close_writer(self) -> None:
        """Close the shared writer connection, if there is one (the next write opens it again)."""

    def translate(self, exc: BaseException, where: str, doing: str) -> DatabaseError:
        """Map a driver error to walstate's hierarchy, with an actionable message."""
        return translate(exc, where, doing)

    def portable(self, sql: str) -> str:
        """An application's statement with ``?`` placeholders, spelled for this database (see ``StepContext.execute``)."""
        return sql

    def transient(self, exc: BaseException) -> str | None:
        """``"busy"`` when the driver error ``exc`` refused a write that may simply be tried again (nothing was
        written), ``"lost"`` when the session went away (outcome unknown), None for anything lasting."""
        return "busy" if isinstance(translate(exc, "", ""), DatabaseBusy) else None

    def begin(self, *args: Any, **kwargs: Any) -> None:
        self.write_lock.acquire()
        try:
            super().begin(*args, **kwargs)
        except BaseException:
            self.write_lock.release()
            raise
        self._held.depth = getattr(self._held, "depth", 0) + 1

    def _release(self) -> None:
        depth = getattr(self._held, "depth", 0)
        if depth:
            self._held.depth = depth - 1
            self.write_lock.release()

    def commit(self) -> None:
        # On failure peewee rolls back next, and that releases the lock.
        super().commit()
        self._release()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._release()

    def after_fork_in_child(self) -> None:
        """Forget the parent's connections and locks without touching them.

        A connection opened before ``fork()`` must not be used in the child;
        closing it could even release the parent's locks, remove its WAL (SQLite)
        or end the parent's session (PostgreSQL shares the socket). The
        inherited connection object is parked forever (never closed, never
        collected) and the child opens its own on first use.
        """
        state: Any = getattr(self, "_state")
        if state.conn is not None:
            _ABANDONED.append(state.conn)
        self._state = type(state)()
        # peewee's own lock around connect(): a thread of the parent may have been opening its
        # connection at fork() (every run has threads of its own), and the child would wait forever.
        self._lock = threading.Lock()
        self._init_lock()


class WalstateDatabase(WriteLocked, peewee.SqliteDatabase):
    """peewee's SQLite database, with one in-process write lock shared by every writer (see :class:`WriteLocked`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_lock()
        self._writer: sqlite3.Connection | None = None

    def writer(self) -> sqlite3.Connection:
        """One connection, shared by this process's threads, for walstate's own write transactions.

        Used only under :attr:`write_lock` (so never by two threads at once),
        and only for transactions that run no user code (a transactional
        step's commit uses its thread's connection, where the handler's
        ``step.db`` writes). Why one: a SQLite connection keeps the pages it
        read cached until another connection writes the file; when every
        worker thread committed on its own connection, each commit found its
        cache stale and read its pages again.
        """
        conn = self._writer
        if conn is None:
            # As peewee's own _connect() opens a connection (its pragmas and hooks), but shareable.
            peewee_db: Any = self
            conn = sqlite3.connect(self.database, timeout=peewee_db._timeout, isolation_level=None,
                                   check_same_thread=False, **self.connect_params)
            try:
                peewee_db._add_conn_hooks(conn)
            except BaseException:
                conn.close()
                raise
            self._writer = conn
        return conn

    def close_writer(self) -> None:
        # Under the write lock: a write in progress on another thread finishes first.
        with self.write_lock:
            conn, self._writer = self._writer, None
            if conn is not None:
                conn.close()

    def close(self) -> bool:
        """Close this thread's connection and the shared writer connection."""
        self.close_writer()
        return bool(super().close())

    def after_fork_in_child(self) -> None:
        if self._writer is not None:
            _ABANDONED.append(self._writer)  # the parent's: never used or closed here
            self._writer = None
        super().after_fork_in_child()


#: Connections inherited across fork(): kept referenced so that their
#: finalizer never runs sqlite3_close() on the parent's file in the child.
_ABANDONED: list[object] = []


def _pragmas(durability: Durability, busy_timeout: float, autocheckpoint: int | None) -> dict[str, object]:
    # peewee applies them in this order on every new connection. busy_timeout comes first:
    # switching a file to WAL takes a lock, and with several processes opening one file at
    # once a connection without its busy timeout yet failed at once with "database is locked".
    pragmas: dict[str, object] = {
        "busy_timeout": int(busy_timeout * 1000),
        "journal_mode": "wal",
        "synchronous": _SYNCHRONOUS[durability],
        "foreign_keys": 1,
    }
    if autocheckpoint is not None:
        pragmas["wal_autocheckpoint"] = autocheckpoint
    return pragmas


def open_database(
    path: str,
    *,
    durability: Durability = "normal",
    busy_timeout: float = 5.0,
    readonly: bool = False,
    autocheckpoint: int | None = None,
    file_mode: int | None = DEFAULT_FILE_MODE,
) -> WalstateDatabase:
    """Open (creating it unless ``readonly``) the SQLite file at ``path`` in WAL mode.

    ``durability="normal"`` survives a process crash; ``"full"`` also survives
    power loss, at the cost of an fsync per commit. ``readonly`` opens the file
    with ``mode=ro`` and never creates or changes it (for inspection tools).
    ``autocheckpoint`` is the WAL size (pages) at which a committing
    connection checkpoints (SQLite's default, 1000, when ``None``): higher
    while a background thread checkpoints instead (see ``storage.syncer``).
    ``file_mode`` is the permission bits a *new* file is created with
    (default 0o600, owner only: contexts, outputs and messages are private);
    SQLite gives ``PATH-wal`` and ``PATH-shm`` the database file's mode.
    ``None`` leaves it to the umask. An existing file keeps its mode.

    A read-only open of a file that has no ``PATH-wal`` (no connection has it
    open) opens it read-write with ``query_only``: closing it then removes the
    ``-wal`` and ``-shm`` SQLite made for the read (a ``mode=ro`` connection
    cannot, and left them behind); with nothing in the WAL, the close writes
    nothing to the file. Otherwise (another connection has it open, or the
    file is not writable) it opens with ``mode=ro``.

    Raises :class:`DatabaseUnavailable`, :class:`NotADatabase` or
    :class:`ConfigurationError`, each naming the path.
    """
    if durability not in _SYNCHRONOUS:
        raise ConfigurationError(f"durability must be 'normal' or 'full', not {durability!r}")
    if busy_timeout < 0:
        raise ConfigurationError("busy_timeout must be >= 0 seconds")
    path = os.fspath(path)
    if readonly:
        if not os.path.exists(path):
            raise DatabaseUnavailable(f"{path}: no such file", path)
        # mode=ro, not PRAGMA query_only, when a WAL is there: a query_only connection that is
        # the last to close still checkpoints the WAL into the file, changing its bytes. A
        # mode=ro reader never writes the database file, but leaves PATH-wal and PATH-shm
        # beside it; so with no WAL (nothing to checkpoint) the read goes through a read-write
        # connection that may not write (mode=rw: never creates the file), whose close removes them.
        clean = not os.path.exists(path + "-wal") and os.access(path, os.W_OK) and \
            os.access(os.path.dirname(os.path.abspath(path)), os.W_OK)
        uri = pathlib.Path(path).absolute().as_uri() + ("?mode=rw" if clean else "?mode=ro")
        pragmas: dict[str, object] = {"busy_timeout": int(busy_timeout * 1000)}
        if clean:
            pragmas["query_only"] = 1
        db = WalstateDatabase(uri, uri=True, pragmas=pragmas)
    else:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise DatabaseUnavailable(f"{path}: directory {directory} does not exist", path)
        if file_mode is not None and path not in ("", ":memory:"):
            _create_private(path, file_mode)
        db = WalstateDatabase(path, pragmas=_pragmas(durability, busy_timeout, autocheckpoint), lock_type="IMMEDIATE")
    try:
        db.connect(reuse_if_open=True)
        conn = db.connection()
        # The first real read is what tells a non-SQLite or corrupt file apart.
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if not readonly:
            _check_pragmas(conn, path, durability)
    except BaseException as exc:
        db.close()
        if isinstance(exc, (sqlite3.Error, peewee.PeeweeException)):
            raise translate(exc, path, "opening the database") from exc
        raise
    return db


def _create_private(path: str, mode: int) -> None:
    """Create ``path`` empty with ``mode`` (exactly: the umask is not applied) unless it exists.

    SQLite creates a missing file with the umask's mode (0644 by default: every
    local user could read every job) and gives ``-wal``/``-shm`` the mode of the
    database file; creating the file first is how its mode is chosen. SQLite
    reads an empty file as an empty database.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return
    except OSError as exc:
        raise DatabaseUnavailable(f"{path}: cannot create the file ({exc}); check that its directory exists and is "
                                  "writable", path) from exc
    try:
        os.fchmod(fd, mode)  # os.open applied the umask
    finally:
        os.close(fd)


def _check_pragmas(conn: sqlite3.Connection, path: str, durability: Durability) -> None:
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    if str(mode).lower() != "wal":
        raise ConfigurationError(
            f"{path}: SQLite refused WAL mode (journal_mode is {mode!r}); walstate needs a file "
            "on a local file system (not ':memory:', not a network share)"
        )
    sync = conn.execute("PRAGMA synchronous").fetchone()[0]
    if sync != _SYNCHRONOUS[durability]:
        raise ConfigurationError(f"{path}: synchronous is {sync}, expected {_SYNCHRONOUS[durability]} for {durability!r}")
    if conn.execute("PRAGMA foreign_keys").fetchone()[0] != 1:
        raise ConfigurationError(f"{path}: this SQLite build does not enforce foreign keys")


def translate(exc: BaseException, path: str, doing: str) -> DatabaseError:
    """Map a sqlite3/peewee error to walstate's hierarchy, with an actionable message."""
    text = str(exc)
    low = text.lower()
    code = getattr(exc, "sqlite_errorname", "") or ""
    if "not a database" in low or "malformed" in low or code in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
        return NotADatabase(
            f"{path}: not a SQLite database or corrupt ({text}) while {doing}; restore it from a backup "
            "or point walstate at another file",
            path,
        )
    if "locked" in low or "busy" in low or code.startswith("SQLITE_BUSY"):
        return DatabaseBusy(
            f"{path}: database is locked by another connection ({text}) while {doing}; "
            "retry, or raise busy_timeout",
            path,
        )
    if "full" in low or code == "SQLITE_FULL":
        return DatabaseFull(f"{path}: disk or database full ({text}) while {doing}; free space and retry", path)
    if "unable to open" in low or "readonly" in low or "read-only" in low or code.startswith(("SQLITE_CANTOPEN", "SQLITE_READONLY")):
        return DatabaseUnavailable(
            f"{path}: cannot open or write the file ({text}) while {doing}; check that the file and its "
            "directory exist and are writable (WAL also writes PATH-wal and PATH-shm beside it)",
            path,
        )
    return WriteFailed(f"{path}: SQLite error while {doing}: {text}", path)
