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
statement per change on this hot path. They are written in the SQL SQLite and
PostgreSQL share; :class:`walstate.storage.postgres.PgWritePath` runs the same
code on PostgreSQL (``BEGIN`` instead of ``BEGIN IMMEDIATE``, row locks where
SQLite's single writer made them unneeded, the few spellings that differ).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from . import faults
from .connection import WriteLocked
from .errors import DatabaseError, JobFinished, LeaseLost, StaleState, UnknownJob
from .reads import STEPS_OF_JOB, STEPS_OF_JOBS, version_pairs
from .retrying import Perseverance, fields
from .types import DEFAULT_HOLD_WARNING, Change, Claimed, ContextPatch, JSONMerge, StepRow

log = logging.getLogger("walstate.storage")

#: A connection with sqlite3's small API (``execute``, ``executemany``, ``in_transaction``):
#: sqlite3's own, or :class:`walstate.storage.postgres.PgConn` over psycopg.
Conn = Any




class _Request:
    """One caller's changes waiting for a group commit."""

    __slots__ = ("changes", "done", "error", "wake", "insert", "result", "fenced")

    def __init__(self, changes: Sequence[Change], insert: Callable[[Conn, float], Any] | None = None) -> None:
        self.changes = changes
        #: Whether a run's claim fences it (its changes): it then keeps trying a busy database longer.
        self.fenced = insert is None
        #: A job creation or a claim joining the batch (see create_job, claim_runnable): run first,
        #: what it returns kept in ``result``.
        self.insert = insert
        self.result: Any = None
        self.done = False
        self.error: BaseException | None = None
        #: Held while the caller waits (made only if it has to): see _commit_grouped.
        self.wake: threading.Lock | None = None


class _Miss(Exception):
    """A multi-row compare-and-set changed fewer rows than it was given: the transaction is written again row by row.

    Internal: the row-by-row write names the row that missed and why
    (:class:`StaleState` or :class:`LeaseLost`), which one statement for many rows cannot.
    """


class _Deferred:
    """A transaction's step updates and journal rows held back to be sent as few statements as possible.

    Each statement sqlite3 runs releases the GIL and takes it back; while
    other threads run Python, taking it back waits for them. A batch of
    changes written row by row (two updates and two journal rows per
    sub-step) so pays that wait a few times per change, with the write lock
    held; written here it pays it a few times per batch. See
    :meth:`WritePath._flush_steps` and :meth:`WritePath._flush`.
    """

    __slots__ = ("steps", "ids", "journal")

    def __init__(self) -> None:
        self.steps: list[tuple[Any, ...]] = []
        #: Row ids in ``steps``: a second change of one row flushes the first (one UPDATE FROM
        #: row per target row, applied in order).
        self.ids: set[int] = set()
        self.journal: list[tuple[Any, ...]] = []


class WritePath:
    """Writes walstate's state changes to one database, one transaction per batch."""

    _UPDATE_STEP = (
        "UPDATE walstate_step SET state=?, attempt=?, failures=?, interruptions=?, output=?, error=?, updated_at=?, "
        "wake_at=?, wait_topic=? "
        "WHERE id=? AND state=? AND EXISTS (SELECT 1 FROM walstate_job WHERE id=? AND owner IS ? AND epoch=?)"
    )
    _UPDATE_JOB = (
        "UPDATE walstate_job SET state=?, error=?, updated_at=? "
        "WHERE id=? AND state=? AND owner IS ? AND epoch=?"
    )
    _UPDATE_JOB_RELEASE = (
        "UPDATE walstate_job SET state=?, error=?, updated_at=?, owner=NULL, lease_expires=NULL, epoch=epoch+1, "
        "cancel_requested=0 "
        "WHERE id=? AND state=? AND owner IS ? AND epoch=?"
    )
    _ONCE = "INSERT INTO walstate_once (job_id, step, name, result, at) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
    _JOURNAL = (
        "INSERT INTO walstate_journal (job_id, step, from_state, to_state, attempt, at, note) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)"
    )
    #: Whether a batch's step updates and journal rows go out as multi-row statements
    #: (UPDATE … FROM (VALUES …), one INSERT for many rows). SQLite (3.33 and later) only.
    _MULTI_ROW = sqlite3.sqlite_version_info >= (3, 33, 0)
    #: Rows per multi-row statement: 14 parameters each stays far below SQLite's variable limit.
    _CHUNK = 64
    _READ_CONTEXT = "SELECT context FROM walstate_job WHERE id=?"
    _WRITE_CONTEXT = "UPDATE walstate_job SET context=?, updated_at=? WHERE id=?"

    # Statements that read a job row before writing it. PostgreSQL's subclass
    # adds row locks here (SQLite's BEGIN IMMEDIATE already serialises writers).
    _LOCK_JOB = "SELECT state FROM walstate_job WHERE id=?"
    _OWNED = "SELECT 1 FROM walstate_job WHERE id=? AND owner IS ? AND epoch=?"

    def __init__(self, db: WriteLocked, path: str, *, group_commit: bool = True,
                 clock: Callable[[], float] = time.time, lease_clock: Callable[[], float] | None = None) -> None:
        self.db = db
        self.path = path
        self.group_commit = group_commit
        #: Where journal times and ``updated_at`` come from (PostgreSQL: the server's clock).
        self.clock = clock
        #: Retries of transient refusals (busy, locked, a lost session): see storage.retrying.
        self.retry = Perseverance(db, path)
        #: Seconds a transactional step may hold SQLite's only writer before a WARNING names it (None: never).
        self.hold_warning: float | None = DEFAULT_HOLD_WARNING
        #: What ``renewed_at`` is stamped with: the store's lease clock (see :mod:`.leaseclock`).
        self.lease_clock = clock if lease_clock is None else lease_clock
        self._reset_locks()
        #: Batch sizes written by group commit (for benchmarks): count of batches, of changes.
        self.batches = 0
        self.batched_requests = 0
        self._last_batch = 0

    def _reset_locks(self) -> None:
        # Group commit: callers queue their changes; the first to find no
        # leader writes everything queued in one transaction, then wakes them.
        self._queue: list[_Request] = []
        self._leader = False
        self._queue_lock = threading.Lock()

    def limit_idle_transactions(self, seconds: float) -> None:
        """Have the database end a transaction left idle for ``seconds`` (PostgreSQL; nothing on SQLite).

        On SQLite a process stopped inside a transaction holds the file's only
        writer for as long as it is stopped, and nothing can end that from outside.
        """

    def after_fork_in_child(self) -> None:
        """A forked child starts with no queue, no leader and fresh locks (threads do not survive fork)."""
        self._reset_locks()
        self.retry.after_fork_in_child()

    @property
    def _lock(self) -> threading.RLock:
        # One writer at a time inside this process: threads queue on a Python
        # lock instead of spinning in SQLite's busy handler. It is the
        # database's lock, shared with transactions user code opens through
        # ``db.atomic()``; re-entrant because a transactional step may record
        # a once() result inside its commit.
        return self.db.write_lock
    @contextmanager
    def _transaction(self) -> Iterator[Conn]:
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
                yield db.raw()
            return
        conn = db.raw()
        conn.execute(db.begin_write)
        db.push_transaction(self)
        try:
            yield conn
        except BaseException:
            db.pop_transaction()
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        db.pop_transaction()
        self._end(conn)

    @contextmanager
    def _own_transaction(self) -> Iterator[Conn]:
        """:meth:`_transaction` for walstate's own writes, which run no user code: on the shared writer connection.

        Under :attr:`_lock` only. Inside a transaction user code opened on this
        thread (``db.atomic()``), the write joins it as a savepoint instead.
        """
        db = self.db
        if db.transaction_depth() > 0:
            with self._transaction() as conn:
                yield conn
            return
        conn = db.writer()
        conn.execute(db.begin_write)
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._end(conn)

    @staticmethod
    def _end(conn: Conn) -> None:
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
            begun: list[float] = []  # when a transactional step's handler started (under the write lock)
            committing: list[bool] = []  # set once COMMIT is sent: from then on the outcome may be unknown
            given = list(changes)

            def write() -> None:
                nonlocal changes
                begun.clear()
                with self._lock:
                    try:
                        # A transactional step's effect runs the handler's own writes: on its thread's
                        # connection, where its ``step.db`` is; anything else on the shared writer.
                        with self._own_transaction() if effect is None else self._transaction() as conn:
                            changes = given
                            if effect is not None:
                                begun.append(time.monotonic())
                                try:
                                    changes = [*given, *effect()]
                                finally:
                                    self._held(begun[0], changes)
                            now = self.clock()
                            for change in changes:
                                self._apply(conn, change, now)
                            faults.point("before_commit")
                            committing.append(True)
                    except self.db.driver_errors as exc:
                        raise self.db.translate(exc, self.path, "writing a state change") from exc

            busy_since: list[float] = []

            def retryable(exc: DatabaseError) -> bool:
                return self._rerunnable(exc, effect is not None and bool(begun), committing, changes, busy_since)

            self.retry.run(write, "writing a state change", fenced=True, lost_ok=True, retryable=retryable)
        faults.point("after_commit")

    def _rerunnable(self, exc: DatabaseError, ran: bool, committing: list[bool], changes: Sequence[Change],
                    busy_since: list[float]) -> bool:
        """Whether the state change (and transactional handler) whose write ``exc`` refused may be written again.

        Before COMMIT was sent, the transaction rolled back: nothing of it is
        in the database, the handler's writes included, so writing it again
        (running a transactional step's handler again, in a new transaction)
        cannot double anything. A lost session is tried again for as long as
        the run keeps its claim; busy refusals of a handler that ran (a
        deadlock or a lock timeout of its own statements, which may recur
        every time) for ``retry.patience`` seconds, then the attempt fails
        with :class:`DatabaseBusy`. A session lost during COMMIT left the
        outcome unknown: not retried (the run stops; the job is resumed and
        the attempt counted as interrupted).
        """
        if committing:
            return False
        if ran:
            if self.retry.kind(exc.__cause__) == "busy":
                busy_since[:] = busy_since or [time.monotonic()]
                if time.monotonic() - busy_since[0] >= self.retry.patience:
                    return False
            steps = [c for c in changes if c.kind == "step"]
            what = ", ".join(f"step {c.step!r} of job {c.job_id}" for c in steps) or "a transactional step"
            log.warning("%s: the transaction of %s was rolled back by a transient refusal; its handler runs again "
                        "in a new transaction (its database writes were rolled back; the run keeps its claim)",
                        self.path, what, extra=fields(steps[0].job_id, steps[0].step) if steps else fields())
        return True

    def transient_refusal(self, exc: BaseException) -> DatabaseError | None:
        """``exc``, raised inside a transactional step's handler, as walstate's error when it is a transient
        refusal that ended the step's transaction (a lost session, a deadlock, a lock timeout), else None.

        Raised from the step's transaction, that error makes :meth:`commit` run the
        handler again in a new transaction. ``exc`` is a driver error (as
        ``step.execute`` raises it) or a walstate :class:`DatabaseError` made from one.
        """
        if isinstance(exc, DatabaseError):
            return exc if exc.__cause__ is not None and self.retry.kind(exc.__cause__) is not None else None
        if not isinstance(exc, self.db.driver_errors) or self.retry.kind(exc) is None:
            return None
        error = self.db.translate(exc, self.path, "running a transactional step")
        error.__cause__ = exc
        return error

    def _held(self, since: float, changes: Sequence[Change]) -> None:
        """A WARNING when a transactional step held SQLite's only writer (every process's) for too long."""
        held = time.monotonic() - since
        if self.hold_warning is None or held < self.hold_warning or self.db.dialect != "sqlite":
            return
        steps = [c for c in changes if c.kind == "step"]
        what = ", ".join(f"step {c.step!r} of job {c.job_id}" for c in steps) or "a transactional step"
        log.warning("%s: %s held the database's only writer for %.1fs (hold_warning=%gs): every other writer of "
                    "the file, in every process, waited meanwhile; keep transactional steps short and make no "
                    "outside calls from them", self.path, what, held, self.hold_warning,
                    extra=fields(steps[0].job_id, steps[0].step) if steps else fields())

    def _commit_grouped(self, request: _Request) -> None:
        """Leader/follower group commit: whoever finds no leader writes the whole queue.

        A lone caller leads at once (no waiting for company); callers that
        arrive while a commit is in progress queue up and the next leader
        writes them all in one transaction, each in its own savepoint so one
        stale change fails alone. Every caller returns only after the COMMIT
        that holds its change. A waiting caller sleeps on a lock of its own,
        released when its batch is written or when it is to lead the next one:
        a commit wakes only those, never the callers still queued.
        """
        with self._queue_lock:
            self._queue.append(request)
            if self._leader:
                wake = request.wake = threading.Lock()
                wake.acquire()
            else:
                self._leader = True
                wake = None
        if wake is not None:
            wake.acquire()  # released by the leader that wrote it, or to make it the next leader
            if request.done:
                if request.error is not None:
                    raise request.error
                return
        # This caller leads now (``_leader`` is held on its behalf).
        if self._last_batch > 1:
            # Writers are busy: the callers the last commit just woke are about to
            # queue their next change. One yield of the GIL lets them join this
            # batch; a lone writer (last batch of one) never pays for it.
            time.sleep(0)
        with self._queue_lock:
            batch, self._queue = self._queue, []
        self._last_batch = len(batch)
        crash: BaseException | None = None
        try:
            self._write_persevering(batch)
        except self.db.driver_errors as exc:
            error = self.db.translate(exc, self.path, "writing a state change")
            for r in batch:
                r.error = r.error or error
        except Exception as exc:  # a one-request batch: it failed alone
            for r in batch:
                r.error = r.error or exc
        except BaseException as exc:  # a crash (or a bug): nothing of the batch committed
            crash = exc
            for r in batch:
                r.error = exc
        finally:
            with self._queue_lock:
                for r in batch:
                    r.done = True
                # The longest-waiting queued caller leads next; with none, nobody leads.
                following = self._queue[0] if self._queue else None
                if following is None:
                    self._leader = False
            for r in batch:
                if r.wake is not None:
                    r.wake.release()
                    r.wake = None
            if following is not None:
                assert following.wake is not None
                following.wake.release()
        if crash is not None:
            raise crash
        if request.error is not None:
            raise request.error

    def _write_persevering(self, batch: list[_Request]) -> None:
        """Write ``batch`` (the leader holds it); a busy database's refusal is written again.

        Requests no claim fences (job creations) give up after ``retry.patience``
        (each raises DatabaseBusy to its caller at once); the run's changes keep
        trying for ``retry.claim_patience``. Callers that queue meanwhile join
        the batch. The journal rows of changes written after a wait say so.
        """
        tries = 0
        began = 0.0
        notes: dict[int, str | None] = {}
        while True:
            try:
                with self._lock:
                    self._write_batch(batch)
                return
            except self.db.driver_errors as exc:
                retry = self.retry
                if retry.kind(exc) != "busy" or retry.stopped:
                    raise
                now = time.monotonic()
                began = now if tries == 0 else began
                waited = now - began
                with self._queue_lock:
                    expired = [r for r in batch if waited >= (retry.claim_patience if r.fenced else retry.patience)]
                    if len(expired) == len(batch):
                        raise
                    for r in expired:  # each raises to its caller now; the leader's own raises on return
                        r.error = self.db.translate(exc, self.path, (
                            "writing a state change" if r.fenced else "creating a job or claiming jobs") +
                            f" (tried {tries + 1} times over {waited:.1f}s, the patience of {retry.patience:g}s)")
                        r.done = True
                        if r.wake is not None:
                            r.wake.release()
                            r.wake = None
                    batch[:] = [r for r in batch if r not in expired]
                    batch.extend(self._queue)  # whoever queued meanwhile lands in the same commit
                    self._queue = []
                if tries == 0:
                    log.warning("%s: a commit of %d changes was refused (%s); trying again (the runs keep their "
                                "claims)", self.path, sum(len(r.changes) for r in batch), exc, extra=fields())
                tries += 1
                retry.pause(tries, math.inf)
                for r in batch:
                    for c in r.changes:
                        base = notes.setdefault(id(c), c.note)
                        c.note = (f"{base}; " if base else "") + \
                            f"written after the database was busy for {time.monotonic() - began:.1f}s"

    def _write_batch(self, batch: list[_Request]) -> None:
        self.batches += 1
        self.batched_requests += len(batch)
        if len(batch) == 1:
            with self._own_transaction() as conn:
                self._apply_request(conn, batch[0], self.clock())
                faults.point("before_commit")
            return
        # Several callers. Optimistically without a savepoint per request (two statements each)
        # and, where the database allows, with multi-row statements (only here, where other
        # writers wait and so other threads hold the GIL between statements: alone, row by row
        # is a few microseconds cheaper): almost every batch applies whole. If any request fails,
        # the whole transaction rolls back and the batch is written again below, row by row,
        # each request in its own savepoint.
        try:
            with self._own_transaction() as conn:
                deferred = _Deferred() if self._MULTI_ROW else None
                now = self.clock()
                for r in batch:
                    self._apply_request(conn, r, now, deferred)
                if deferred is not None:
                    self._flush(conn, deferred)
                faults.point("before_commit")
            return
        except self.db.driver_errors:
            raise
        except Exception:
            pass
        with self._own_transaction() as conn:
            now = self.clock()
            for r in batch:
                self._apply_alone(conn, r, now)
            faults.point("before_commit")

    def _apply_alone(self, conn: Conn, r: _Request, now: float) -> None:
        """Apply one request of a shared batch so that its failure is its own.

        Any ``Exception`` (a missed compare-and-set, or user code such as a
        context validator raising) fails this request only: its changes are
        rolled back to its savepoint and the others' commit. SQLite errors and
        crashes still abort the whole transaction.
        """
        if len(r.changes) == 1 and r.changes[0].context is None and not r.changes[0].once and r.insert is None:
            # A lone CAS that misses changes nothing and raises before its
            # journal row: no savepoint needed to undo it.
            try:
                self._apply(conn, r.changes[0], now)
            except self.db.driver_errors:
                raise
            except Exception as exc:
                r.error = exc
            return
        conn.execute("SAVEPOINT walstate_change")
        try:
            self._apply_request(conn, r, now)
        except self.db.driver_errors:
            raise
        except Exception as exc:
            conn.execute("ROLLBACK TO walstate_change")
            r.error = exc
        conn.execute("RELEASE walstate_change")

    def _apply_request(self, conn: Conn, r: _Request, now: float, deferred: _Deferred | None = None) -> None:
        if r.insert is not None:
            r.result = r.insert(conn, now)
        for change in r.changes:
            self._apply(conn, change, now, deferred)

    def _apply(self, conn: Conn, c: Change, now: float, deferred: _Deferred | None = None) -> None:
        """Write change ``c``: its compare-and-set, its journal row, its once() records.

        With ``deferred``, a step's update and every journal row are held
        there for :meth:`_flush` (in order: a job's update, which the fence of
        later step updates reads, first sends the step updates held before it).
        """
        if c.context is not None:
            self._merge_context(conn, c.job_id, c.context, now)
        if c.kind == "step":
            params = (c.new, c.attempt, c.failures, c.interruptions, c.output, c.error, now, c.wake_at, c.topic,
                      c.row_id, c.expected, c.job_id, c.owner, c.epoch)
            if deferred is not None:
                if c.row_id in deferred.ids:
                    self._flush_steps(conn, deferred)
                deferred.steps.append(params)
                deferred.ids.add(c.row_id)
                cur = None
            else:
                cur = conn.execute(self._UPDATE_STEP, params)
        elif c.kind == "job":
            if deferred is not None:
                self._flush_steps(conn, deferred)
            sql = self._UPDATE_JOB_RELEASE if c.release else self._UPDATE_JOB
            cur = conn.execute(sql, (c.new, c.error, now, c.row_id, c.expected, c.owner, c.epoch))
        else:
            raise ValueError(f"unknown change kind {c.kind!r}")
        if cur is not None:
            faults.point("after_update")
            if cur.rowcount != 1:
                self._explain_miss(conn, c)
        if c.release:
            self._wake(conn)
        journal = (c.job_id, c.step, c.expected, c.new, c.attempt, now, c.note)
        if deferred is not None:
            deferred.journal.append(journal)
        else:
            conn.execute(self._JOURNAL, journal)
        for step, name, result in c.once:
            conn.execute(self._ONCE, (c.job_id, step, name, result, now))
        if deferred is None:
            faults.point("after_journal")

    def _flush(self, conn: Conn, deferred: _Deferred) -> None:
        self._flush_steps(conn, deferred)
        journal = deferred.journal
        for i in range(0, len(journal), self._CHUNK):
            chunk = journal[i:i + self._CHUNK]
            conn.execute(self._journal_rows(len(chunk)), [value for row in chunk for value in row])
        for _ in journal:
            faults.point("after_journal")  # reached once per change, as written row by row
        deferred.journal = []

    def _flush_steps(self, conn: Conn, deferred: _Deferred) -> None:
        """Send the held step updates, many rows per statement; :class:`_Miss` if any did not apply."""
        rows = deferred.steps
        if not rows:
            return
        for i in range(0, len(rows), self._CHUNK):
            chunk = rows[i:i + self._CHUNK]
            cur = conn.execute(self._update_steps(len(chunk)), [value for row in chunk for value in row])
            if cur.rowcount != len(chunk):
                raise _Miss(f"{len(chunk) - cur.rowcount} of {len(chunk)} sub-step changes missed")
        for _ in rows:
            faults.point("after_update")  # reached once per change, as written row by row
        deferred.steps = []
        deferred.ids.clear()

    @staticmethod
    @functools.cache
    def _update_steps(n: int) -> str:
        """``_UPDATE_STEP`` for ``n`` rows: the same compare-and-set and fence, row by row of a VALUES list."""
        values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * n)
        return (
            "UPDATE walstate_step SET state=v.column1, attempt=v.column2, failures=v.column3, "
            "interruptions=v.column4, output=v.column5, error=v.column6, updated_at=v.column7, wake_at=v.column8, "
            f"wait_topic=v.column9 FROM (VALUES {values}) AS v "
            "WHERE walstate_step.id=v.column10 AND walstate_step.state=v.column11 AND EXISTS (SELECT 1 FROM "
            "walstate_job WHERE walstate_job.id=v.column12 AND walstate_job.owner IS v.column13 "
            "AND walstate_job.epoch=v.column14)"
        )

    @classmethod
    @functools.cache
    def _journal_rows(cls, n: int) -> str:
        """``_JOURNAL`` for ``n`` rows, inserted in the order given (so journal ids keep the changes' order)."""
        head, _, row = cls._JOURNAL.partition("VALUES ")
        return head + "VALUES " + ", ".join([row] * n)

    def _wake(self, conn: Conn) -> None:
        """Tell idle workers of other processes that work may be claimable (PostgreSQL: NOTIFY on commit).

        SQLite needs nothing: workers poll ``PRAGMA data_version``, which every commit changes.
        """

    def _lock_claims(self, conn: Conn) -> None:
        """Serialise claims that count running jobs against a per-workflow limit (PostgreSQL only).

        SQLite's ``BEGIN IMMEDIATE`` already does.
        """

    def _merge_context(self, conn: Conn, job_id: int, patch: ContextPatch, now: float) -> None:
        row = conn.execute(self._READ_CONTEXT, (job_id,)).fetchone()
        if row is None:
            raise StaleState(f"{self.path}: job {job_id} does not exist", kind="job", row_id=job_id, expected="", actual=None)
        merged = {**json.loads(row[0]), **patch.patch}
        conn.execute(self._WRITE_CONTEXT, (patch.merge(merged), now, job_id))

    def _explain_miss(self, conn: Conn, c: Change) -> None:
        job = conn.execute("SELECT state, owner, epoch FROM walstate_job WHERE id=?", (c.job_id,)).fetchone()
        if c.kind == "step":
            row = conn.execute("SELECT state FROM walstate_step WHERE id=?", (c.row_id,)).fetchone()
            what = f"sub-step {c.step!r} of job {c.job_id}"
        else:
            row = job
            what = f"job {c.job_id}"
        actual = row[0] if row else None
        if row is not None and job is not None and (job[1], job[2]) != (c.owner, c.epoch):
            raise LeaseLost(
                f"{self.path}: {what} is now held by {job[1]!r} (claim epoch {job[2]}), not by {c.owner!r} "
                f"(epoch {c.epoch}); this run lost its claim (the job was recovered, cancelled or retried "
                "elsewhere) and must stop writing to it"
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
        version: int = 1,
        fingerprint: str | None = None,
    ) -> tuple[int, str | None]:
        """Insert a job and its sub-steps; with a known ``key`` insert nothing.

        ``version`` and ``fingerprint`` name the workflow definition the job is
        made for. Returns ``(job_id, None)`` for a new job, or
        ``(job_id, initial_context)`` of the job that already has this key.
        """
        if key is None and self._GROUP_CREATES and self.group_commit and self._leader \
                and self.db.transaction_depth() == 0:
            # Others are committing: join their next transaction (one commit, one fsync under
            # ``full``, for many jobs' changes) rather than take the lock for one of its own.
            request = _Request((), lambda conn, now: self._insert_job(conn, workflow, None, context, steps, version,
                                                                      fingerprint, now))
            self._commit_grouped(request)
            return request.result, None
        # Busy refusals only: a creation whose session was lost may have committed (a second job).
        return self.retry.run(lambda: self._create_job(workflow, key, context, steps, version, fingerprint),
                              f"creating a {workflow!r} job", fenced=False)

    def _create_job(self, workflow: str, key: str | None, context: str, steps: Sequence[tuple[str, str, int]],
                    version: int, fingerprint: str | None) -> tuple[int, str | None]:
        with self._lock:
            try:
                with self._own_transaction() as conn:
                    if key is not None:
                        row = conn.execute(
                            "SELECT id, initial_context FROM walstate_job WHERE workflow=? AND key=?",
                            (workflow, key),
                        ).fetchone()
                        if row is not None:
                            return int(row[0]), str(row[1])
                    return self._insert_job(conn, workflow, key, context, steps, version, fingerprint,
                                            self.clock()), None
            except self.db.driver_errors as exc:
                raise self.db.translate(exc, self.path, f"creating a {workflow!r} job") from exc

    #: Whether a job without a key may be created in a group commit in progress (see create_job).
    _GROUP_CREATES = True

    def _insert_job(self, conn: Conn, workflow: str, key: str | None, context: str,
                    steps: Sequence[tuple[str, str, int]], version: int, fingerprint: str | None, now: float) -> int:
        job_id = int(conn.execute(
            "INSERT INTO walstate_job (workflow, key, state, context, initial_context, created_at, updated_at, "
            "version, fingerprint) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?) RETURNING id",
            (workflow, key, context, context, now, now, version, fingerprint),
        ).fetchone()[0])
        conn.executemany(
            "INSERT INTO walstate_step (job_id, name, phase, position, state, attempt, updated_at) "
            "VALUES (?, ?, ?, ?, 'pending', 0, ?)",
            [(job_id, name, phase, pos, now) for name, phase, pos in steps],
        )
        self._wake(conn)
        return job_id

    _CLAIM = (
        "UPDATE walstate_job SET owner=?, lease_expires=?, renewed_at=?, epoch=epoch+1, updated_at=?, wake_at=NULL, "
        "state=CASE state WHEN 'pending' THEN 'running' ELSE state END "
        "WHERE id=? AND epoch=? AND state=? AND state IN ('pending', 'running') RETURNING epoch, context, "
        "cancel_requested"
    )

    def claim(self, job_id: int, *, state: str, epoch: int, owner: str, lease_expires: float,
              note: str) -> Claimed | None:
        """Claim job ``job_id`` for ``owner``: one compare-and-set on the epoch that was read.

        The claim bumps the job's epoch (the fencing token every later write of
        the run is conditioned on), sets the lease, starts a ``pending`` job,
        and journals itself, in one transaction, which also reads the job's
        context and sub-steps as the claim found them. Returns ``None`` when
        the job moved on since it was read (someone else claimed it, it
        finished, or it was cancelled).
        """
        # The claim is a write like any other: crash tests reach it through the same fault points.
        faults.point("before_begin")
        # Busy refusals only: a claim whose session was lost may have committed, and the CAS would then miss.
        claimed = self.retry.run(lambda: self._claim(job_id, state, epoch, owner, lease_expires, note),
                                 f"claiming job {job_id}", fenced=False)
        if claimed is not None:
            faults.point("after_commit")
        return claimed

    def _claim(self, job_id: int, state: str, epoch: int, owner: str, lease_expires: float,
               note: str) -> Claimed | None:
        with self._lock:
            try:
                with self._own_transaction() as conn:
                    now = self.clock()
                    row = conn.execute(self._CLAIM, (owner, lease_expires, self.lease_clock(), now, job_id, epoch,
                                                     state)).fetchone()
                    faults.point("after_update")
                    if row is None:
                        return None
                    conn.execute(self._JOURNAL, (job_id, None, state, "running", 0, now, note))
                    faults.point("after_journal")
                    steps = [StepRow(*r) for r in conn.execute(STEPS_OF_JOB, (job_id,))]
                    claimed = Claimed(int(row[0]), str(row[1]), bool(row[2]), steps)
                    faults.point("before_commit")
            except self.db.driver_errors as exc:
                raise self.db.translate(exc, self.path, f"claiming job {job_id}") from exc
        return claimed

    # Runnable: pending or unfinished with no owner, or with an owner the caller
    # found dead (by pid on this host, by lease elsewhere: ownership.owner_alive)
    # at the epoch it read, so a job claimed since is not taken. The state
    # literals match the partial index.
    # Oldest runnable first: by when the job last became runnable (``updated_at``: created, released,
    # parked, requeued; a parked job woken by its time or a message keeps its park time), so a job that
    # becomes runnable again and again never starves those waiting longer; id breaks ties.
    _RUNNABLE = (
        "SELECT id, state, epoch, workflow, owner FROM walstate_job INDEXED BY job_runnable_since "
        "WHERE state IN ('pending', 'running') AND workflow IN (SELECT value FROM json_each(?)) "
        "AND id NOT IN (SELECT CAST(value AS INTEGER) FROM json_each(?)) AND ((owner IS NULL AND (wake_at IS NULL OR wake_at <= ?)) "
        "OR (id, epoch) IN (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))) "
        # Only the (workflow, version) pairs the caller can run ("name@version"; an empty list: any version).
        "AND (NOT EXISTS (SELECT 1 FROM json_each(?)) "
        "OR workflow || '@' || CAST(version AS TEXT) IN (SELECT value FROM json_each(?))) "
        "ORDER BY updated_at, id LIMIT ?"
    )
    _RUNNING_PER_WORKFLOW = (
        "SELECT workflow, count(*) FROM walstate_job WHERE state='running' AND owner IS NOT NULL "
        "AND workflow IN (SELECT value FROM json_each(?)) GROUP BY workflow"
    )
    _CLAIM_MANY = (
        "UPDATE walstate_job SET owner=?, lease_expires=?, renewed_at=?, epoch=epoch+1, updated_at=?, state='running', "
        "wake_at=NULL "
        "WHERE id IN (SELECT CAST(value AS INTEGER) FROM json_each(?)) RETURNING id, epoch, context, cancel_requested, "
        "version, fingerprint"
    )

    def claim_runnable(
        self,
        *,
        owner: str,
        lease_expires: float,
        limit: int,
        workflows: Sequence[str],
        now: float,
        dead: Sequence[tuple[int, int]] = (),
        skip: Sequence[int] = (),
        limits: dict[str, int] | None = None,
        versions: Sequence[tuple[str, int]] = (),
    ) -> list[tuple[str, str, str | None, Claimed]]:
        """Claim up to ``limit`` runnable jobs of ``workflows`` for ``owner``, atomically.

        One ``BEGIN IMMEDIATE`` transaction picks the runnable jobs (pending or
        unfinished with no owner and no wake-up time after ``now``, or ``(id, epoch)`` in ``dead``: jobs whose
        owner the caller found dead at that epoch; never those in ``skip``), keeps at most ``limits[workflow]`` jobs of a workflow
        running across every process, and claims them with one ``UPDATE …
        WHERE id IN (…) RETURNING`` that bumps each epoch; each claim is
        journalled and the claimed jobs' sub-steps are read in the same
        transaction. Jobs are taken runnable longest first (by when each last
        became runnable: created, released, parked or requeued), not lowest id
        first. Returns ``(workflow, state before, owner before, Claimed)`` per
        job, by id. ``versions``: claim only jobs of these
        ``(workflow, version)`` pairs (the caller's registered versions and
        those it can migrate from), so a worker never claims a job only to
        release it; empty: any version.
        """
        if limit < 1 or not workflows:
            return []
        faults.point("before_begin")

        def claim(conn: Conn, stamp: float) -> list[tuple[str, str, str | None, Claimed]]:
            return self._claim_runnable(conn, owner, lease_expires, limit, workflows, now, dead, skip, limits, stamp,
                                        versions)

        if self._GROUP_CLAIMS and self.group_commit and self._leader and self.db.transaction_depth() == 0:
            # Others are committing: claim in their next transaction (one commit, one fsync under
            # ``full``), as a job submitted meanwhile does (see create_job).
            request = _Request((), claim)
            self._commit_grouped(request)
            out: list[tuple[str, str, str | None, Claimed]] = request.result
            if out:
                faults.point("after_commit")
            return out
        with self._lock:
            try:
                with self._own_transaction() as conn:
                    out = claim(conn, self.clock())
                    if not out:
                        return []
                    faults.point("before_commit")
            except self.db.driver_errors as exc:
                raise self.db.translate(exc, self.path, "claiming runnable jobs") from exc
        faults.point("after_commit")
        return out

    #: Whether a batch claim may join a group commit in progress (see claim_runnable).
    _GROUP_CLAIMS = True

    def _claim_runnable(self, conn: Conn, owner: str, lease_expires: float, limit: int, workflows: Sequence[str],
                        now: float, dead: Sequence[tuple[int, int]], skip: Sequence[int],
                        limits: dict[str, int] | None, stamp: float,
                        versions: Sequence[tuple[str, int]] = ()) -> list[tuple[str, str, str | None, Claimed]]:
        """The statements of :meth:`claim_runnable`, inside the caller's transaction; ``[]`` when none is runnable."""
        names = json.dumps(list(workflows))
        extra = sum(limits.values()) if limits else 0
        pairs = version_pairs(versions)
        rows = conn.execute(self._RUNNABLE, (names, json.dumps(list(skip)), now,
                                             json.dumps([list(d) for d in dead]), pairs, pairs,
                                             limit + extra)).fetchall()
        if limits:
            self._lock_claims(conn)
            running = dict(conn.execute(self._RUNNING_PER_WORKFLOW, (json.dumps(list(limits)),)).fetchall())
            chosen = []
            for row in rows:
                budget = limits.get(row[3])
                if budget is not None:
                    # A job already running (being taken over) does not add to the count.
                    if row[1] == "pending" or row[4] is None:
                        if running.get(row[3], 0) >= budget:
                            continue
                        running[row[3]] = running.get(row[3], 0) + 1
                chosen.append(row)
            rows = chosen
        rows = rows[:limit]
        if not rows:
            return []
        before = {int(r[0]): (str(r[1]), str(r[3]), r[4]) for r in rows}
        claimed = conn.execute(self._CLAIM_MANY, (owner, lease_expires, self.lease_clock(), stamp,
                                                  json.dumps(list(before)))).fetchall()
        faults.point("after_update")
        conn.executemany(self._JOURNAL, [
            (job_id, None, before[job_id][0], "running", 0, stamp,
             "claimed" if before[job_id][2] is None else f"claimed from {before[job_id][2]}, found dead")
            for job_id in before])
        faults.point("after_journal")
        steps: dict[int, list[StepRow]] = {}
        for r in conn.execute(STEPS_OF_JOBS, (json.dumps(list(before)),)):
            step = StepRow(*r)
            steps.setdefault(step.job_id, []).append(step)
        out = []
        for job_id, epoch, context, cancel, version, fingerprint in sorted(claimed):
            state, workflow, prior_owner = before[int(job_id)]
            out.append((workflow, state, prior_owner, Claimed(
                int(epoch), str(context), bool(cancel), steps.get(int(job_id), []), int(job_id),
                int(version), fingerprint)))
        return out

    def renew(self, job_id: int, owner: str, epoch: int, lease_expires: float) -> bool | None:
        """Extend the lease of ``owner``'s claim (``epoch``) on the job.

        Returns whether an operator asked for the job to be cancelled, or
        ``None`` when the claim is lost (the job has another owner or epoch, or
        it ended): the run must stop writing.
        """
        with self._lock:
            try:
                with self._own_transaction() as conn:
                    row = conn.execute(
                        "UPDATE walstate_job SET lease_expires=?, renewed_at=? WHERE id=? AND owner=? AND epoch=? "
                        "RETURNING cancel_requested",
                        (lease_expires, self.lease_clock(), job_id, owner, epoch),
                    ).fetchone()
            except self.db.driver_errors as exc:
                raise self.db.translate(exc, self.path, f"renewing the lease on job {job_id}") from exc
        return None if row is None else bool(row[0])

    def release(self, job_id: int, owner: str, epoch: int, note: str, *, undo_start: bool = False,
                patience: float | None = None) -> bool:
        """Give up ``owner``'s claim on an unfinished job (shutdown); journalled. False if already lost.

        ``undo_start`` puts a job the claim started back to ``pending`` (a claim
        that ran nothing, such as a worker's claim of a job it cannot run).
        ``patience``: seconds to keep trying a busy database (by default, as
        long as the claim holds).
        """
        return self.retry.run(lambda: self._release(job_id, owner, epoch, note, undo_start), f"releasing job {job_id}",
                              fenced=True, lost_ok=True, patience=patience)

    def _release(self, job_id: int, owner: str, epoch: int, note: str, undo_start: bool) -> bool:
        with self._lock:
            try:
                with self._own_transaction() as conn:
                    now = self.clock()
                    row = conn.execute(
                        "UPDATE walstate_job SET owner=NULL, lease_expires=NULL, epoch=epoch+1, updated_at=?, "
                        "state=CASE WHEN ? THEN 'pending' ELSE state END "
                        "WHERE id=? AND owner=? AND epoch=? RETURNING state",
                        (now, undo_start, job_id, owner, epoch),
                    ).fetchone()
                    if row is None:
                        return False
                    conn.execute(self._JOURNAL, (job_id, None, "running", row[0], 0, now, note))
                    self._wake(conn)
                    return True
            except self.db.driver_errors as exc:
                raise self.db.translate(exc, self.path, f"releasing job {job_id}") from exc

    def force_release(self, job_id: int, note: str) -> tuple[str, int] | None:
        """Take the claim away from whoever holds the unfinished job (an operator's act); journalled.

        Clears the owner and lease and bumps the epoch in one transaction, so
        the run that held it (hung, or believed dead) can write nothing more and
        stops at its next renewal; the job is runnable again. Returns the
        ``(owner, epoch)`` it took the claim from, or None when nobody held it
        (a finished job is left as it is). The journal row is ``note`` followed
        by who held it. Raises :class:`UnknownJob`.
        """
        with self._lock:
            try:
                with self._own_transaction() as conn:
                    now = self.clock()
                    if conn.execute(self._LOCK_JOB, (job_id,)).fetchone() is None:
                        raise UnknownJob(f"{self.path}: no job {job_id}")
                    held = conn.execute("SELECT state, owner, epoch FROM walstate_job WHERE id=?", (job_id,)).fetchone()
                    state, owner, epoch = str(held[0]), held[1], int(held[2])
                    if owner is None or state not in ("pending", "running"):
                        return None
                    # The row was read under this transaction's lock (SQLite's one writer; PostgreSQL's
                    # FOR UPDATE): no condition is needed to know it is still as read.
                    conn.execute("UPDATE walstate_job SET owner=NULL, lease_expires=NULL, epoch=epoch+1, updated_at=? "
                                 "WHERE id=?", (now, job_id))
                    conn.execute(self._JOURNAL, (job_id, None, state, state, 0, now,
                                                 f"{note} (taken from {owner}, epoch {epoch})"))
                    self._wake(conn)
                    return str(owner), epoch
            except self.db.driver_errors as exc:
                raise self.db.translate(exc, self.path, f"releasing job {job_id}") from exc

    def park(self, job_id: int, owner: str, epoch: int, wake_at: float, topics: Sequence[str], note: str, *,
             patience: float | None = None) -> bool:
        """Release a job whose steps wait, to be claimed again at ``wake_at`` or when a message arrives.

        A message already sent for one of ``topics`` makes it runnable at once:
        ``send`` and ``park`` both take the write lock, so no wake-up is lost
        between them. False if the claim was already lost.
        """
        return self.retry.run(lambda: self._park(job_id, owner, epoch, wake_at, topics, note), f"parking job {job_id}",
                              fenced=True, lost_ok=True, patience=patience)

    def _park(self, job_id: int, owner: str, epoch: int, wake_at: float, topics: Sequence[str], note: str) -> bool:
        with self._lock:
            try:
                with self._own_transaction() as conn:
                    now = self.clock()
                    conn.execute(self._LOCK_JOB, (job_id,))  # before reading messages: a send waits for this park
                    ready = conn.execute(
                        "SELECT 1 FROM walstate_message WHERE job_id=? AND consumed_by IS NULL AND topic IN "
                        "(SELECT value FROM json_each(?)) LIMIT 1", (job_id, json.dumps(list(topics)))).fetchone()
                    row = conn.execute(
                        "UPDATE walstate_job SET owner=NULL, lease_expires=NULL, epoch=epoch+1, updated_at=?, wake_at=? "
                        "WHERE id=? AND owner=? AND epoch=? RETURNING state",
                        (now, None if ready else wake_at, job_id, owner, epoch),
                    ).fetchone()
                    if row is None:
                        return False
                    conn.execute(self._JOURNAL, (job_id, None, row[0], row[0], 0, now, note))
                    self._wake(conn)
                    return True
            except self.db.driver_errors as exc:
                raise self.db.translate(exc, self.path, f"parking job {job_id}") from exc

    def send(self, job_id: int, topic: str, payload: str, key: str | None) -> tuple[int, bool]:
        """Store a message for job ``job_id``; return ``(message id, whether it is new)``.

        A repeated ``key`` stores nothing (even once the job has ended). A parked
        job with a step waiting for ``topic`` becomes runnable at once, in the
        same transaction. Raises :class:`UnknownJob`, or :class:`JobFinished` for
        a new message to a job that has ended.
        """
        # A message without a key whose session was lost may have been stored: not sent again.
        return self.retry.run(lambda: self._send(job_id, topic, payload, key), f"sending {topic!r} to job {job_id}",
                              fenced=False, lost_ok=key is not None)

    def _send(self, job_id: int, topic: str, payload: str, key: str | None) -> tuple[int, bool]:
        with self._lock:
            try:
                with self._own_transaction() as conn:
                    job = conn.execute(self._LOCK_JOB, (job_id,)).fetchone()
                    if job is None:
                        raise UnknownJob(f"{self.path}: no job {job_id} to send {topic!r} to")
                    if key is not None:
                        # Before the finished check: a webhook's retry of a message that has since
                        # ended the job is the duplicate it is, not an error.
                        known = conn.execute("SELECT id FROM walstate_message WHERE job_id=? AND key=?",
                                             (job_id, key)).fetchone()
                        if known is not None:
                            return int(known[0]), False
                    if job[0] not in ("pending", "running"):
                        raise JobFinished(f"{self.path}: job {job_id} is {job[0]}; it will never read {topic!r}")
                    message_id = int(conn.execute(
                        "INSERT INTO walstate_message (job_id, topic, payload, key, sent_at) VALUES (?, ?, ?, ?, ?) "
                        "RETURNING id", (job_id, topic, payload, key, self.clock())).fetchone()[0])
                    conn.execute(
                        "UPDATE walstate_job SET wake_at=NULL WHERE id=? AND owner IS NULL AND wake_at IS NOT NULL "
                        "AND EXISTS (SELECT 1 FROM walstate_step WHERE job_id=? AND state='waiting' AND wait_topic=?)",
                        (job_id, job_id, topic))
                    self._wake(conn)
                    return message_id, True
            except self.db.driver_errors as exc:
                raise self.db.translate(exc, self.path, f"sending {topic!r} to job {job_id}") from exc

    def consume(self, job_id: int, step: str, name: str, topic: str, owner: str | None, epoch: int) -> str | None:
        """The payload this wait consumed: recorded before, or the oldest unconsumed message of ``topic`` now.

        Consuming marks the message and records it as the wait's ``once()``
        result in one transaction, fenced by the run's claim: a message is
        delivered exactly once, to the first wait that asks. None: no message yet.
        """
        faults.point("before_consume")
        # Safe to repeat after a lost session: a consume that landed left its once() record.
        consumed = self.retry.run(lambda: self._consume(job_id, step, name, topic, owner, epoch),
                                  f"consuming {topic!r} for step {step!r} of job {job_id}", fenced=True, lost_ok=True)
        if consumed is not None and consumed[1]:
            faults.point("after_consume")
        return None if consumed is None else consumed[0]

    def _consume(self, job_id: int, step: str, name: str, topic: str, owner: str | None,
                 epoch: int) -> tuple[str, bool] | None:
        """``(payload, consumed now)``, or None when no message is there."""
        with self._lock:
            try:
                with self._own_transaction() as conn:
                    # The claim first: a superseded run learns nothing, not even what the live run consumed.
                    if conn.execute(self._OWNED, (job_id, owner, epoch)).fetchone() is None:
                        raise LeaseLost(f"{self.path}: job {job_id}: this run lost its claim; it may not consume "
                                        f"messages of {topic!r}")
                    known = conn.execute("SELECT result FROM walstate_once WHERE job_id=? AND step=? AND name=?",
                                         (job_id, step, name)).fetchone()
                    if known is not None:
                        return str(known[0]), False
                    message = conn.execute(
                        "SELECT id, payload FROM walstate_message WHERE job_id=? AND topic=? AND consumed_by IS NULL "
                        "ORDER BY id LIMIT 1", (job_id, topic)).fetchone()
                    if message is None:
                        return None
                    conn.execute("UPDATE walstate_message SET consumed_by=? WHERE id=?", (f"{step}:{name}", message[0]))
                    conn.execute(self._ONCE, (job_id, step, name, message[1], self.clock()))
                    payload = str(message[1])
            except self.db.driver_errors as exc:
                raise self.db.translate(exc, self.path, f"consuming {topic!r} for step {step!r} of job {job_id}") from exc
        return payload, True

    def request_cancel(self, job_id: int) -> bool:
        """Ask whoever runs the unfinished job to cancel it; False if it is already finished."""
        return self._single(
            "UPDATE walstate_job SET cancel_requested=1 WHERE id=? AND state IN ('pending', 'running')",
            (job_id,),
            f"requesting the cancellation of job {job_id}",
        ) == 1

    _ONCE_LOOKUP = (
        "SELECT (SELECT result FROM walstate_once WHERE job_id=? AND step=? AND name=?), "
        "(SELECT count(*) FROM walstate_job WHERE id=? AND owner IS ? AND epoch=?)"
    )

    def once_lookup(self, job_id: int, step: str, name: str, owner: str | None, epoch: int) -> str | None:
        """The stored ``once()`` result of (job, step, ``name``), or None: then its function may be called.

        One read, which also checks that the run (``owner``, ``epoch``) still
        holds its claim: a superseded run gets :class:`LeaseLost`, never a
        value (not even the one the live run stored), and calls nothing.
        """
        def look() -> tuple[Any, ...]:
            try:
                return tuple(self.db.raw().execute(self._ONCE_LOOKUP, (job_id, step, name, job_id, owner, epoch)).fetchone())
            except self.db.driver_errors as exc:
                raise self.db.translate(exc, self.path, f"reading once({name!r}) of step {step!r}") from exc

        stored, owned = self.retry.run(look, f"reading once({name!r}) of step {step!r} of job {job_id}", fenced=True,
                                       lost_ok=True)
        if not owned:
            raise LeaseLost(f"{self.path}: job {job_id}: this run lost its claim on the job (claim epoch {epoch} is "
                            f"over); once({name!r}) of step {step!r} was not called")
        return None if stored is None else str(stored)

    def record_once(self, job_id: int, step: str, name: str, result: str, *, owner: str | None = None,
                    epoch: int | None = None) -> str:
        """Store a ``once()`` result unless one exists; return the stored JSON text.

        With ``epoch`` (and ``owner``), fenced: stored only while that run
        still holds its claim, checked in the same transaction; otherwise
        :class:`LeaseLost` and nothing is stored.
        """
        faults.point("before_once_record")
        stored = self.retry.run(lambda: self._record_once(job_id, step, name, result, owner, epoch),
                                f"recording once({name!r}) of step {step!r} of job {job_id}", fenced=True, lost_ok=True)
        faults.point("after_once_record")
        return stored

    def _record_once(self, job_id: int, step: str, name: str, result: str, owner: str | None,
                     epoch: int | None) -> str:
        with self._lock:
            try:
                with self._own_transaction() as conn:
                    if epoch is not None and conn.execute(self._OWNED, (job_id, owner, epoch)).fetchone() is None:
                        raise LeaseLost(f"{self.path}: job {job_id}: this run lost its claim on the job (claim epoch "
                                        f"{epoch} is over); the result of once({name!r}) of step {step!r} is not "
                                        "recorded")
                    conn.execute(self._ONCE, (job_id, step, name, result, self.clock()))
                    stored = conn.execute(
                        "SELECT result FROM walstate_once WHERE job_id=? AND step=? AND name=?",
                        (job_id, step, name),
                    ).fetchone()[0]
            except self.db.driver_errors as exc:
                raise self.db.translate(exc, self.path, f"recording once({name!r}) of step {step!r}") from exc
        return str(stored)

    def _single(self, sql: str, params: tuple[Any, ...], doing: str) -> int:
        # Its one statement is safe to repeat (request_cancel's is).
        return self.retry.run(lambda: self._single_once(sql, params, doing), doing, fenced=False, lost_ok=True)

    def _single_once(self, sql: str, params: tuple[Any, ...], doing: str) -> int:
        with self._lock:
            try:
                with self._own_transaction() as conn:
                    return int(conn.execute(sql, params).rowcount)
            except self.db.driver_errors as exc:
                raise self.db.translate(exc, self.path, doing) from exc

    # -- schedules (issue 26.5): a schedule's progress advances with its slot's job ----------

    _ADVANCE = (
        "INSERT INTO walstate_schedule (name, last_slot, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT (name) DO UPDATE SET last_slot=excluded.last_slot, updated_at=excluded.updated_at "
        "WHERE walstate_schedule.last_slot < excluded.last_slot"
    )

    def create_scheduled(self, schedule: str, slot: float, workflow: str, key: str, context: str,
                         steps: Sequence[tuple[str, str, int]], version: int = 1,
                         fingerprint: str | None = None) -> int | None:
        """Create the job of ``schedule``'s ``slot`` and advance its progress to it, in one transaction.

        Returns the job's id, or None when the schedule's progress is already
        at or past ``slot`` (another process made the job, or passed the slot
        over): nothing is written then. A job that already has ``key`` is
        kept (not made twice) and the progress still advances.
        """
        # A cron slot is a whole second: one computed from a shifted clock may carry float residue,
        # which would compare as a later slot than the same one stored (and make its job again).
        slot = float(round(slot))
        with self._lock:
            try:
                with self._own_transaction() as conn:
                    now = self.clock()
                    if conn.execute(self._ADVANCE, (schedule, slot, now)).rowcount != 1:
                        return None
                    row = conn.execute("SELECT id FROM walstate_job WHERE workflow=? AND key=?",
                                       (workflow, key)).fetchone()
                    if row is not None:
                        return int(row[0])
                    return self._insert_job(conn, workflow, key, context, steps, version, fingerprint, now)
            except self.db.driver_errors as exc:
                raise self.db.translate(exc, self.path, f"creating the {key!r} job of schedule {schedule!r}") from exc

    def pass_slot(self, schedule: str, slot: float) -> bool:
        """Advance ``schedule``'s progress to ``slot`` without a job (a missed slot); False if it was there already."""
        return self._single(self._ADVANCE, (schedule, float(round(slot)), self.clock()),
                            f"recording the progress of schedule {schedule!r}") == 1


__all__ = ["Change", "Claimed", "ContextPatch", "WritePath"]
