"""walstate's tables as peewee models, bound per database, and schema versioning.

Models are built by :func:`bind_models` for one database object (no global
database): two engines on two files never share state. The hot write path
uses raw SQL against these same tables; the models serve schema creation and
the cooler read paths.

The schema version lives in our own ``walstate_meta`` table rather than in
``PRAGMA user_version``, because walstate shares its file with the
application's tables (transactional steps write them) and ``user_version``
belongs to the application.
"""

from __future__ import annotations

import sqlite3
import uuid
from dataclasses import dataclass
from typing import Any

import peewee

from .connection import translate
from .errors import NotADatabase, SchemaTooNew

SCHEMA_VERSION = 2

#: States after which nothing changes any more (shared by steps and jobs).
TERMINAL_STEP_STATES = ("succeeded", "failed", "skipped", "cancelled")
TERMINAL_JOB_STATES = ("succeeded", "failed", "cancelled")
UNFINISHED_JOB_STATES = ("pending", "running")


@dataclass(frozen=True)
class Models:
    # Any: the classes are built at run time per database, with fields peewee adds.
    meta: Any
    job: Any
    step: Any
    journal: Any
    once: Any

    def all(self) -> list[Any]:
        return [self.meta, self.job, self.step, self.journal, self.once]


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
        id = peewee.AutoField()
        workflow = peewee.TextField()
        key = peewee.TextField(null=True)
        state = peewee.TextField(default="pending")
        context = peewee.TextField()
        # The submitted context, kept to tell a repeated submit from a conflicting one.
        initial_context = peewee.TextField()
        error = peewee.TextField(null=True)
        owner = peewee.TextField(null=True)
        lease_expires = peewee.FloatField(null=True)
        # Claim epoch: bumped by every claim and release, the fencing token
        # that every write of a run is conditioned on.
        epoch = peewee.IntegerField(default=0, constraints=[peewee.SQL("DEFAULT 0")])
        # Set by an operator's cancel while a live run holds the job; the run
        # sees it at its next heartbeat and cancels the job itself.
        cancel_requested = peewee.IntegerField(default=0, constraints=[peewee.SQL("DEFAULT 0")])
        created_at = peewee.FloatField()
        updated_at = peewee.FloatField()

        class Meta:
            table_name = "walstate_job"
            indexes = ((("workflow", "key"), True),)

    class Step(Base):
        id = peewee.AutoField()
        job = peewee.ForeignKeyField(Job, column_name="job_id", on_delete="CASCADE")
        name = peewee.TextField()
        phase = peewee.TextField()
        # Rank in the job: phases in declared order, then declaration order.
        position = peewee.IntegerField()
        state = peewee.TextField(default="pending")
        attempt = peewee.IntegerField(default=0)
        # Failed attempts and interruptions since the step was last requeued:
        # the retry budget (an operator's retry gives a fresh one).
        failures = peewee.IntegerField(default=0, constraints=[peewee.SQL("DEFAULT 0")])
        interruptions = peewee.IntegerField(default=0, constraints=[peewee.SQL("DEFAULT 0")])
        output = peewee.TextField(null=True)
        error = peewee.TextField(null=True)
        updated_at = peewee.FloatField()

        class Meta:
            table_name = "walstate_step"
            indexes = ((("job", "name"), True),)

    class Journal(Base):
        id = peewee.AutoField()
        job = peewee.ForeignKeyField(Job, column_name="job_id", on_delete="CASCADE")
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
        job = peewee.ForeignKeyField(Job, column_name="job_id", on_delete="CASCADE")
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
    return Models(Meta_, Job, Step, Journal, Once)


_V2 = (
    "ALTER TABLE walstate_job ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE walstate_job ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE walstate_step ADD COLUMN failures INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE walstate_step ADD COLUMN interruptions INTEGER NOT NULL DEFAULT 0",
    # The retry budget was derived from the journal: keep what it said.
    "UPDATE walstate_step SET interruptions=(SELECT count(*) FROM walstate_journal j WHERE j.job_id=walstate_step.job_id "
    "AND j.step=walstate_step.name AND j.note='interrupted')",
    "UPDATE walstate_step SET failures=max(0, attempt - interruptions - (state='running'))",
    "UPDATE walstate_meta SET value='2' WHERE key='schema_version'",
)


def _upgrade_1_to_2(db: peewee.SqliteDatabase) -> None:
    conn = db.connection()
    conn.execute("BEGIN EXCLUSIVE")
    try:
        if conn.execute("SELECT value FROM walstate_meta WHERE key='schema_version'").fetchone()[0] == "1":
            for sql in _V2:
                conn.execute(sql)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def ensure_schema(db: peewee.SqliteDatabase, models: Models, path: str, *, create: bool) -> str:
    """Create or check walstate's tables; return this database's stable id.

    Raises :class:`SchemaTooNew` for a file written by a newer walstate and
    :class:`NotADatabase` for a SQLite file without walstate's tables when
    ``create`` is false.
    """
    try:
        conn = db.connection()
        has_meta = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='walstate_meta'"
        ).fetchone()
        if not has_meta:
            if not create:
                raise NotADatabase(f"{path}: a SQLite file, but not a walstate database (no walstate_meta table)", path)
            with db.atomic():
                db.create_tables(models.all())
                models.meta.insert_many(
                    [("schema_version", str(SCHEMA_VERSION)), ("database_id", uuid.uuid4().hex)],
                    fields=[models.meta.key, models.meta.value],
                ).on_conflict_ignore().execute()
        rows = dict(conn.execute("SELECT key, value FROM walstate_meta").fetchall())
        if create and rows.get("schema_version") == "1":
            _upgrade_1_to_2(db)
            rows = dict(conn.execute("SELECT key, value FROM walstate_meta").fetchall())
    except (sqlite3.Error, peewee.PeeweeException) as exc:
        raise translate(exc, path, "reading walstate's schema") from exc
    version = int(rows.get("schema_version", "0"))
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"{path}: written by a newer walstate (schema version {version}; this walstate reads up to "
            f"{SCHEMA_VERSION}); upgrade walstate to open it",
            path,
        )
    if version < 1 or "database_id" not in rows:
        raise NotADatabase(f"{path}: walstate_meta is incomplete (schema version {version}); the file is damaged", path)
    return str(rows["database_id"])
