"""Operator actions on stored jobs: cancel, and retry after failure.

Each action is one batch through the write path: every move is checked
against the machines first (an illegal one is refused with a clear message
and nothing is written), journalled, and committed together with the release
of the job's owner, so a process still running the job is fenced off at its
next write.
"""

from __future__ import annotations

from .storage import Change, JobRow, StepRow, Store
from .storage.errors import UnknownJob

from .fsm import JOB, STEP


def _load(store: Store, job_id: int) -> tuple[JobRow, list[StepRow]]:
    row = store.read.job(job_id)
    if row is None:
        raise UnknownJob(f"{store.path}: no job {job_id}")
    return row, store.read.steps(job_id)


def cancel(store: Store, job_id: int, note: str = "cancelled by an operator") -> list[str]:
    """Cancel the job and its unfinished steps; return the names of the steps cancelled."""
    row, steps = _load(store, job_id)
    changes: list[Change] = []
    names = []
    for s in steps:
        if s.state in STEP.terminal:
            continue
        dest = STEP.destination(s.state, "cancel", f"sub-step {s.name!r} of job {job_id}")
        if dest is not None:
            changes.append(Change("step", s.id, job_id, s.name, s.state, dest, s.attempt, row.owner,
                                  output=s.output, error=s.error, note=note))
            names.append(s.name)
    dest = JOB.destination(row.state, "cancel", f"job {job_id}")
    if dest is not None:
        changes.append(Change("job", job_id, job_id, None, row.state, dest, 0, row.owner,
                              error=row.error, note=note, claim=(None, None)))
    if changes:
        store.write.commit(changes)
    return names


def retry(store: Store, job_id: int, step: str | None = None) -> list[str]:
    """Put a failed (or cancelled) job back to ``pending`` with its failed steps (or just ``step``) requeued.

    Cancelled steps are requeued as well, since the failure cancelled them.

    Returns the names of the steps requeued. The job then runs again under
    ``Engine.run``/``recover`` (or ``walstate recover``).
    """
    row, steps = _load(store, job_id)
    by_name = {s.name: s for s in steps}
    if step is not None and step not in by_name:
        raise UnknownJob(f"{store.path}: job {job_id} has no step {step!r}; steps are {', '.join(by_name)}")
    # Steps the failure cancelled before they could run are requeued too: without
    # them the job could never succeed.
    targets = [s for s in steps if s.state == "cancelled" or (s.state == "failed" if step is None else s.name == step)]
    if step is not None and by_name[step].state not in ("failed", "cancelled"):
        STEP.destination(by_name[step].state, "requeue", f"sub-step {step!r} of job {job_id}")
    changes: list[Change] = []
    for s in targets:
        dest = STEP.destination(s.state, "requeue", f"sub-step {s.name!r} of job {job_id}")
        if dest is not None:
            changes.append(Change("step", s.id, job_id, s.name, s.state, dest, s.attempt, row.owner,
                                  output=s.output, error=s.error, note="requeued by an operator"))
    dest = JOB.destination(row.state, "requeue", f"job {job_id}")
    if dest is not None:
        changes.append(Change("job", job_id, job_id, None, row.state, dest, 0, row.owner,
                              error=None, note="requeued by an operator", claim=(None, None)))
    if changes:
        store.write.commit(changes)
    return [c.step for c in changes if c.step is not None]
