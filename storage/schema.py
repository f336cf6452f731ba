"""walstate's tables as peewee models, bound per database, and schema versioning.

Models are built by :func:`bind_models` for one database object (no global
database): two engines on two files never share state. The hot write path
uses raw SQL against these same tables; the models serve schema creation and
the cooler read paths.

The models describe the *latest* schema: a new file is created from them;
older files reach the same schema through :mod:`.migrations` (see there how to
add a migration).

The schema version lives in our own ``walstate_meta`` table rather than in
``PRAGMA user_version``, because walstate shares its file with the
application's tables (transactional steps write them) and ``user_version``
belongs to the application.
"""

from __future__ import annotations

import sqlite3
import uuid
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

import peewee

from .connection import translate
from .errors import NotADatabase, SchemaTooNew, SchemaTooOld
from .migrations import BASE_VERSION, LATEST, MIGRATIONS, Migration, apply, latest
from .types import TERMINAL_JOB_STATES, TERMINAL_STEP_STATES, UNFINISHED_JOB_STATES

#: The schema version this walstate creates and reads (older files are upgraded: see migrations.py).
SCHEMA_VERSION = LATEST



@dataclass(frozen=True)
class Models:
    # Any: the classes are built at run time per database, with fields peewee adds.
    meta: Any
    job: Any
    step: Any
    journal: Any
    once: Any
    message: Any
    schedule: Any

    def all(self) -> list[Any]:
        return [self.meta, self.job, self.step, self.journal, self.once, self.message, self.schedule]


class _AutoIncrement(peewee.AutoField):
    """An id SQLite never hands out twice (``AUTOINCREMENT``: schema 7), even after the newest rows are deleted."""

    def ddl(self, ctx: Any) -> Any:
        return peewee.NodeList((super().ddl(ctx), peewee.SQL("AUTOINCREMENT")))


