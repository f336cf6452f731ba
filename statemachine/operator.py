"""Operator actions on stored jobs: cancel, and retry after failure, fenced like every run.

Only the run that holds a job's claim writes to it. So cancelling a job that
a live run holds does not write its rows behind the run's back: it asks
(``cancel_requested``, seen by the run at its next heartbeat, or at once in
this process) and waits for the run to cancel the job itself. A job that no
live run holds is changed directly, in one batch through the write path,
conditioned on the owner and claim epoch that were read and bumping the
epoch, so a run that was thought dead is fenced off at its next write.
Every move is checked against the machines first: an illegal one is refused
with a clear message and nothing is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from . import checks
from .fsm import JOB, STEP
from .ownership import owner_alive
from .storage.contract import Storage
from .storage.types import Change, JobRow, StepRow
from .storage.errors import InvalidTransition, JobOwned, UnknownJob

Clock = Callable[[], float]


def _load(store: Storage, job_id: int) -> tuple[JobRow, list[StepRow]]:
    row = store.job(checks.job_id(job_id, store.path))
    if row is None:
        raise UnknownJob(f"{store.path}: no job {job_id}")
    return row, store.steps(job_id)


def cancel(store: Storage, job_id: int, *, wait: float = 30.0, clock: Clock = time.time,
           note: str = "cancelled by an operator") -> list[str]:
    """Cancel the job and its unfinished steps; return the names of the steps cancelled.

    When a live run holds the job, ask it to cancel and wait up to ``wait``
    seconds for it to do so (its handlers in flight see ``step.cancelled``);
    raise :class:`JobOwned` if it has not stopped by then (the request stays:
    the run cancels the job when its handlers return).
    """
    deadline = time.monotonic() + wait
    row, steps = _load(store, job_id)
    if row.owner is not None and owner_alive(row.owner, job_id, row.lease_expires, clock()):
        if row.state in JOB.terminal:
            JOB.destination(row.state, "cancel", f"{store.path}: job {job_id}")
        before = {s.name for s in steps if s.state in STEP.terminal}
        store.request_cancel(job_id)
        while time.monotonic() < deadline:
            row, steps = _load(store, job_id)
            if row.state in JOB.terminal or row.owner is None:
                break
            time.sleep(0.01)
        else:
            raise JobOwned(
                f"{store.path}: job {job_id} is still being run by {row.owner}; cancellation was requested and "
                f"the run will cancel the job once its handlers in flight return (waited {wait:g}s)"
            )
        if row.state == "cancelled":
            return [s.name for s in steps if s.state == "cancelled" and s.name not in before]
        if row.state in JOB.terminal:
            JOB.destination(row.state, "cancel", f"{store.path}: job {job_id}")
    return _cancel_unheld(store, job_id, note)


def _cancel_unheld(store: Storage, job_id: int, note: str) -> list[str]:
    row, steps = _load(store, job_id)
    changes: list[Change] = []
    names = []
    for s in steps:
        if s.state in STEP.terminal:
            continue
        dest = STEP.destination(s.state, "cancel", f"{store.path}: sub-step {s.name!r} of job {job_id}")
        if dest is not None:
            changes.append(Change("step", s.id, job_id, s.name, s.state, dest, s.attempt, row.owner, row.epoch,
                                  output=s.output, error=s.error, note=note, failures=s.failures,
                                  interruptions=s.interruptions))
            names.append(s.name)
    dest = JOB.destination(row.state, "cancel", f"{store.path}: job {job_id}")
    if dest is not None:
        changes.append(Change("job", job_id, job_id, None, row.state, dest, 0, row.owner, row.epoch,
                              error=row.error, note=note, release=True))
    if changes:
        store.commit(changes)
    return names


def retry(store: Storage, job_id: int, step: str | None = None) -> list[str]:
    """Put a failed (or cancelled) job back to ``pending`` with its failed steps (or just ``step``) requeued.

    Requeued steps get a fresh ``max_attempts`` budget. Cancelled steps are
    requeued as well, since the failure cancelled them. Retrying one step
    while another step of the job has failed too is refused, naming them
    (the job could not succeed): retry the job, or each of them.

    Returns the names of the steps requeued. The job then runs again under a
    worker, ``Engine.run``/``recover`` (or ``walstate recover``).
    """
    if step is not None:
        checks.text(step, f"{store.path}: job {job_id}: the step to retry")
    row, steps = _load(store, job_id)
    by_name = {s.name: s for s in steps}
    if step is not None and step not in by_name:
        raise UnknownJob(f"{store.path}: job {job_id} has no step {step!r}; steps are {', '.join(by_name)}")
    if row.state not in ("failed", "cancelled"):
        JOB.destination(row.state, "requeue", f"{store.path}: job {job_id}")  # raises: only an ended, unsuccessful job
    if step is not None:
        if by_name[step].state not in ("failed", "cancelled"):
            STEP.destination(by_name[step].state, "requeue", f"{store.path}: sub-step {step!r} of job {job_id}")
        others = [s.name for s in steps if s.state == "failed" and s.name != step]
        if others:
            raise InvalidTransition(
                f"{store.path}: job {job_id}: steps {others} failed too, so retrying only {step!r} could not make "
                f"the job succeed; retry the whole job (no step), or each failed step",
                state=row.state, trigger="requeue")
    # Steps the failure cancelled before they could run are requeued too: without
    # them the job could never succeed.
    targets = [s for s in steps if s.state == "cancelled" or (s.state == "failed" if step is None else s.name == step)]
    changes: list[Change] = []
    for s in targets:
        dest = STEP.destination(s.state, "requeue", f"{store.path}: sub-step {s.name!r} of job {job_id}")
        if dest is not None:
            # failures=0, interruptions=0: a fresh retry budget.
            changes.append(Change("step", s.id, job_id, s.name, s.state, dest, s.attempt, row.owner, row.epoch,
                                  output=s.output, error=s.error, note="requeued by an operator"))
    dest = JOB.destination(row.state, "requeue", f"{store.path}: job {job_id}")
    if dest is not None:
        changes.append(Change("job", job_id, job_id, None, row.state, dest, 0, row.owner, row.epoch,
                              error=None, note="requeued by an operator", release=True))
    if changes:
        store.commit(changes)
    return [c.step for c in changes if c.step is not None]
