"""Read-only views of jobs for people and tools (the CLI), built from the database alone.

Nothing here needs the workflow definitions: phase order comes from the
steps' stored rank, times from the journal.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .ownership import describe_owner
from . import checks
from .storage.contract import Storage
from .storage.types import TERMINAL_JOB_STATES, TERMINAL_STEP_STATES, UNFINISHED_JOB_STATES
from .storage.errors import UnknownJob, UsageError
from .storage.types import JobRow, StepCount, StepRow

_TERMINAL = frozenset(TERMINAL_STEP_STATES)
#: The most jobs one page holds.
MAX_PAGE = 1_000_000_000
_DONE_WELL = frozenset(("succeeded", "skipped"))
JOB_STATES = UNFINISHED_JOB_STATES + TERMINAL_JOB_STATES
# The order a progress line names sub-step states in: outcomes first, then what is still to come.
_STEP_STATE_ORDER = ("succeeded", "failed", "cancelled", "skipped", "running", "retrying", "waiting", "pending")


@dataclass(frozen=True)
class JobSummary:
    """One job of a listing (:meth:`Engine.jobs`, ``walstate jobs``): its row and its sub-steps counted by state.

    ``steps`` maps a sub-step state to how many of the job's sub-steps are in
    it (states with none are left out), so a failed job reads as what
    happened to each step, e.g. ``{"succeeded": 3, "failed": 1,
    "cancelled": 4}``, never as "8/8 done". ``phase`` is where the job is
    or stopped: the first phase with a sub-step unfinished, failed or
    cancelled (the last phase when every sub-step succeeded or was skipped).
    """

    id: int
    workflow: str
    key: str | None
    state: str
    phase: str | None
    steps: dict[str, int]
    created_at: float
    updated_at: float
    error: str | None
    #: The workflow version the job runs on.
    version: int = 1

    @property
    def total(self) -> int:
        """How many sub-steps the job has."""
        return sum(self.steps.values())

    @property
    def progress(self) -> str:
        """The counts as words: ``"2/2 ok"``, ``"3/8 ok, 1 failed, 4 cancelled"``, ``"1/3 ok, 1 running"``."""
        parts = [f"{self.steps.get('succeeded', 0)}/{self.total} ok"]
        parts += [f"{self.steps[s]} {s}" for s in _STEP_STATE_ORDER[1:-1] if self.steps.get(s)]
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the fields, plus ``total`` and ``progress``."""
        return {"id": self.id, "workflow": self.workflow, "version": self.version, "key": self.key,
                "state": self.state, "phase": self.phase,
                "steps": dict(self.steps), "total": self.total, "progress": self.progress,
                "created_at": self.created_at, "updated_at": self.updated_at, "error": self.error}


class JobPage(list[JobSummary]):
    """One page of :meth:`Engine.jobs` (a list, newest job first) and where the next page starts.

    ``next_offset`` is the ``offset`` to pass for the next page, or ``None``
    when this page holds the last matching job.
    """

    def __init__(self, jobs: Iterable[JobSummary], offset: int, limit: int, next_offset: int | None) -> None:
        super().__init__(jobs)
        self.offset = offset
        self.limit = limit
        self.next_offset = next_offset

    @property
    def more(self) -> bool:
        """Whether more matching jobs follow this page."""
        return self.next_offset is not None


def _summary(row: JobRow, counts: Iterable[StepCount]) -> JobSummary:
    steps: dict[str, int] = {}
    phases: dict[str, int] = {}  # phase -> rank of its first step
    stopped: set[str] = set()  # phases with a step not done well: unfinished, failed or cancelled
    for c in counts:
        steps[c.state] = steps.get(c.state, 0) + c.count
        phases[c.phase] = min(phases.get(c.phase, c.rank), c.rank)
        if c.state not in _DONE_WELL:
            stopped.add(c.phase)
    order = sorted(phases, key=phases.__getitem__)
    phase = next((p for p in order if p in stopped), order[-1] if order else None)
    ordered = {s: steps[s] for s in _STEP_STATE_ORDER if s in steps}
    ordered.update((s, n) for s, n in steps.items() if s not in ordered)  # a state this version does not know
    return JobSummary(row.id, row.workflow, row.key, row.state, phase, ordered, row.created_at, row.updated_at,
                      row.error, row.version)