def bind_models(db: peewee.Database) -> Models:
    """Build walstate's model classes bound to ``db``."""

    class Base(peewee.Model):
        class Meta:
            database = db

    class Meta_(Base):
        key = peewee.TextField(primary_key=True)
        value = peewee.TextField()

        class Meta:
            table_name = "walstate_meta"

    class Job(Base):
        # Schema 7: AUTOINCREMENT, so a pruned job's id (and its steps' idempotency keys) never comes back.
        id = _AutoIncrement()
        workflow = peewee.TextField()
        key = peewee.TextField(null=True)
        state = peewee.TextField(default="pending")
        context = peewee.TextField()
        # The submitted context, kept to tell a repeated submit from a conflicting one.
        initial_context = peewee.TextField()
        error = peewee.TextField(null=True)
        owner = peewee.TextField(null=True)
        lease_expires = peewee.FloatField(null=True)
        created_at = peewee.FloatField()
        updated_at = peewee.FloatField()
        # Schema 3 (added last, where ALTER TABLE puts them):
        # the claim epoch, bumped by every claim and release: the fencing
        # token that every write of a run is conditioned on;
        epoch = peewee.IntegerField(default=0, constraints=[peewee.SQL("DEFAULT 0")])
        # set by an operator's cancel while a live run holds the job; the run
        # sees it at its next heartbeat poll and cancels the job itself.
        cancel_requested = peewee.IntegerField(default=0, constraints=[peewee.SQL("DEFAULT 0")])
        # Schema 4: a parked job (a step waits, nothing else to do) is not
        # claimed before this time (NULL: runnable now).
        wake_at = peewee.FloatField(null=True)
        # Schema 5: the workflow version the job was submitted with, and the
        # fingerprint of that definition (NULL for jobs older than schema 5).
        version = peewee.IntegerField(default=1, constraints=[peewee.SQL("DEFAULT 1")])
        fingerprint = peewee.TextField(null=True)
        # Schema 10: when the claim was last taken or renewed (lease clock); kept after a release.
        renewed_at = peewee.FloatField(null=True)

        class Meta:
            table_name = "walstate_job"
            indexes = ((("workflow", "key"), True),)

    class Step(Base):
        id = peewee.AutoField()
        # index=False (schema 8): the unique (job_id, name) index serves lookups by job_id.
        job = peewee.ForeignKeyField(Job, column_name="job_id", on_delete="CASCADE", index=False)
        name = peewee.TextField()
        phase = peewee.TextField()
        # Rank in the job: phases in declared order, then declaration order.
        position = peewee.IntegerField()
        state = peewee.TextField(default="pending")
        attempt = peewee.IntegerField(default=0)
        output = peewee.TextField(null=True)
        error = peewee.TextField(null=True)
        updated_at = peewee.FloatField()
        # Schema 3: failed attempts and interruptions since the step was last
        # requeued, its retry budget (an operator's retry gives a fresh one).
        failures = peewee.IntegerField(default=0, constraints=[peewee.SQL("DEFAULT 0")])
        interruptions = peewee.IntegerField(default=0, constraints=[peewee.SQL("DEFAULT 0")])
        # Schema 4: what a waiting step waits for: a time (inf: none), a topic.
        wake_at = peewee.FloatField(null=True)
        wait_topic = peewee.TextField(null=True)

        class Meta:
            table_name = "walstate_step"
            indexes = ((("job", "name"), True),)

    class Journal(Base):
        id = peewee.AutoField()
        job = peewee.ForeignKeyField(Job, column_name="job_id", on_delete="CASCADE", index=False)  # see Step.job
        step = peewee.TextField(null=True)  # NULL: a change of the job's own state
        from_state = peewee.TextField()
        to_state = peewee.TextField()
        attempt = peewee.IntegerField()
        at = peewee.FloatField()
        note = peewee.TextField(null=True)

        class Meta:
            table_name = "walstate_journal"
            indexes = ((("job", "id"), False),)

    class Once(Base):
        job = peewee.ForeignKeyField(Job, column_name="job_id", on_delete="CASCADE", index=False)  # see Step.job
        step = peewee.TextField()
        name = peewee.TextField()
        result = peewee.TextField()
        at = peewee.FloatField()

        class Meta:
            table_name = "walstate_once"
            primary_key = peewee.CompositeKey("job", "step", "name")

    # Recovery looks only at unfinished work: partial indexes keep that cost
    # proportional to what is in flight, not to the history in the file.
    # SQLite uses a partial index only for a query whose WHERE names the same
    # literal values (bound parameters cannot be proven to match), and only an
    # IN list (not NOT IN) is searchable: see Reader.unfinished_jobs.
    Job.add_index(Job.index(Job.state, Job.id).where(Job.state.in_(UNFINISHED_JOB_STATES)))
    # Schema 2: retention finds finished jobs by when they finished (migrations.py).
    Job.add_index(Job.index(Job.updated_at, name="job_finished_at").where(Job.state.in_(TERMINAL_JOB_STATES)))
    # Schema 6: the workers' dead-owner scan reads only claimed unfinished jobs,
    # not every parked or pending one (migrations.py).
    Job.add_index(Job.index(Job.owner, name="job_owned_unfinished").where(
        Job.state.in_(UNFINISHED_JOB_STATES) & Job.owner.is_null(False)))
    # ... and their look for the next wake-up of a parked job walks parked jobs in wake-up order.
    Job.add_index(Job.index(Job.wake_at, name="job_parked_wake_at").where(
        Job.state.in_(UNFINISHED_JOB_STATES) & Job.owner.is_null() & Job.wake_at.is_null(False)))
    # Schema 11: claims walk unfinished jobs by when they last became runnable (migrations.py).
    Job.add_index(Job.index(Job.updated_at, name="job_runnable_since").where(Job.state.in_(UNFINISHED_JOB_STATES)))
    class Message(Base):
        id = peewee.AutoField()
        job = peewee.ForeignKeyField(Job, column_name="job_id", on_delete="CASCADE", index=False)  # see Step.job
        topic = peewee.TextField()
        payload = peewee.TextField()
        key = peewee.TextField(null=True)
        sent_at = peewee.FloatField()
        # "step:name" of the wait that consumed it (NULL: not yet consumed).
        consumed_by = peewee.TextField(null=True)

        class Meta:
            table_name = "walstate_message"
            indexes = ((("job", "key"), True), (("job", "topic", "id"), False))

    class Schedule(Base):
        # Schema 9: a schedule's progress, the latest slot that got its job or was passed over
        # (statemachine/schedules.py); advanced in the transaction that creates the slot's job.
        name = peewee.TextField(primary_key=True)
        last_slot = peewee.FloatField()
        updated_at = peewee.FloatField()

        class Meta:
            table_name = "walstate_schedule"

    return Models(Meta_, Job, Step, Journal, Once, Message, Schedule)


