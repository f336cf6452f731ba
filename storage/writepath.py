"""The one write path: every change of walstate state is written here and nowhere else.

A state change is a compare-and-set: ``UPDATE … WHERE id=? AND state=<expected>``
(fenced by the job's owner) plus one append-only journal row, in one
``BEGIN IMMEDIATE`` transaction, and :meth:`WritePath.commit` returns only after
COMMIT. The changes of one ``commit`` call are all-or-nothing: if any
compare-and-set misses, none is written and :class:`StaleState` (or
:class:`LeaseLost`) says which row and what state it really had. With group
commit, the calls of several threads share one transaction, each still
all-or-nothing on its own.

Statements are fixed class-level strings with ``?`` placeholders, executed on
peewee's connection: peewee's query builder costs several times the raw
statement per change on this hot path.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import peewee

from . import faults
from .connection import translate
from .errors import LeaseLost, StaleState, WalstateError

JSONMerge = Callable[[dict[str, Any]], str]


@dataclass(slots=True)
class ContextPatch:
    """Fields to merge into a job's context in the same transaction as a change.

    ``merge`` receives the context as stored *now* (inside the transaction, so
    parallel steps never overwrite each other's fields), returns the validated
    JSON text to store, and raises a :class:`WalstateError` to refuse it.
    """

    patch: dict[str, Any]
    merge: JSONMerge


@dataclass(slots=True)
class Change:
    """One state change of a sub-step (``kind="step"``) or of a job (``kind="job"``).

    ``owner`` is the job owner the writer believes it is; a change whose job has
    another owner is refused (fencing). ``output``/``error`` are stored as given
    (JSON text / message), replacing the previous values.
    """

    kind: str
    row_id: int
    job_id: int
    step: str | None
    expected: str
    new: str
    attempt: int = 0
    owner: str | None = None
    output: str | None = None
    error: str | None = None
    note: str | None = None
    context: ContextPatch | None = field(default=None)
    #: For a job change: ``(new_owner, lease_expires)`` to take the job over (or, with
    #: ``(None, None)``, release it) in the same commit.
    claim: tuple[str | None, float | None] | None = None


class _Request:
    """One caller's changes waiting for a group commit."""

    __slots__ = ("changes", "done", "error")

    def __init__(self, changes: Sequence[Change]) -> None:
        self.changes = changes
        self.done = False
        self.error: BaseException | None = None


class WritePath:
    """Writes walstate's state changes to one database, one transaction per batch."""

    _UPDATE_STEP = (
        "UPDATE walstate_step SET state=?, attempt=?, output=?, error=?, updated_at=? "
        "WHERE id=? AND state=? AND (SELECT owner FROM walstate_job WHERE id=?) IS ?"
    )
    _UPDATE_JOB = (
        "UPDATE walstate_job SET state=?, error=?, updated_at=? "
        "WHERE id=? AND state=? AND owner IS ?"
    )
    _UPDATE_JOB_CLAIM = (
        "UPDATE walstate_job SET state=?, error=?, updated_at=?, owner=?, lease_expires=? "
        "WHERE id=? AND state=? AND owner IS ?"
    )
    _JOURNAL = (
        "INSERT INTO walstate_journal (job_id, step, from_state, to_state, attempt, at, note) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)"
    )
    _READ_CONTEXT = "SELECT context FROM walstate_job WHERE id=?"
    _WRITE_CONTEXT = "UPDATE walstate_job SET context=?, updated_at=? WHERE id=?"

    def __init__(self, db: peewee.SqliteDatabase, path: str, *, group_commit: bool = True) -> None:
        self.db = db
        self.path = path
        self.group_commit = group_commit
        # One writer at a time inside this process: threads queue on a Python
        # lock instead of spinning in SQLite's busy handler. Re-entrant because
        # a transactional step may record a once() result inside its commit.
        self._lock = threading.RLock()
        # Group commit: callers queue their changes; the first to find no
        # leader writes everything queued in one transaction, then wakes them.
        self._queue: list[_Request] = []
        self._leader = False
        self._cv = threading.Condition(threading.Lock())
        #: Batch sizes written by group commit (for benchmarks): count of batches, of changes.
        self.batches = 0
        self.batched_requests = 0
        self._last_batch = 0

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any ``BaseException``.

        Registered on peewee's transaction stack, so a handler's own
        ``db.atomic()`` inside it becomes a savepoint of this transaction.
        Rolls back only if SQLite has not already done so: after SQLITE_FULL
        or an I/O error SQLite may end the transaction itself, and a second
        ROLLBACK would hide the real error.
        """
        db = self.db
        if db.transaction_depth() > 0:
            with db.atomic():
                yield db.connection()
            return
        conn = db.connection()
        conn.execute("BEGIN IMMEDIATE")
        db.push_transaction(self)
        try:
            yield conn
        except BaseException:
            db.pop_transaction()
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        db.pop_transaction()
        try:
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # -- state changes ---------------------------------------------------------

    def commit(
        self,
        changes: Sequence[Change] = (),
        effect: Callable[[], Sequence[Change]] | None = None,
    ) -> None:
        """Apply ``changes`` (and those ``effect`` returns) atomically; return after COMMIT.

        ``effect`` runs inside the transaction before the changes are applied:
        a transactional step's database writes commit together with its
        completion, or not at all. Raises :class:`StaleState`,
        :class:`LeaseLost` or a :class:`DatabaseError`; on any exception
        nothing was written.
        """
        faults.point("before_begin")
        if self.group_commit and effect is None and self.db.transaction_depth() == 0:
            self._commit_grouped(_Request(changes))
        else:
            with self._lock:
                try:
                    with self._transaction() as conn:
                        if effect is not None:
                            changes = [*changes, *effect()]
                        now = time.time()
                        for change in changes:
                            self._apply(conn, change, now)
                        faults.point("before_commit")
                except (sqlite3.Error, peewee.PeeweeException) as exc:
                    raise translate(exc, self.path, "writing a state change") from exc
        faults.point("after_commit")

    def _commit_grouped(self, request: _Request) -> None:
        """Leader/follower group commit: whoever finds no leader writes the whole queue.

        A lone caller leads at once (no waiting for company); callers that
        arrive while a commit is in progress queue up and the next leader
        writes them all in one transaction, each in its own savepoint so one
        stale change fails alone. Every caller returns only after the COMMIT
        that holds its change.
        """
        with self._cv:
            self._queue.append(request)
            while not request.done:
                if not self._leader:
                    self._leader = True
                    busy = self._last_batch > 1
                    if not busy:
                        batch, self._queue = self._queue, []
                    break
                self._cv.wait()
            else:
                if request.error is not None:
                    raise request.error
                return
        if busy:
            # Writers are busy: the callers the last commit just woke are about to
            # queue their next change. One yield of the GIL lets them join this
            # batch; a lone writer (last batch of one) never pays for it.
            time.sleep(0)
            with self._cv:
                batch, self._queue = self._queue, []
        self._last_batch = len(batch)
        crash: BaseException | None = None
        try:
            with self._lock:
                self._write_batch(batch)
        except (sqlite3.Error, peewee.PeeweeException) as exc:
            error = translate(exc, self.path, "writing a state change")
            for r in batch:
                r.error = r.error or error
        except WalstateError as exc:  # a one-request batch: it failed alone
            for r in batch:
                r.error = r.error or exc
        except BaseException as exc:  # a crash (or a bug): nothing of the batch committed
            crash = exc
            for r in batch:
                r.error = exc
        finally:
            with self._cv:
                self._leader = False
                for r in batch:
                    r.done = True
                self._cv.notify_all()
        if crash is not None:
            raise crash
        if request.error is not None:
            raise request.error

    def _write_batch(self, batch: list[_Request]) -> None:
        self.batches += 1
        self.batched_requests += len(batch)
        with self._transaction() as conn:
            now = time.time()
            if len(batch) == 1:
                for change in batch[0].changes:
                    self._apply(conn, change, now)
            else:
                for r in batch:
                    if len(r.changes) == 1 and r.changes[0].context is None:
                        # A lone CAS that misses changes nothing and raises before
                        # its journal row: no savepoint needed to undo it.
                        try:
                            self._apply(conn, r.changes[0], now)
                        except WalstateError as exc:
                            r.error = exc
                        continue
                    conn.execute("SAVEPOINT walstate_change")
                    try:
                        for change in r.changes:
                            self._apply(conn, change, now)
                    except WalstateError as exc:
                        conn.execute("ROLLBACK TO walstate_change")
                        r.error = exc
                    conn.execute("RELEASE walstate_change")
            faults.point("before_commit")

    def _apply(self, conn: sqlite3.Connection, c: Change, now: float) -> None:
        if c.context is not None:
            self._merge_context(conn, c.job_id, c.context, now)
        if c.kind == "step":
            cur = conn.execute(
                self._UPDATE_STEP,
                (c.new, c.attempt, c.output, c.error, now, c.row_id, c.expected, c.job_id, c.owner),
            )
        elif c.kind == "job":
            if c.claim is None:
                cur = conn.execute(self._UPDATE_JOB, (c.new, c.error, now, c.row_id, c.expected, c.owner))
            else:
                new_owner, lease = c.claim
                cur = conn.execute(self._UPDATE_JOB_CLAIM,
                                   (c.new, c.error, now, new_owner, lease, c.row_id, c.expected, c.owner))
        else:
            raise ValueError(f"unknown change kind {c.kind!r}")
        faults.point("after_update")
        if cur.rowcount != 1:
            self._explain_miss(conn, c)
        conn.execute(self._JOURNAL, (c.job_id, c.step, c.expected, c.new, c.attempt, now, c.note))
        faults.point("after_journal")

    def _merge_context(self, conn: sqlite3.Connection, job_id: int, patch: ContextPatch, now: float) -> None:
        row = conn.execute(self._READ_CONTEXT, (job_id,)).fetchone()
        if row is None:
            raise StaleState(f"{self.path}: job {job_id} does not exist", kind="job", row_id=job_id, expected="", actual=None)
        merged = {**json.loads(row[0]), **patch.patch}
        conn.execute(self._WRITE_CONTEXT, (patch.merge(merged), now, job_id))

    def _explain_miss(self, conn: sqlite3.Connection, c: Change) -> None:
        owner_row = conn.execute("SELECT owner FROM walstate_job WHERE id=?", (c.job_id,)).fetchone()
        if c.kind == "step":
            row = conn.execute("SELECT state FROM walstate_step WHERE id=?", (c.row_id,)).fetchone()
            what = f"sub-step {c.step!r} of job {c.job_id}"
        else:
            row = owner_row and conn.execute("SELECT state FROM walstate_job WHERE id=?", (c.row_id,)).fetchone()
            what = f"job {c.job_id}"
        actual = row[0] if row else None
        if row is not None and actual == c.expected and owner_row is not None and owner_row[0] != c.owner:
            raise LeaseLost(
                f"{self.path}: {what} is now owned by {owner_row[0]!r}, not {c.owner!r}; this process "
                "lost its claim (another process recovered the job) and must stop writing to it"
            )
        raise StaleState(
            f"{self.path}: {what} is {actual!r}, not {c.expected!r} as expected for the move to "
            f"{c.new!r}; another writer changed it first; reload it and decide again",
            kind=c.kind,
            row_id=c.row_id,
            expected=c.expected,
            actual=actual,
        )

    # -- other writes: creation, ownership, once() records ----------------------

    def create_job(
        self,
        workflow: str,
        key: str | None,
        context: str,
        steps: Sequence[tuple[str, str, int]],
    ) -> tuple[int, str | None]:
        """Insert a job and its sub-steps; with a known ``key`` insert nothing.

        Returns ``(job_id, None)`` for a new job, or ``(job_id, initial_context)``
        of the job that already has this key.
        """
        with self._lock:
            try:
                with self._transaction() as conn:
                    if key is not None:
                        row = conn.execute(
                            "SELECT id, initial_context FROM walstate_job WHERE workflow=? AND key=?",
                            (workflow, key),
                        ).fetchone()
                        if row is not None:
                            return int(row[0]), str(row[1])
                    now = time.time()
                    cur = conn.execute(
                        "INSERT INTO walstate_job (workflow, key, state, context, initial_context, created_at, updated_at) "
                        "VALUES (?, ?, 'pending', ?, ?, ?, ?)",
                        (workflow, key, context, context, now, now),
                    )
                    job_id = int(cur.lastrowid or 0)
                    conn.executemany(
                        "INSERT INTO walstate_step (job_id, name, phase, position, state, attempt, updated_at) "
                        "VALUES (?, ?, ?, ?, 'pending', 0, ?)",
                        [(job_id, name, phase, pos, now) for name, phase, pos in steps],
                    )
                    return job_id, None
            except (sqlite3.Error, peewee.PeeweeException) as exc:
                raise translate(exc, self.path, f"creating a {workflow!r} job") from exc

    def claim(self, job_id: int, expected_owner: str | None, owner: str | None, lease_expires: float | None) -> bool:
        """Compare-and-set the job's owner; ``False`` if someone else holds it now."""
        return self._single(
            "UPDATE walstate_job SET owner=?, lease_expires=?, updated_at=? WHERE id=? AND owner IS ?",
            (owner, lease_expires, time.time(), job_id, expected_owner),
            f"claiming job {job_id}",
        ) == 1

    def renew(self, job_id: int, owner: str, lease_expires: float) -> None:
        """Extend ``owner``'s lease on the job; :class:`LeaseLost` if it no longer owns it."""
        changed = self._single(
            "UPDATE walstate_job SET lease_expires=? WHERE id=? AND owner=?",
            (lease_expires, job_id, owner),
            f"renewing the lease on job {job_id}",
        )
        if changed != 1:
            raise LeaseLost(f"{self.path}: job {job_id} is no longer owned by {owner!r}; this process must stop "
                            "writing to it")

    def record_once(self, job_id: int, step: str, name: str, result: str) -> str:
        """Store a ``once()`` result unless one exists; return the stored JSON text."""
        faults.point("before_once_record")
        with self._lock:
            try:
                with self._transaction() as conn:
                    conn.execute(
                        "INSERT OR IGNORE INTO walstate_once (job_id, step, name, result, at) VALUES (?, ?, ?, ?, ?)",
                        (job_id, step, name, result, time.time()),
                    )
                    stored = conn.execute(
                        "SELECT result FROM walstate_once WHERE job_id=? AND step=? AND name=?",
                        (job_id, step, name),
                    ).fetchone()[0]
            except (sqlite3.Error, peewee.PeeweeException) as exc:
                raise translate(exc, self.path, f"recording once({name!r}) of step {step!r}") from exc
        faults.point("after_once_record")
        return str(stored)

    def _single(self, sql: str, params: tuple[Any, ...], doing: str) -> int:
        with self._lock:
            try:
                with self._transaction() as conn:
                    return int(conn.execute(sql, params).rowcount)
            except (sqlite3.Error, peewee.PeeweeException) as exc:
                raise translate(exc, self.path, doing) from exc


__all__ = ["Change", "ContextPatch", "WritePath"]