def job_page(store: Storage, *, state: str | None = None, workflow: str | None = None, limit: int = 50,
             offset: int = 0) -> JobPage:
    """A page of jobs, newest first, in two reads whatever its size: the jobs, then their steps counted."""
    if state is not None and state not in JOB_STATES:
        raise UsageError(f"no job state {state!r}: choose one of {', '.join(JOB_STATES)}")
    if workflow is not None:
        checks.text(workflow, "the workflow to list")
    # Bounded so that limit + 1 and the next page's offset stay 64-bit integers for the database.
    limit = checks.count(limit, "limit", maximum=MAX_PAGE)
    offset = checks.count(offset, "offset", minimum=0, maximum=checks.MAX_INT - MAX_PAGE - 1)
    # One row more than asked tells whether another page follows, in the same read.
    rows = store.jobs(state=state, workflow=workflow, limit=limit + 1, offset=offset)
    more = len(rows) > limit
    rows = rows[:limit]
    by_job: dict[int, list[StepCount]] = {r.id: [] for r in rows}
    if rows:
        for c in store.step_counts(list(by_job)):
            by_job[c.job_id].append(c)
    return JobPage([_summary(r, by_job[r.id]) for r in rows], offset, limit, offset + limit if more else None)


def summarize(row: JobRow, steps: list[StepRow]) -> JobSummary:
    """The summary of a job whose steps are already read (the same counts :func:`job_page` computes in SQL)."""
    counts: dict[tuple[str, str], StepCount] = {}
    for s in steps:
        c = counts.get((s.phase, s.state))
        counts[(s.phase, s.state)] = StepCount(row.id, s.phase, s.state, 1, s.position) if c is None else \
            StepCount(row.id, s.phase, s.state, c.count + 1, min(c.rank, s.position))
    return _summary(row, counts.values())


def _phases(steps: list[StepRow]) -> list[str]:
    order: list[str] = []
    for s in steps:  # rows come ordered by rank: phase order, then declaration order
        if s.phase not in order:
            order.append(s.phase)
    return order


#: How a schedule's job key ends: its slot, as :meth:`walstate.schedules.Schedule.key` writes it.
SLOT_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_SLOT_CHARS = len("2026-12-07T10:00:00Z")


def schedule_of_key(key: str | None) -> tuple[str, str] | None:
    """``(schedule name, slot)`` of a schedule's job, from its key ``schedule:NAME:SLOT``; ``None`` for other keys.

    The slot is UTC, as stored: ``"2026-12-07T10:00:00Z"``.
    """
    if key is None or not key.startswith("schedule:") or len(key) < len("schedule:") + 2 + _SLOT_CHARS:
        return None
    name, sep, slot = key[len("schedule:"):-_SLOT_CHARS - 1], key[-_SLOT_CHARS - 1], key[-_SLOT_CHARS:]
    try:
        datetime.datetime.strptime(slot, SLOT_FORMAT)
    except ValueError:
        return None
    return (name, slot) if sep == ":" and name else None


def readable_key(key: str | None) -> str:
    """A job's key as a person reads it: ``schedule NAME @ SLOT`` for a schedule's job, ``-`` for none."""
    slot = schedule_of_key(key)
    if slot is not None:
        return f"schedule {slot[0]} @ {slot[1]}"
    return "-" if key is None else key


def waits_for(step: StepRow) -> dict[str, Any] | None:
    """What a waiting step waits for: ``{"topic": ..., "wake_at": ...}`` (``None`` when it does not wait)."""
    if step.state != "waiting":
        return None
    wake = None if step.wake_at is None or step.wake_at == float("inf") else step.wake_at
    return {"topic": step.wait_topic, "wake_at": wake}


def job_detail(store: Storage, job_id: int) -> dict[str, Any]:
    job_id = checks.job_id(job_id, store.path)
    row = store.job(job_id)
    if row is None:
        raise UnknownJob(f"{store.path}: no job {job_id}")
    steps = store.steps(job_id)
    started: dict[str, float] = {}
    finished: dict[str, float] = {}
    for r in store.journal(job_id):
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
             "waits_for": waits_for(s),
             "output": None if s.output is None else json.loads(s.output),
             "started_at": started.get(s.name), "finished_at": finished.get(s.name)}
            for s in steps if s.phase == phase]})
    held_by = None
    if row.owner is not None:
        who = describe_owner(row.owner)
        held_by = {"host": who.host, "pid": who.pid, "lease_renewed_at": row.renewed_at,
                   "lease_expires": row.lease_expires, "lease_clock_now": store.lease_clock()}
    return {**summarize(row, steps).as_dict(), "fingerprint": row.fingerprint, "owner": row.owner,
            "held_by": held_by, "context": json.loads(row.context), "phases": phases}


def history(store: Storage, job_id: int, step: str | None = None) -> list[dict[str, Any]]:
    job_id = checks.job_id(job_id, store.path)
    if step is not None:
        checks.text(step, "the step whose history to show")
    if store.job(job_id) is None:
        raise UnknownJob(f"{store.path}: no job {job_id}")
    if step is not None and step not in {s.name for s in store.steps(job_id)}:
        raise UnknownJob(f"{store.path}: job {job_id} has no step {step!r}")
    return [{"step": r.step, "from": r.from_state, "to": r.to_state, "attempt": r.attempt, "at": r.at,
             "note": r.note} for r in store.journal(job_id, step)]
