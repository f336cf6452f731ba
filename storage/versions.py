"""Moving an in-flight job onto another version of its workflow: one fenced, journalled transaction.

A migration rewrites a job's version, definition fingerprint, context and
sub-step rows at once, so it is written here, beside the write path, with
the same discipline: ``BEGIN IMMEDIATE`` under the database's write lock,
decisions taken on the rows as read *inside* the transaction, and a
compare-and-set on the job's claim epoch (and version) that also bumps the
epoch. A run that claimed the job meanwhile makes the migration miss (it
returns ``None`` and writes nothing); a run that still believes it holds the
job after the migration is fenced off by the new epoch, like after any claim.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from .connection import WriteLocked
from .planning import plan_migration
from .types import FINISHED_FOR_REMOVAL, MigratedJob

_JOB = "SELECT state, epoch, version, context FROM walstate_job WHERE id=?"
_STEPS = "SELECT name, state, phase FROM walstate_step WHERE job_id=? ORDER BY position"
_MOVE_JOB = (
    "UPDATE walstate_job SET version=?, fingerprint=?, context=?, epoch=epoch+1, updated_at=? "
    "WHERE id=? AND epoch=? AND version=? AND state IN ('pending', 'running')"
)
_MOVE_STEP = "UPDATE walstate_step SET phase=?, position=?, updated_at=? WHERE job_id=? AND name=?"
_ADD_STEP = (
    "INSERT INTO walstate_step (job_id, name, phase, position, state, attempt, updated_at) "
    "VALUES (?, ?, ?, ?, 'pending', 0, ?)"
)
_DROP_STEP = "DELETE FROM walstate_step WHERE job_id=? AND name=?"
_JOURNAL = (
    "INSERT INTO walstate_journal (job_id, step, from_state, to_state, attempt, at, note) "
    "VALUES (?, NULL, ?, ?, 0, ?, ?)"
)




def migrate_job(
    db: WriteLocked,
    path: str,
    job_id: int,
    workflow: str,
    *,
    epoch: int,
    from_version: int,
    to_version: int,
    fingerprint: str,
    steps: Sequence[tuple[str, str, int]],
    drop: Collection[str],
    context: Callable[[str], str],
) -> MigratedJob | None:
    """Move unfinished job ``job_id`` from ``from_version`` onto ``to_version`` (``steps``: name, phase, rank).

    ``epoch`` is the claim epoch the caller read (with the job unowned or its
    owner dead); ``context`` maps the stored context text to the new one and
    raises to refuse. Returns ``None`` if the job moved on since (claimed,
    finished, or migrated by someone else): nothing was written. Raises
    :class:`MigrationRefused` (nothing written) when a step the new version
    removes is unfinished and not in ``drop``.
    """
    with db.write_lock:
        conn = db.raw()
        try:
            conn.execute(db.begin_write)
            try:
                done = _migrate(conn, path, job_id, workflow, epoch, from_version, to_version, fingerprint, steps,
                                drop, context)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except db.driver_errors as exc:
            raise db.translate(exc, path, f"migrating job {job_id} to version {to_version}") from exc
    return done


def _migrate(conn: Any, path: str, job_id: int, workflow: str, epoch: int, from_version: int,
             to_version: int, fingerprint: str, steps: Sequence[tuple[str, str, int]], drop: Collection[str],
             context: Callable[[str], str]) -> MigratedJob | None:
    job = conn.execute(_JOB, (job_id,)).fetchone()
    if job is None or job[0] not in ("pending", "running") or (job[1], job[2]) != (epoch, from_version):
        return None
    stored = [(str(r[0]), str(r[1]), str(r[2])) for r in conn.execute(_STEPS, (job_id,)).fetchall()]
    removed = plan_migration(path, job_id, workflow, from_version, to_version, steps, stored, drop)
    have = {name for name, _, _ in stored}
    new_context = context(str(job[3]))
    now = time.time()
    if conn.execute(_MOVE_JOB, (to_version, fingerprint, new_context, now, job_id, epoch, from_version)).rowcount != 1:
        return None  # unreachable under the write lock; kept as the compare-and-set it is
    added = []
    for name, phase, rank in steps:
        if name in have:
            conn.execute(_MOVE_STEP, (phase, rank, now, job_id, name))
        else:
            conn.execute(_ADD_STEP, (job_id, name, phase, rank, now))
            added.append(name)
    dropped = [n for n in removed if n in drop]
    for name in dropped:
        conn.execute(_DROP_STEP, (job_id, name))
    retired = [n for n in removed if n not in drop]
    for offset, name in enumerate(retired):
        # The phase is kept: it is where the step ran.
        conn.execute("UPDATE walstate_step SET position=? WHERE job_id=? AND name=?", (len(steps) + offset, job_id, name))
    result = MigratedJob(tuple(added), tuple(dropped), tuple(retired))
    conn.execute(_JOURNAL, (job_id, job[0], job[0], now, result.note(from_version, to_version)))
    return result


__all__ = ["FINISHED_FOR_REMOVAL", "MigratedJob", "migrate_job"]
