"""Small helpers shared by test modules (not fixtures)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from walstate.storage import Storage
from walstate.substep import LiveJob, SubStep
from walstate.testing import connect


def new_step(store: Storage, name: str = "s", owner: str | None = None) -> SubStep:
    """A fresh pending sub-step in a one-step job, loaded from the database."""
    job_id, _ = store.write.create_job("wf", None, "{}", [(name, "p", 0)])
    epoch = 0
    state = "pending"
    if owner is not None:
        claimed = store.write.claim(job_id, state="pending", epoch=0, owner=owner, lease_expires=0.0, note="test")
        assert claimed is not None
        epoch, state = claimed.epoch, "running"
    job = LiveJob(job_id, "wf", state, owner, store.write, epoch)
    return SubStep(job, store.read.steps(job_id)[0])


def query(target: str, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` (``?`` placeholders) read by a connection of its own, on either backend."""
    conn = connect(target)
    try:
        return [tuple(r) for r in conn.execute(sql, tuple(params)).fetchall()]
    finally:
        conn.close()


def stored_state(path: str, step_id: int) -> tuple[str, int]:
    """The sub-step's (state, attempt) as another connection sees it."""
    conn = connect(path)
    try:
        row = conn.execute("SELECT state, attempt FROM walstate_step WHERE id=?", (step_id,)).fetchone()
        return str(row[0]), int(row[1])
    finally:
        conn.close()


def journal_of(path: str, job_id: int) -> list[tuple[str | None, str, str, int]]:
    conn = connect(path)
    try:
        rows = conn.execute(
            "SELECT step, from_state, to_state, attempt FROM walstate_journal WHERE job_id=? ORDER BY id", (job_id,)
        ).fetchall()
        return [tuple(r) for r in rows]
    finally:
        conn.close()


def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds (no blind sleeps in tests)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)