@dataclass(frozen=True)
class SchemaState:
    """What opening a file found and did: its stable id, and the migrations this open applied."""

    database_id: str
    applied: tuple[int, ...]


def _meta(conn: sqlite3.Connection) -> dict[str, str] | None:
    """walstate_meta as a dict, or None when the file has no walstate tables."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='walstate_meta'").fetchone():
        return None
    return {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM walstate_meta").fetchall()}


def ensure_schema(
    db: peewee.SqliteDatabase,
    models: Models,
    path: str,
    *,
    create: bool,
    migrations: Mapping[int, Migration] = MIGRATIONS,
    database_id: str | None = None,
) -> SchemaState:
    """Create, upgrade or check walstate's tables.

    A file without walstate's tables gets the latest schema (when ``create``);
    an older one is upgraded in place by :func:`.migrations.apply`. Both happen
    under ``BEGIN EXCLUSIVE``, and the version is read again once the lock is
    held, so of several processes opening the same file one does the work and
    the others find it done. A file already at the latest version takes no
    lock at all.

    Raises :class:`SchemaTooNew` for a file written by a newer walstate,
    :class:`SchemaTooOld` for an older file opened read-only (``create`` false),
    :class:`MigrationFailed` when an upgrade fails (rolled back), and
    :class:`NotADatabase` for a SQLite file without walstate's tables when
    ``create`` is false.

    ``database_id`` (for tests only: see ``Store``) is the id a *new* file
    gets instead of a random one; it changes nothing in an existing file.
    """
    target = latest(migrations)
    applied: list[int] = []
    try:
        conn = db.connection()
        rows = _meta(conn)
        if rows is None and not create:
            raise NotADatabase(f"{path}: a SQLite file, but not a walstate database (no walstate_meta table)", path)
        if rows is None or _version(rows, path, target) < target:
            if not create:
                raise SchemaTooOld(
                    f"{path}: written by an older walstate (schema version {_version(rows or {}, path, target)}; "
                    f"this walstate uses {target}) and opened read-only; upgrade it in place once with "
                    "`walstate upgrade DB` (or by opening it with an Engine), then retry",
                    path,
                )
            # Foreign keys off while tables are made or rebuilt (a rebuild drops a parent table,
            # which would cascade into its children); apply() checks them before the commit.
            # The pragma is a no-op inside a transaction: it is set before BEGIN, restored after.
            conn.execute("PRAGMA foreign_keys=OFF")
            # EXCLUSIVE: in WAL mode it is the write lock (readers go on); taken
            # up front, so two openers never both decide to upgrade.
            conn.execute("BEGIN EXCLUSIVE")
            try:
                rows = _meta(conn)
                if rows is None:
                    db.create_tables(models.all())
                    conn.execute(
                        "INSERT OR IGNORE INTO walstate_meta (key, value) VALUES ('schema_version', ?), "
                        "('database_id', ?)",
                        (str(target), database_id or uuid.uuid4().hex),
                    )
                else:
                    applied = apply(conn, path, _version(rows, path, target), migrations)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                conn.execute("PRAGMA foreign_keys=ON")
            rows = _meta(conn) or {}
    except (sqlite3.Error, peewee.PeeweeException) as exc:
        raise translate(exc, path, "reading walstate's schema") from exc
    version = _version(rows, path, target)
    if version < BASE_VERSION or "database_id" not in rows:
        raise NotADatabase(f"{path}: walstate_meta is incomplete (schema version {version}); the file is damaged", path)
    return SchemaState(rows["database_id"], tuple(applied))


def _version(rows: Mapping[str, str], path: str, target: int) -> int:
    text = str(rows.get("schema_version", "0"))
    if not (text.isascii() and text.isdigit()):
        # Written by walstate, it is a whole number: anything else ('1.0', '') is damage or another tool.
        raise NotADatabase(f"{path}: walstate_meta's schema_version is {text!r}, not a whole number; the file is "
                           "damaged or was not written by walstate", path)
    version = int(text)
    if version > target:
        raise SchemaTooNew(
            f"{path}: written by a newer walstate (schema version {version}; this walstate reads up to "
            f"{target}); upgrade walstate to open it",
            path,
        )
    return version
