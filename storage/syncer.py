"""Bound what a power cut can take from ``durability="normal"``: a background WAL syncer.

With ``synchronous=NORMAL`` SQLite writes each commit to the WAL but fsyncs
the WAL only when it checkpoints, so a power cut can roll back every commit
since the last checkpoint (hundreds; measured by tests/test_power_loss.py).
A process crash loses nothing either way: the commits are in the OS page cache.

:class:`WalSyncer` closes that window the way PostgreSQL's WAL writer does for
``synchronous_commit=off``: a thread wakes every ``interval`` seconds and, if
any connection committed since its last sync, fsyncs ``PATH-wal``. A power cut
then loses at most the commits of about the last ``interval`` (plus the time
one fsync takes), and no caller ever waits for an fsync.

How it knows there are new commits: ``PRAGMA data_version`` on its own
connection changes whenever *another* connection commits to the file (any
process), and costs a few microseconds. It is read *before* the fsync, so a
commit that lands during the fsync is seen next time, never missed.

Why ``os.fsync`` on the WAL file: it is the smallest thing that makes the WAL's
frames durable. ``PRAGMA wal_checkpoint(PASSIVE)`` does not sync the WAL (it
copies pages into the database file and syncs that); a write transaction on a
``synchronous=FULL`` connection would sync it but takes the write lock from
the writers. The directory is fsynced once per new WAL file, so the file's
name survives too (SQLite does this itself only at its first WAL sync, which
under NORMAL comes with the first checkpoint).

The same thread also checkpoints (:meth:`WalSyncer.checkpoint_if_needed`):
SQLite otherwise runs a checkpoint inside whichever COMMIT takes the WAL past
1000 pages, so one commit in a few hundred waited milliseconds for it with
the write lock held (a quarter of all commit time on many small jobs). Here
it runs beside the writers, and they checkpoint themselves only past a
backstop of :data:`BACKSTOP_PAGES`, should this thread fall behind.

Threads do not survive ``fork()``: in a child the syncer is simply not
running, and :meth:`stop` there only drops the inherited connection without
using it (SQLite's rule for connections opened before a fork).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import weakref

from .errors import ConfigurationError
from .types import DEFAULT_SYNC_INTERVAL


#: WAL size (pages) past which the syncer checkpoints; SQLite's own default threshold.
CHECKPOINT_PAGES = 1000
#: The writers' own threshold while a syncer checkpoints for them: a backstop, reached only
#: if the syncer falls behind.
BACKSTOP_PAGES = 8000

_live: weakref.WeakSet[WalSyncer] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for syncer in list(_live):
        syncer._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class WalSyncer:
    """Fsync ``path + "-wal"`` at most every ``interval`` seconds while it has unsynced commits."""

    def __init__(self, path: str, interval: float) -> None:
        if not interval > 0:
            raise ConfigurationError(f"sync_interval must be > 0 seconds or None, not {interval!r}")
        self.path = path
        self.wal = path + "-wal"
        self.interval = interval
        #: How many fsyncs of the WAL this syncer made (for tests and benchmarks).
        self.syncs = 0
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._conn: sqlite3.Connection | None = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._seen: int | None = None
        self._page_size = int(self._conn.execute("PRAGMA page_size").fetchone()[0])
        #: How many checkpoints this syncer ran (for tests and benchmarks).
        self.checkpoints = 0
        self._checkpointed: int | None = None  # data_version at the last checkpoint
        self._wal_inode: int | None = None
        self._thread = threading.Thread(target=self._loop, name="walstate-syncer", daemon=True)
        _live.add(self)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync_if_needed()
                self.checkpoint_if_needed()
            except (OSError, sqlite3.Error):
                # A transient failure (file being replaced, database busy) is
                # retried at the next tick; the writers are never affected.
                continue
        try:
            self.sync_if_needed()  # what was committed before close() is synced too
        except (OSError, sqlite3.Error):
            pass

    def sync_if_needed(self) -> bool:
        """Fsync the WAL if anything was committed since the last sync; return whether it did."""
        conn = self._conn
        if conn is None:
            return False
        version = int(conn.execute("PRAGMA data_version").fetchone()[0])
        if version == self._seen:
            return False
        try:
            fd = os.open(self.wal, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._seen = version  # no WAL: everything is in the database file, synced at checkpoint
            return False
        try:
            inode = os.fstat(fd).st_ino
            os.fsync(fd)
        finally:
            os.close(fd)
        if inode != self._wal_inode:
            directory = os.open(os.path.dirname(os.path.abspath(self.wal)), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
            self._wal_inode = inode
        self._seen = version
        self.syncs += 1
        return True

    def checkpoint_if_needed(self) -> bool:
        """Checkpoint (PASSIVE) if the WAL file has reached :data:`CHECKPOINT_PAGES` pages and something
        was committed since the last checkpoint; return whether it did.

        SQLite's own checkpoint runs inside the COMMIT that crosses its
        threshold, with the write lock held and the committing thread
        waiting; here it runs on this thread, beside the writers (PASSIVE
        takes no lock they need), with the GIL released. The writers keep a
        higher threshold of their own as a backstop (``BACKSTOP_PAGES``, the
        ``autocheckpoint`` of :func:`~walstate.storage.connection.open_database`).
        The WAL file keeps its size when SQLite starts it over, so the size
        only says the WAL has been large; the commit check keeps an idle file
        from being checkpointed every tick.
        """
        conn = self._conn
        if conn is None:
            return False
        try:
            size = os.stat(self.wal).st_size
        except FileNotFoundError:
            return False
        if size < CHECKPOINT_PAGES * self._page_size:
            return False
        version = int(conn.execute("PRAGMA data_version").fetchone()[0])
        if version == self._checkpointed:
            return False
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self._checkpointed = version
        self.checkpoints += 1
        return True

    def _forked(self) -> None:
        # In a child the thread is gone; the connection belongs to the parent.
        self._conn = None

    def stop(self) -> None:
        """Sync what is left, stop the thread and close the connection (idempotent)."""
        self._stop.set()
        if os.getpid() == self._pid and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        conn, self._conn = self._conn, None
        if conn is not None and os.getpid() == self._pid:
            conn.close()
        _live.discard(self)
