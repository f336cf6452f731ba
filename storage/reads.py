"""Read-only queries over walstate's tables.

Rows come back as small frozen dataclasses so ``statemachine/`` never sees
SQL. Nothing here writes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .connection import WriteLocked
from .types import UNFINISHED_JOB_STATES, JobRow, JournalRow, StepCount, StepRow




#: The rows of the ``(workflow, version)`` pairs given as a JSON list of ``"name@version"`` (two
#: parameters, the same list; an empty list: any version). The version is an integer, so the last
#: ``@`` separates it even in a name holding ``@``.
_OF_VERSIONS = ("AND (NOT EXISTS (SELECT 1 FROM json_each(?)) "
                "OR workflow || '@' || CAST(version AS TEXT) IN (SELECT value FROM json_each(?)))")


def version_pairs(versions: Sequence[tuple[str, int]]) -> str:
    """The JSON parameter of :data:`_OF_VERSIONS` (and of the claim's same filter) for these pairs."""
    return json.dumps(sorted(f"{name}@{int(version)}" for name, version in versions))


_JOB_COLS = ("id, workflow, key, state, context, error, owner, lease_expires, created_at, updated_at, epoch, "
             "cancel_requested, wake_at, version, fingerprint, renewed_at")
_STEP_COLS = ("id, job_id, name, phase, position, state, attempt, output, error, updated_at, failures, interruptions, "
              "wake_at, wait_topic")
_JOURNAL_COLS = "id, job_id, step, from_state, to_state, attempt, at, note"
STEPS_OF_JOB = f"SELECT {_STEP_COLS} FROM walstate_step WHERE job_id=? ORDER BY position"
STEPS_OF_JOBS = (f"SELECT {_STEP_COLS} FROM walstate_step WHERE job_id IN (SELECT CAST(value AS INTEGER) FROM json_each(?)) "
                 "ORDER BY job_id, position")
# min(position) per phase gives the phases' order without reading the steps themselves.
STEP_COUNTS_OF_JOBS = ("SELECT job_id, phase, state, count(*), min(position) FROM walstate_step "
                       "WHERE job_id IN (SELECT CAST(value AS INTEGER) FROM json_each(?)) GROUP BY job_id, phase, state")
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

    def __init__(self, db: WriteLocked, path: str) -> None:
        self.db = db
        self.path = path

    def _rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        try:
            return list(self.db.raw().execute(sql, tuple(params)).fetchall())
        except self.db.driver_errors as exc:
            raise self.db.translate(exc, self.path, "reading") from exc

    def job(self, job_id: int) -> JobRow | None:
        rows = self._rows(f"SELECT {_JOB_COLS} FROM walstate_job WHERE id=?", (job_id,))
        return JobRow(*rows[0]) if rows else None  # type: ignore[arg-type]

    def jobs(self, *, state: str | None = None, workflow: str | None = None, limit: int | None = None,
             offset: int = 0) -> list[JobRow]:
        """Jobs newest first (by id), optionally of one state and one workflow, ``limit`` of them after ``offset``."""
        where: list[str] = []
        params: list[object] = []
        for column, value in (("state", state), ("workflow", workflow)):
            if value is not None:
                where.append(f"{column}=?")
                params.append(value)
        sql = f"SELECT {_JOB_COLS} FROM walstate_job"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        if offset:
            # SQLite has no OFFSET without LIMIT: LIMIT -1 is its "no limit".
            sql += (" LIMIT -1" if limit is None and self.db.dialect == "sqlite" else "") + " OFFSET ?"
            params.append(offset)
        rows = self._rows(sql, params)
        return [JobRow(*r) for r in rows]  # type: ignore[arg-type]

    def step_counts(self, job_ids: Sequence[int]) -> list[StepCount]:
        """How many sub-steps of these jobs are in each state, per phase: one aggregate read for a whole page."""
        rows: list[Any] = self._rows(STEP_COUNTS_OF_JOBS, (json.dumps(list(job_ids)),))
        return [StepCount(int(r[0]), str(r[1]), str(r[2]), int(r[3]), int(r[4])) for r in rows]

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
                          "(SELECT CAST(value AS INTEGER) FROM json_each(?))", (json.dumps(list(job_ids)),))
        return {int(r[0]) for r in rows}  # type: ignore[call-overload]

    def owned_unfinished(self) -> list[tuple[int, int, str, str, float | None]]:
        """``(id, epoch, workflow, owner, lease_expires)`` of unfinished jobs that have an owner (liveness checks)."""
        # INDEXED BY: with no statistics SQLite would pick the wider index of all unfinished jobs.
        rows: list[Any] = self._rows("SELECT id, epoch, workflow, owner, lease_expires FROM walstate_job "
                                     "INDEXED BY job_owned_unfinished WHERE state IN "
                                     "('pending', 'running') AND owner IS NOT NULL")
        return [(int(r[0]), int(r[1]), str(r[2]), str(r[3]), None if r[4] is None else float(r[4])) for r in rows]

    def runnable_exists(self, workflows: Sequence[str], now: float, skip: Sequence[int] = (),
                        versions: Sequence[tuple[str, int]] = ()) -> bool:
        """Whether an unowned unfinished job is due: a cheap read before a claim takes the write lock.

        ``versions``: of these ``(workflow, version)`` pairs only (empty: any version).
        """
        pairs = version_pairs(versions)
        rows = self._rows("SELECT 1 FROM walstate_job WHERE state IN ('pending', 'running') AND owner IS NULL AND "
                          "(wake_at IS NULL OR wake_at <= ?) AND workflow IN (SELECT value FROM json_each(?)) "
                          "AND id NOT IN (SELECT CAST(value AS INTEGER) FROM json_each(?)) " + _OF_VERSIONS + " LIMIT 1",
                          (now, json.dumps(list(workflows)), json.dumps(list(skip)), pairs, pairs))
        return bool(rows)

    def next_wake(self, workflows: Sequence[str], versions: Sequence[tuple[str, int]] = ()) -> float | None:
        """The earliest wake-up time of a parked job of ``workflows`` (None: none parked); ``versions`` as above."""
        # In wake-up order through the parked jobs' own index: the first of ours ends the walk.
        pairs = version_pairs(versions)
        rows: list[Any] = self._rows(
            "SELECT wake_at FROM walstate_job INDEXED BY job_parked_wake_at WHERE state IN ('pending', 'running') "
            "AND owner IS NULL AND wake_at IS NOT NULL AND workflow IN (SELECT value FROM json_each(?)) "
            + _OF_VERSIONS + " ORDER BY wake_at LIMIT 1", (json.dumps(list(workflows)), pairs, pairs))
        return float(rows[0][0]) if rows else None

    def message_topics(self, job_id: int) -> set[str]:
        """Topics with a message sent to the job and not yet consumed."""
        rows: list[Any] = self._rows("SELECT DISTINCT topic FROM walstate_message WHERE job_id=? AND consumed_by IS NULL",
                                     (job_id,))
        return {str(r[0]) for r in rows}

    def schedule_slot(self, name: str) -> float | None:
        """The latest slot of schedule ``name`` that got its job or was passed over (None: none yet)."""
        rows: list[Any] = self._rows("SELECT last_slot FROM walstate_schedule WHERE name=?", (name,))
        return float(rows[0][0]) if rows else None

    def data_version(self) -> int:
        """SQLite's ``PRAGMA data_version``: changes whenever another connection commits to the file."""
        value: Any = self._rows("PRAGMA data_version")[0][0]
        return int(value)

    def database_id(self) -> str:
        return str(self._rows("SELECT value FROM walstate_meta WHERE key='database_id'")[0][0])
