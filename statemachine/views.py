"""Read-only views of jobs for people and tools (the CLI), built from the database alone.

Nothing here needs the workflow definitions: phase order comes from the
steps' stored rank, times from the journal.
"""

from __future__ import annotations

import json
from typing import Any

from .storage import Store, TERMINAL_STEP_STATES
from .storage.errors import UnknownJob
from .storage.reads import JobRow, StepRow

_TERMINAL = frozenset(TERMINAL_STEP_STATES)


def _phases(steps: list[StepRow]) -> list[str]:
    order: list[str] = []
    for s in steps:  # rows come ordered by rank: phase order, then declaration order
        if s.phase not in order:
            order.append(s.phase)
    return order


def current_phase(steps: list[StepRow]) -> str | None:
    """The first phase with an unfinished step (or the last phase when all are done)."""
    for phase in _phases(steps):
        if any(s.state not in _TERMINAL for s in steps if s.phase == phase):
            return phase
    return steps[-1].phase if steps else None


def job_line(store: Store, row: JobRow) -> dict[str, Any]:
    steps = store.read.steps(row.id)
    return {
        "id": row.id, "workflow": row.workflow, "version": row.version, "key": row.key, "state": row.state,
        "phase": current_phase(steps), "done": sum(s.state in _TERMINAL for s in steps), "total": len(steps),
        "updated_at": row.updated_at,
    }


def job_detail(store: Store, job_id: int) -> dict[str, Any]:
    row = store.read.job(job_id)
    if row is None:
        raise UnknownJob(f"{store.path}: no job {job_id}")
    steps = store.read.steps(job_id)
    started: dict[str, float] = {}
    finished: dict[str, float] = {}
    for r in store.read.journal(job_id):
        if r.step is None:
            continue
        if r.to_state == "running":
            started.setdefault(r.step, r.at)
        if r.to_state in _TERMINAL:
            finished[r.step] = r.at
    phases = []
    for phase in _phases(steps):
        phases.append({"name": phase, "steps": [
            {"name": s.name, "state": s.state, "attempts": s.attempt, "error": s.error,
             "output": None if s.output is None else json.loads(s.output),
             "started_at": started.get(s.name), "finished_at": finished.get(s.name)}
            for s in steps if s.phase == phase]})
    return {**job_line(store, row), "fingerprint": row.fingerprint, "error": row.error, "owner": row.owner,
            "created_at": row.created_at,
            "context": json.loads(row.context), "phases": phases}


def history(store: Store, job_id: int, step: str | None = None) -> list[dict[str, Any]]:
    if store.read.job(job_id) is None:
        raise UnknownJob(f"{store.path}: no job {job_id}")
    if step is not None and step not in {s.name for s in store.read.steps(job_id)}:
        raise UnknownJob(f"{store.path}: job {job_id} has no step {step!r}")
    return [{"step": r.step, "from": r.from_state, "to": r.to_state, "attempt": r.attempt, "at": r.at,
             "note": r.note} for r in store.read.journal(job_id, step)]
