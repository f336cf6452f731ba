"""Retention: delete finished jobs, with their steps, journal and once() records, in short batches.

Each batch is its own ``BEGIN IMMEDIATE`` transaction that picks at most
``batch`` finished jobs (through the partial index ``job_finished_at``, so it
never scans the history) and deletes their rows, then commits and pauses for
as long as the batch held the lock, so the write lock is never held long and
writers (worker threads here, or other processes waiting in SQLite's busy
handler) always get their turn. Jobs are picked *inside* the transaction, so a
job that changed state since the previous batch is judged on its state now.

Only terminal states may be pruned: a pending or running job is never touched.
A job's time is ``updated_at``, which for a finished job is when it finished.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Any


from .connection import WriteLocked
from .errors import ConfigurationError
from .types import DEFAULT_BATCH, TERMINAL_JOB_STATES, check_states, cutoff

# The terminal states are written into the SQL as literals, the same ones the
# partial index job_finished_at names (SQLite uses a partial index only for a
# query whose WHERE repeats its condition literally); the states the caller
# asked for are bound as parameters on top of it.
assert all(s.isalpha() for s in TERMINAL_JOB_STATES)
_FINISHED = "state IN (" + ", ".join(f"'{s}'" for s in TERMINAL_JOB_STATES) + ")"
# `updated_at >= ?` resumes after the previous batch: jobs it passed over (in
# states not chosen) are not scanned again by every later batch.
_PICK = (
    f"SELECT id, updated_at FROM walstate_job WHERE {_FINISHED} AND updated_at < ? AND updated_at >= ? "
    "AND state IN (SELECT value FROM json_each(?)) ORDER BY updated_at LIMIT ?"
)
_COUNT = (
    f"SELECT count(*) FROM walstate_job WHERE {_FINISHED} AND updated_at < ? "
    "AND state IN (SELECT value FROM json_each(?))"
)
# Children first: the foreign keys would cascade, but saying it keeps the
# deletes visible (and counted) whatever the connection's foreign_keys setting.
_DELETES = (
    "DELETE FROM walstate_once WHERE job_id=?",
    "DELETE FROM walstate_journal WHERE job_id=?",
    "DELETE FROM walstate_step WHERE job_id=?",
    "DELETE FROM walstate_job WHERE id=?",
)





def prune(
    db: WriteLocked,
    path: str,
    older_than: float | timedelta,
    states: Iterable[str] = ("succeeded", "cancelled"),
    *,
    batch: int = DEFAULT_BATCH,
    dry_run: bool = False,
) -> int:
    """Delete jobs in ``states`` that finished more than ``older_than`` ago; return how many.

    With ``dry_run`` nothing is written: the return value is how many jobs
    would be deleted now. Raises :class:`ConfigurationError` for a state that
    is not terminal, a negative age or a batch < 1, and a
    :class:`DatabaseError` if SQLite fails (the batches already committed stay
    deleted; running it again continues).
    """
    chosen = check_states(states)
    if batch < 1:
        raise ConfigurationError(f"batch must be >= 1, not {batch}")
    before = cutoff(older_than)
    wanted = "[" + ", ".join(f'"{s}"' for s in chosen) + "]"  # JSON of checked names
    conn = db.raw()
    try:
        if dry_run:
            return int(conn.execute(_COUNT, (before, wanted)).fetchone()[0])
        total = 0
        since = -math.inf
        while True:
            started = time.monotonic()
            picked, since = _batch(db, conn, before, since, wanted, batch)
            total += picked
            if picked < batch:
                return total
            # Hand the write lock over: as long a pause as the batch held it, so
            # writers get at least half of the time and never wait for two
            # batches in a row.
            time.sleep(time.monotonic() - started)
    except db.driver_errors as exc:
        raise db.translate(exc, path, "pruning finished jobs") from exc


def _batch(db: WriteLocked, conn: Any, before: float, since: float, wanted: str, limit: int) -> tuple[int, float]:
    """Delete one batch in its own transaction: (jobs deleted, the newest finish time among them)."""
    conn.execute(db.begin_write)
    try:
        rows = conn.execute(_PICK, (before, since, wanted, limit)).fetchall()
        ids = [(row[0],) for row in rows]
        for sql in _DELETES:
            conn.executemany(sql, ids)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return len(ids), (float(rows[-1][1]) if rows else since)


__all__ = ["DEFAULT_BATCH", "check_states", "cutoff", "prune"]
