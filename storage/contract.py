"""The storage contract: the operations ``statemachine/`` may ask of a walstate database, whichever store holds it.

A store is anything that implements :class:`Storage`: a protocol of
operations over the plain data of :mod:`.types` (rows, moves, claims), not of
classes. Three stores implement it: a SQLite file (:class:`.store.Store`), a
PostgreSQL database (:class:`.postgres.PgStore`), both through the one SQL
implementation of :class:`.operations.SqlOperations`, and memory
(:class:`.memory.MemoryStore`, for fast unit tests). One contract suite
(``tests/test_contract.py``) runs every promise below against all three: a new
backend passes it or it is not a backend.

Every operation that writes is atomic (all of it or nothing), raises the typed
errors of :mod:`.errors` (never a driver's), and retries a transient refusal
(a busy file, a serialization failure, a dropped session) itself for the
store's ``patience``. Writes a run's claim fences (a sub-step's move, a
``once()`` record, a consumed message, a park, a release, a renewal) take
the run's ``owner`` and ``epoch`` and change nothing once another claim
superseded that one.

:func:`open_store` picks the store from the target: ``memory://NAME``, a
``postgresql://`` URL, or else a SQLite path. The table of targets is
:data:`BACKENDS`; a third backend is a module implementing the protocol and
one line there (see the README's "Storage backends").
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .migrations import LATEST as SCHEMA_VERSION
from .targets import is_memory_url, is_postgres_url, redact
from .types import (DEFAULT_FILE_MODE, DEFAULT_SYNC_INTERVAL, Change, Claimed, Durability, JobRow, JournalRow,
                    MigratedJob, StepCount, StepRow)

Effect = Callable[[], Sequence[Change]]
ContextMap = Callable[[str], str]


class Storage(Protocol):
    """An opened walstate database. Attributes are read-only: a store is never re-pointed."""

    # -- what it is ----------------------------------------------------------------

    @property
    def path(self) -> str:
        """What messages name: the file's path, the URL without its password, or ``memory://NAME``."""
        ...

    @property
    def durability(self) -> Durability: ...

    @property
    def readonly(self) -> bool:
        """Opened to read only: every write raises :class:`UsageError` or the database's read-only error."""
        ...

    @property
    def database_id(self) -> str:
        """The database's stable random id: part of every idempotency key, never the same for two databases."""
        ...

    @property
    def migrated(self) -> tuple[int, ...]:
        """Schema versions this open upgraded the database through (empty: it was current)."""
        ...

    @property
    def lease_clock(self) -> Callable[[], float]:
        """The clock leases are set and judged with: one every process of the database agrees on, no step moves."""
        ...

    @property
    def patience(self) -> float:
        """Seconds a write no claim fences keeps retrying a transient refusal before it raises."""
        ...

    @property
    def handle(self) -> Any:
        """The backend's own handle, for a transactional step's SQL only (``step.db``; SQL stores: peewee's).

        The escape hatch: nothing else in walstate uses it. The memory store's
        handle raises :class:`UsageError` on any use (it has no SQL).
        """
        ...

    def synced(self, local: Callable[[], float]) -> Callable[[], float]:
        """``local`` as wake-ups must use it (PostgreSQL: corrected to the server's clock); leases use ``lease_clock``."""
        ...

    def configure(self, *, patience: float, hold_warning: float | None, idle_limit: float) -> None:
        """Set the retry patience, the transactional-hold warning and the idle-transaction limit (an engine's)."""
        ...

    def stop_retrying(self) -> None:
        """End every write's wait for a transient refusal at once (the engine is closing): they raise."""
        ...

    def transaction_active(self) -> bool:
        """Whether this thread is inside a transaction it opened (a transactional step, ``db.atomic()``)."""
        ...

    def transient_refusal(self, exc: BaseException) -> Exception | None:
        """``exc``, raised inside a transactional step, as walstate's error if transient (the step reruns), else None."""
        ...

    def close(self) -> None:
        """Close this thread's connection and what else the store opened; reads and writes after it reconnect."""
        ...

    # -- reads -----------------------------------------------------------------------

    def job(self, job_id: int) -> JobRow | None:
        """The job's row, or None if there is none (never made, or pruned)."""
        ...

    def jobs(self, *, state: str | None = None, workflow: str | None = None, limit: int | None = None,
             offset: int = 0) -> list[JobRow]:
        """Jobs newest first (by id), optionally of one state and one workflow, ``limit`` of them after ``offset``."""
        ...

    def steps(self, job_id: int) -> list[StepRow]:
        """The job's sub-steps in position order (empty: no such job)."""
        ...

    def step_counts(self, job_ids: Sequence[int]) -> list[StepCount]:
        """How many sub-steps of these jobs are in each state, per phase (one read for a page)."""
        ...

    def journal(self, job_id: int, step: str | None = None) -> list[JournalRow]:
        """Every recorded move of the job (of one step; ``step=None`` rows are the job's own), oldest first."""
        ...

    def unfinished_jobs(self) -> list[JobRow]:
        """Jobs not yet in a terminal state, by id."""
        ...

    def once(self, job_id: int, step: str, name: str) -> str | None:
        """The stored ``once()`` result (JSON text) of (job, step, name), or None."""
        ...

    def cancel_requested(self, job_ids: Sequence[int]) -> set[int]:
        """Which of these jobs an operator asked to cancel."""
        ...

    def owned_unfinished(self) -> list[tuple[int, int, str, str, float | None]]:
        """``(id, epoch, workflow, owner, lease_expires)`` of unfinished jobs someone claims (liveness checks)."""
        ...

    def runnable_exists(self, workflows: Sequence[str], now: float, skip: Sequence[int] = (),
                        versions: Sequence[tuple[str, int]] = ()) -> bool:
        """Whether an unclaimed unfinished job of ``workflows`` (of ``versions``, if any) is due at ``now``."""
        ...

    def next_wake(self, workflows: Sequence[str], versions: Sequence[tuple[str, int]] = ()) -> float | None:
        """The earliest wake-up time of a parked job of ``workflows`` (None: none parked)."""
        ...

    def message_topics(self, job_id: int) -> set[str]:
        """Topics with a message sent to the job and not yet consumed."""
        ...

    def schedule_slot(self, name: str) -> float | None:
        """The latest slot of schedule ``name`` that got its job or was passed over (None: none yet)."""
        ...

    def data_version(self) -> int:
        """A number that changes whenever another connection commits (a cheap "did anything change?")."""
        ...

    # -- making jobs -----------------------------------------------------------------

    def create_job(self, workflow: str, key: str | None, context: str, steps: Sequence[tuple[str, str, int]],
                   version: int = 1, fingerprint: str | None = None) -> tuple[int, str | None]:
        """Insert a pending job and its pending sub-steps (name, phase, rank); return ``(id, None)``.

        With a ``key`` another job has, insert nothing and return that job's
        ``(id, workflow)``. Ids are never handed out twice for the life of the
        database, pruned jobs' included.
        """
        ...

    def create_scheduled(self, schedule: str, slot: float, workflow: str, key: str, context: str,
                         steps: Sequence[tuple[str, str, int]], version: int = 1,
                         fingerprint: str | None = None) -> int | None:
        """Make the job of ``schedule``'s ``slot`` and advance its progress to it, at once; None: done before."""
        ...

    def pass_slot(self, schedule: str, slot: float) -> bool:
        """Advance ``schedule``'s progress to ``slot`` without a job (a missed slot); False if it was there."""
        ...

    # -- claims ----------------------------------------------------------------------

    def claim(self, job_id: int, *, state: str, epoch: int, owner: str, lease_expires: float,
              note: str) -> Claimed | None:
        """Claim the job for ``owner`` if it is still in ``state`` at ``epoch``: the epoch goes up by one.

        None (nothing written) when someone else moved or claimed it since it
        was read. Journalled with ``note``.
        """
        ...

    def claim_runnable(self, *, owner: str, lease_expires: float, limit: int, workflows: Sequence[str], now: float,
                       dead: Sequence[tuple[int, int]] = (), skip: Sequence[int] = (),
                       limits: dict[str, int] | None = None,
                       versions: Sequence[tuple[str, int]] = ()) -> list[tuple[str, str, str | None, Claimed]]:
        """Claim up to ``limit`` runnable jobs of ``workflows`` at once: ``(workflow, note, previous owner, claim)``.

        Runnable: unclaimed (or claimed by an owner in ``dead`` at that epoch,
        or with a lease expired at ``now`` on the lease clock), unfinished,
        due, not in ``skip``; oldest runnable first; no workflow over its
        ``limits`` of running jobs.
        """
        ...

    def renew(self, job_id: int, owner: str, epoch: int, lease_expires: float) -> bool | None:
        """Extend ``owner``'s claim at ``epoch``: True; False if the claim was lost; None: could not tell now."""
        ...

    def release(self, job_id: int, owner: str, epoch: int, note: str, *, undo_start: bool = False,
                patience: float | None = None) -> bool:
        """Give up ``owner``'s claim on the unfinished job (epoch up, journalled); False if it was lost already."""
        ...

    def force_release(self, job_id: int, note: str) -> tuple[str, int] | None:
        """Take the claim from whoever holds the unfinished job (an operator's act): ``(owner, epoch)`` or None."""
        ...

    def park(self, job_id: int, owner: str, epoch: int, wake_at: float, topics: Sequence[str], note: str, *,
             patience: float | None = None) -> bool:
        """Release a job whose steps wait, to be claimed again at ``wake_at`` or when a message of ``topics`` comes."""
        ...

    # -- moves -----------------------------------------------------------------------

    def commit(self, changes: Sequence[Change] = (), effect: Effect | None = None) -> None:
        """Apply ``changes`` and those ``effect`` returns atomically, each a compare-and-set with its journal row.

        ``effect`` runs inside the transaction (a transactional step's
        handler). Returns after the commit. Raises :class:`StaleState` when a
        change's row is no longer in its ``expected`` state, :class:`LeaseLost`
        when its ``owner``/``epoch`` no longer hold the job, and nothing of any
        change is written then. Concurrent callers may share one transaction;
        each gets its own outcome.
        """
        ...

    def once_lookup(self, job_id: int, step: str, name: str, owner: str | None, epoch: int) -> str | None:
        """The stored ``once()`` result, or None: then its function may run. :class:`LeaseLost` if the claim is gone."""
        ...

    def record_once(self, job_id: int, step: str, name: str, result: str, *, owner: str | None = None,
                    epoch: int | None = None) -> str:
        """Store a ``once()`` result unless one exists; return the stored text. Fenced when ``epoch`` is given."""
        ...

    def send(self, job_id: int, topic: str, payload: str, key: str | None) -> tuple[int, bool]:
        """Store a message for the job: ``(message id, new?)``; a repeated ``key`` stores nothing and is not new.

        Raises :class:`UnknownJob`, or :class:`JobFinished` for a new message to an ended job.
        """
        ...

    def consume(self, job_id: int, step: str, name: str, topic: str, owner: str | None, epoch: int) -> str | None:
        """The payload this wait consumed (recorded before, or the oldest unconsumed of ``topic`` now), fenced."""
        ...

    def request_cancel(self, job_id: int) -> bool:
        """Ask whoever runs the unfinished job to cancel it; False if it is finished. :class:`UnknownJob` if none."""
        ...

    def migrate_job(self, job_id: int, workflow: str, *, epoch: int, from_version: int, to_version: int,
                    fingerprint: str, steps: Sequence[tuple[str, str, int]], drop: Sequence[str],
                    context: ContextMap) -> MigratedJob | None:
        """Move the unclaimed unfinished job onto ``to_version`` if still at ``epoch``; None: it moved on.

        Raises :class:`MigrationRefused` (nothing written) when a step the new
        version removes is unfinished and not in ``drop``.
        """
        ...

    def prune(self, older_than: float, states: Sequence[str], *, batch: int, dry_run: bool = False) -> int:
        """Delete jobs in the finished ``states`` that ended more than ``older_than`` seconds ago; how many.

        Their steps, journal, messages and once() records go too, ``batch``
        jobs per transaction; ``dry_run`` only counts.
        """
        ...


