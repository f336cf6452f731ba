"""Read-only queries over walstate's tables.

Rows come back as small frozen dataclasses so ``statemachine/`` never sees
SQL. Nothing here writes.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

import peewee

from .connection import translate
from .schema import UNFINISHED_JOB_STATES


@dataclass(frozen=True, slots=True)
class JobRow:
    id: int
    workflow: str
    key: str | None
    state: str
    context: str
    error: str | None
    owner: str | None
    lease_expires: float | None
    created_at: float
    updated_at: float
    epoch: int = 0
    cancel_requested: bool = False
    #: The workflow version the job runs on, and its definition's fingerprint (None: made before schema 4).
    version: int = 1
    fingerprint: str | None = None


@dataclass(frozen=True, slots=True)
class StepRow:
    id: int
    job_id: int
    name: str
    phase: str
    position: int
    state: str
    attempt: int
    output: str | None
    error: str | None
    updated_at: float
    failures: int = 0
    interruptions: int = 0


@dataclass(frozen=True, slots=True)
class JournalRow:
    id: int
    job_id: int
    step: str | None
    from_state: str
    to_state: str
    attempt: int
    at: float
    note: str | None


_JOB_COLS = ("id, workflow, key, state, context, error, owner, lease_expires, created_at, updated_at, epoch, "
             "cancel_requested, version, fingerprint")
_STEP_COLS = "id, job_id, name, phase, position, state, attempt, output, error, updated_at, failures, interruptions"
_JOURNAL_COLS = "id, job_id, step, from_state, to_state, attempt, at, note"
STEPS_OF_JOB = f"SELECT {_STEP_COLS} FROM walstate_step WHERE job_id=? ORDER BY position"
# The unfinished states are written into the SQL as literals, the same ones
# the partial index names: they are module constants, never data.
assert all(s.isalpha() for s in UNFINISHED_JOB_STATES)
_UNFINISHED_SQL = (
    f"SELECT {_JOB_COLS} FROM walstate_job WHERE state IN ("
    + ", ".join(f"'{s}'" for s in UNFINISHED_JOB_STATES)
    + ") ORDER BY id"
)


class Reader:
    """Typed reads against one database."""

    def __init__(self, db: peewee.SqliteDatabase, path: str) -> None:
        self.db = db
        self.path = path

    def _rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        try:
            return list(self.db.connection().execute(sql, tuple(params)).fetchall())
        except (sqlite3.Error, peewee.PeeweeException) as exc:
            raise translate(exc, self.path, "reading") from exc

    def job(self, job_id: int) -> JobRow | None:
        rows = self._rows(f"SELECT {_JOB_COLS} FROM walstate_job WHERE id=?", (job_id,))
        return JobRow(*rows[0]) if rows else None  # type: ignore[arg-type]

    def jobs(self, *, state: str | None = None, workflow: str | None = None, limit: int | None = None) -> list[JobRow]:
        sql = f"SELECT {_JOB_COLS} FROM walstate_job WHERE (? IS NULL OR state=?) AND (? IS NULL OR workflow=?) ORDER BY id DESC LIMIT ?"
        rows = self._rows(sql, (state, state, workflow, workflow, -1 if limit is None else limit))
        return [JobRow(*r) for r in rows]  # type: ignore[arg-type]

    def steps(self, job_id: int) -> list[StepRow]:
        rows = self._rows(STEPS_OF_JOB, (job_id,))
        return [StepRow(*r) for r in rows]  # type: ignore[arg-type]

    def journal(self, job_id: int, step: str | None = None) -> list[JournalRow]:
        if step is None:
            rows = self._rows(f"SELECT {_JOURNAL_COLS} FROM walstate_journal WHERE job_id=? ORDER BY id", (job_id,))
        else:
            rows = self._rows(
                f"SELECT {_JOURNAL_COLS} FROM walstate_journal WHERE job_id=? AND step=? ORDER BY id", (job_id, step)
            )
        return [JournalRow(*r) for r in rows]  # type: ignore[arg-type]

    def unfinished_jobs(self) -> list[JobRow]:
        """Jobs not yet terminal; served by a partial index, so finished history costs nothing."""
        return [JobRow(*r) for r in self._rows(_UNFINISHED_SQL)]  # type: ignore[arg-type]

    def once(self, job_id: int, step: str, name: str) -> str | None:
        rows = self._rows("SELECT result FROM walstate_once WHERE job_id=? AND step=? AND name=?", (job_id, step, name))
        return str(rows[0][0]) if rows else None

    def cancel_requested(self, job_ids: Sequence[int]) -> set[int]:
        """Which of these jobs an operator asked to cancel (one read, for a heartbeat's poll)."""
        rows = self._rows("SELECT id FROM walstate_job WHERE cancel_requested=1 AND id IN "
                          "(SELECT value FROM json_each(?))", (json.dumps(list(job_ids)),))
        return {int(r[0]) for r in rows}  # type: ignore[call-overload]

    def database_id(self) -> str:
        return str(self._rows("SELECT value FROM walstate_meta WHERE key='database_id'")[0][0])
