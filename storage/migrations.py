"""Numbered forward migrations of walstate's own tables, applied when a file is opened.

The schema version of a file is ``schema_version`` in ``walstate_meta``. The
first release wrote version 1; every later version is one entry of
:data:`MIGRATIONS`, keyed by the version it produces. Opening a file with an
older version (read-write) applies every missing entry in order, all in one
``BEGIN EXCLUSIVE`` transaction: one process wins the lock and upgrades, the
others wait (busy timeout), re-read the version after taking the lock and find
nothing left to do. A migration that fails rolls the whole upgrade back (SQLite
DDL is transactional) and raises :class:`MigrationFailed`; the file stays at
its old version. Each applied version is journalled in ``walstate_meta`` as
``migrated_at_N`` (a Unix time).

A new file is created directly at the latest schema from the peewee models in
:mod:`.schema`; tests/test_migrations.py proves that this gives the same
tables, columns and indexes as upgrading the schema-1 fixture
(tests/fixtures/schema1.db, written by the first release).

Adding a migration
------------------
1. Append ``N: [...]`` to :data:`MIGRATIONS`, with ``N`` one more than the
   last key: a list of SQL statements (no parameters, no ``BEGIN``/``COMMIT``:
   the upgrade is already in a transaction), or a function taking the
   ``sqlite3.Connection`` for data rewrites. Never edit or renumber an entry
   that has been released: files in the field have already applied it.
2. Make the models in :mod:`.schema` describe the result, so new files get it
   too: a column added with ``ALTER TABLE … ADD COLUMN`` goes *last* in its
   model (that is where SQLite puts it), with the same type, NULL-ability and
   default; an index gets the same name, columns and ``WHERE``.
3. Run tests/test_migrations.py: it fails if the upgraded fixture and a fresh
   file differ, or if the fixture's rows do not survive.
4. Add its PostgreSQL spelling, with the same number, to ``PG_MIGRATIONS`` in
   :mod:`.pg_schema`; tests/test_pg_schema.py fails until both backends have the
   same tables, columns and indexes.

:data:`LATEST` (re-exported as ``SCHEMA_VERSION``) follows from the table.
Files newer than :data:`LATEST` are refused with :class:`SchemaTooNew`.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Union

from .errors import MigrationFailed

#: One migration: SQL statements run in order, or a function given the connection.
Migration = Union[Sequence[str], Callable[[sqlite3.Connection], None]]

#: Version the first release created; migrations start from it.
BASE_VERSION = 1

MIGRATIONS: dict[int, Migration] = {
    # Retention (prune) looks for finished jobs by the time they finished: a
    # partial index on terminal jobs only, so it costs nothing while a job
    # runs and pruning never scans the history. The WHERE literal must match
    # retention's query exactly (SQLite uses a partial index only then).
    2: [
        'CREATE INDEX IF NOT EXISTS "job_finished_at" ON "walstate_job" ("updated_at") '
        "WHERE (\"state\" IN ('succeeded', 'failed', 'cancelled'))",
    ],
    # Ownership: every claim bumps a per-job epoch that fences the run's writes;
    # an operator's cancel of a live run is a request the run carries out; the
    # retry budget is stored per step (it was derived from the journal, whose
    # counts are kept here).
    3: [
        "ALTER TABLE walstate_job ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE walstate_job ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE walstate_step ADD COLUMN failures INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE walstate_step ADD COLUMN interruptions INTEGER NOT NULL DEFAULT 0",
        "UPDATE walstate_step SET interruptions=(SELECT count(*) FROM walstate_journal j "
        "WHERE j.job_id=walstate_step.job_id AND j.step=walstate_step.name AND j.note='interrupted')",
        "UPDATE walstate_step SET failures=max(0, attempt - interruptions - (state='running'))",
    ],
    # Durable waits: a waiting step's wake-up time and topic; a parked job's
    # earliest wake-up (claims skip it until then); messages sent to jobs.
    4: [
        "ALTER TABLE walstate_job ADD COLUMN wake_at REAL",
        "ALTER TABLE walstate_step ADD COLUMN wake_at REAL",
        "ALTER TABLE walstate_step ADD COLUMN wait_topic TEXT",
        'CREATE TABLE IF NOT EXISTS "walstate_message" ("id" INTEGER NOT NULL PRIMARY KEY, "job_id" INTEGER NOT NULL, '
        '"topic" TEXT NOT NULL, "payload" TEXT NOT NULL, "key" TEXT, "sent_at" REAL NOT NULL, "consumed_by" TEXT, '
        'FOREIGN KEY ("job_id") REFERENCES "walstate_job" ("id") ON DELETE CASCADE)',
        'CREATE INDEX IF NOT EXISTS "message_job_id" ON "walstate_message" ("job_id")',
        'CREATE UNIQUE INDEX IF NOT EXISTS "message_job_id_key" ON "walstate_message" ("job_id", "key")',
        'CREATE INDEX IF NOT EXISTS "message_job_id_topic_id" ON "walstate_message" ("job_id", "topic", "id")',
    ],
    # Workflow versions: a job records the version of its workflow and a
    # fingerprint of that definition's shape when it is submitted, so it runs
    # on the definition it was made for. Jobs of older files were made by
    # version 1 (the default); their fingerprint is unknown (NULL), and they
    # are checked by their step names, as before.
    5: [
        "ALTER TABLE walstate_job ADD COLUMN version INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE walstate_job ADD COLUMN fingerprint TEXT",
    ],
    # Workers look for dead owners among claimed unfinished jobs every 0.5 s: a
    # partial index keeps that read small however many jobs are parked or pending.
    # The WHERE must match Reader.owned_unfinished's (SQLite needs it to imply this one).
    6: [
        'CREATE INDEX IF NOT EXISTS "job_owned_unfinished" ON "walstate_job" ("owner") '
        "WHERE ((\"state\" IN ('pending', 'running')) AND (\"owner\" IS NOT NULL))",
        # ... and the next wake-up of a parked job, found by walking parked jobs in wake-up order.
        'CREATE INDEX IF NOT EXISTS "job_parked_wake_at" ON "walstate_job" ("wake_at") '
        "WHERE (((\"state\" IN ('pending', 'running')) AND (\"owner\" IS NULL)) AND (\"wake_at\" IS NOT NULL))",
    ],
    # ---- issue 26.4: job ids are never reused. --------------------------------------------
    # A job id without AUTOINCREMENT is max(id)+1, so pruning the newest jobs handed their ids
    # (and with them every step's idempotency key, DATABASE_ID:JOB_ID:STEP) to the next jobs.
    # AUTOINCREMENT keeps the highest id ever used in sqlite_sequence; adding it needs the
    # table rebuilt (see _job_ids_never_reused). Ids pruned before this upgrade are unknown
    # to it: it starts above the highest id still in the file.
    7: lambda conn: _job_ids_never_reused(conn),
    # ---- issue 27.14: no index that only repeats the prefix of another. -------------------
    # Each of these is the job_id prefix of a wider index on the same table (step_job_id_name,
    # journal_job_id_id, once's primary key, message_job_id_key), which serves every lookup
    # and cascade by job_id as well; they only cost space and a write per row.
    8: [
        'DROP INDEX IF EXISTS "step_job_id"',
        'DROP INDEX IF EXISTS "journal_job_id"',
        'DROP INDEX IF EXISTS "once_job_id"',
        'DROP INDEX IF EXISTS "message_job_id"',
    ],
    # ---- issue 26.5: a schedule's progress is stored, not kept in a process's memory. -----
    # The latest slot of each schedule that got its job (or was passed over as missed),
    # advanced in the transaction that creates the slot's job: one job per slot across
    # restarts, processes and prunes (statemachine/schedules.py).
    9: [
        'CREATE TABLE IF NOT EXISTS "walstate_schedule" ("name" TEXT NOT NULL PRIMARY KEY, '
        '"last_slot" REAL NOT NULL, "updated_at" REAL NOT NULL)',
    ],
    # Ownership: when the claim was last renewed (taken or renewed, on the lease clock), so that
    # `walstate show` can say how long ago a hung owner last renewed it.
    10: [
        "ALTER TABLE walstate_job ADD COLUMN renewed_at REAL",
    ],
    # Claims take the job runnable longest first: by when it last became runnable (``updated_at``:
    # created, released, parked, requeued), not by id, walking this index in that order.
    11: [
        'CREATE INDEX IF NOT EXISTS "job_runnable_since" ON "walstate_job" ("updated_at") '
        "WHERE (\"state\" IN ('pending', 'running'))",
    ],
}


def _job_ids_never_reused(conn: sqlite3.Connection) -> None:
    """Rebuild walstate_job with ``AUTOINCREMENT``, keeping every row, column and index (schema 7).

    SQLite cannot add AUTOINCREMENT to a table: a new table is made from the
    old one's own ``CREATE TABLE`` text (so every column added by ALTER TABLE
    keeps its place, type and default), the rows are copied with their ids
    (which sets sqlite_sequence to the highest), the old table is dropped and
    the new one renamed, and the indexes are made again from their own text.
    The caller has switched foreign keys off for the upgrade (dropping the old
    table would otherwise cascade into every step, journal and message row)
    and checks them before it commits (:func:`apply`).
    """
    (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE type='table' AND name='walstate_job'").fetchone()
    rebuilt, count = re.subn(r'^CREATE TABLE "walstate_job" \("id" INTEGER NOT NULL PRIMARY KEY',
                             'CREATE TABLE "walstate_job_rebuilt" ("id" INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT',
                             str(sql))
    if count != 1:
        raise ValueError(f"walstate_job is not as walstate made it: {sql}")
    indexes = [str(r[0]) for r in conn.execute(
        "SELECT sql FROM sqlite_master WHERE type='index' AND tbl_name='walstate_job' AND sql IS NOT NULL")]
    conn.execute(rebuilt)
    conn.execute("INSERT INTO walstate_job_rebuilt SELECT * FROM walstate_job")
    conn.execute("DROP TABLE walstate_job")
    conn.execute("ALTER TABLE walstate_job_rebuilt RENAME TO walstate_job")
    for index in indexes:
        conn.execute(index)


def latest(migrations: Mapping[int, Migration] = MIGRATIONS) -> int:
    """The schema version a file has after every migration of ``migrations``."""
    expected = list(range(BASE_VERSION + 1, BASE_VERSION + 1 + len(migrations)))
    if sorted(migrations) != expected:
        raise ValueError(f"migrations must be numbered {expected} without gaps, not {sorted(migrations)}")
    return BASE_VERSION + len(migrations)


#: The schema version this walstate writes and reads.
LATEST = latest()


def apply(
    conn: sqlite3.Connection,
    path: str,
    version: int,
    migrations: Mapping[int, Migration] = MIGRATIONS,
) -> list[int]:
    """Apply every migration after ``version``, inside the caller's transaction; return the versions applied.

    Records ``schema_version`` and ``migrated_at_N`` as it goes. The caller
    holds the write lock (``BEGIN EXCLUSIVE``) and rolls back everything if this
    raises; a failure of a migration itself is raised as
    :class:`MigrationFailed` naming the file and the version.
    """
    applied = []
    for target in range(version + 1, latest(migrations) + 1):
        step = migrations[target]
        try:
            if callable(step):
                step(conn)
            else:
                for sql in step:
                    conn.execute(sql)
            conn.execute(
                "INSERT OR REPLACE INTO walstate_meta (key, value) VALUES ('schema_version', ?), (?, ?)",
                (str(target), f"migrated_at_{target}", repr(time.time())),
            )
        except Exception as exc:  # a function migration may fail with anything
            if isinstance(exc, sqlite3.Error) and _busy(exc):
                raise  # not the migration's fault: the caller reports the lock
            raise MigrationFailed(
                f"{path}: upgrading walstate's tables from schema {target - 1} to {target} failed ({exc}); "
                f"the whole upgrade was rolled back and the file is unchanged at schema {version}; "
                "keep using the older walstate on it and report this with the file's `sqlite3 .schema`",
                path,
            ) from exc
        applied.append(target)
    # The upgrade ran with foreign keys off (a table rebuild must not cascade): check them now.
    broken = conn.execute("PRAGMA foreign_key_check").fetchall() if applied else []
    if broken:
        raise MigrationFailed(
            f"{path}: after upgrading walstate's tables to schema {applied[-1]}, {len(broken)} row(s) reference rows "
            f"that do not exist (first: {tuple(broken[0])}); the whole upgrade was rolled back and the file is "
            f"unchanged at schema {version}; report this with the file's `sqlite3 .schema`",
            path,
        )
    return applied


def _busy(exc: sqlite3.Error) -> bool:
    return "locked" in str(exc).lower() or getattr(exc, "sqlite_errorname", "").startswith("SQLITE_BUSY")


__all__ = ["BASE_VERSION", "LATEST", "MIGRATIONS", "Migration", "apply", "latest"]