def _sql(target: str | os.PathLike[str], **options: Any) -> Storage:
    from .store import Store

    return Store(target, **options)


def _postgres(target: str | os.PathLike[str], **options: Any) -> Storage:
    from .postgres import PgStore

    options.pop("sync_interval", None)  # the server syncs its own log
    options.pop("file_mode", None)
    return PgStore(str(target), **options)


def _memory(target: str | os.PathLike[str], **options: Any) -> Storage:
    from .memory import MemoryStore

    return MemoryStore(str(target), **options)


#: Which store opens a target: ``(test of the target, opener)``, tried in order; the last takes any path.
#: A third backend is one more line here (modules import on first use: SQLite users never load psycopg).
BACKENDS: list[tuple[Callable[[str], bool], Callable[..., Storage]]] = [
    (is_memory_url, _memory),
    (is_postgres_url, _postgres),
    (lambda target: True, _sql),
]


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
    """Open the walstate database at ``target``: ``memory://NAME``, a ``postgresql://`` URL or a SQLite path.

    ``file_mode`` (SQLite only) is the permission bits of a file this creates: owner only by default.
    """
    name = os.fspath(target)
    for accepts, opener in BACKENDS:
        if accepts(name):
            return opener(target, durability=durability, busy_timeout=busy_timeout, readonly=readonly,
                          group_commit=group_commit, sync_interval=sync_interval, database_id=database_id,
                          file_mode=file_mode)
    raise AssertionError("the last backend accepts every target")  # pragma: no cover


def connect_raw(target: str, timeout: float = 5.0) -> Any:
    """A plain DB-API connection to a SQL target (for tests and tools that read tables as they are)."""
    if is_postgres_url(target):
        return importlib.import_module(f"{__package__}.postgres").raw_connection(target, timeout)
    import sqlite3

    return sqlite3.connect(target, timeout=timeout)


__all__ = ["BACKENDS", "SCHEMA_VERSION", "Storage", "connect_raw", "is_memory_url", "is_postgres_url", "open_store", "redact"]
