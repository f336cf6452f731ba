"""The Engine: one SQLite file, the workflows registered on it, and the API users call."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from .storage import Durability, JobRow, Store, TERMINAL_JOB_STATES
from .storage.dedup import Deduper
from .storage.errors import (
    ConfigurationError,
    ContextInvalid,
    DefinitionError,
    JobFailed,
    JobOwned,
    KeyConflict,
    LeaseLost,
    StaleState,
    UnknownJob,
)

from . import ownership
from .runner import JobRun
from .substep import JobHandle, SubStep
from .workflow import Workflow


@dataclass(frozen=True)
class StepStatus:
    """A sub-step as stored: ``attempts`` counts every started attempt, interrupted ones included."""

    name: str
    state: str
    phase: str
    attempts: int
    output: Any
    error: str | None


@dataclass(frozen=True)
class JobStatus:
    """A job as stored. ``context`` is an instance of the workflow's model when it is registered."""

    id: int
    workflow: str
    key: str | None
    state: str
    context: Any
    steps: dict[str, StepStatus]
    error: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class TransitionRecord:
    """One journal row: ``step`` is ``None`` for a change of the job's own state."""

    step: str | None
    from_state: str
    to_state: str
    attempt: int
    at: float
    note: str | None


class Engine:
    """Runs registered workflows durably on the SQLite file at ``path``.

    ``durability="normal"`` survives process crashes; ``"full"`` also power
    loss (an fsync per commit). ``workers`` threads run a phase's sub-steps in
    parallel. ``lease`` is how long a claim on a job holds against processes
    that cannot check this one's liveness directly (another pid namespace).
    ``group_commit`` lets parallel sub-steps' changes share one commit (one
    fsync under ``"full"``); each trigger still returns only after its own
    change is durable. ``sync_interval`` (seconds, ``None`` for off) bounds
    what a power cut can take from ``"normal"``: the WAL is fsynced in the
    background at most that often while it has unsynced commits.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "normal",
        workers: int = 4,
        busy_timeout: float = 5.0,
        lease: float = 60.0,
        group_commit: bool = True,
        sync_interval: float | None = 0.1,
    ) -> None:
        if workers < 1:
            raise ConfigurationError(f"workers must be >= 1, not {workers}")
        # sync_interval: see Store (bounds what a power cut can take from durability="normal").
        self.store = Store(path, durability=durability, busy_timeout=busy_timeout, group_commit=group_commit,
                           sync_interval=sync_interval)
        self.path = self.store.path
        self.workers = workers
        self.lease = lease
        self.owner = ownership.new_token()
        self._flows: dict[str, Workflow[Any]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        # Lease renewal is the hot idempotent write here: every step start asks
        # for it, but it reaches SQLite at most once per job per lease/3.
        self._renewals = Deduper(max_entries=1024, ttl=max(lease / 3, 0.001))

    # -- definitions ------------------------------------------------------------

    def register(self, flow: Workflow[Any]) -> Workflow[Any]:
        """Make ``flow`` runnable here; validates its step order (raises DefinitionError)."""
        flow.validate()
        known = self._flows.get(flow.name)
        if known is not None and known is not flow:
            raise DefinitionError(f"a different workflow named {flow.name!r} is already registered on {self.path}")
        self._flows[flow.name] = flow
        return flow

    def _flow(self, name: str) -> Workflow[Any]:
        try:
            return self._flows[name]
        except KeyError:
            raise UnknownJob(
                f"workflow {name!r} is not registered on this engine ({self.path}); call engine.register(flow) first"
            ) from None

    # -- jobs -------------------------------------------------------------------

    def submit(self, workflow: str, context: BaseModel | dict[str, Any], *, key: str | None = None) -> int:
        """Create a job (all sub-steps ``pending``) and return its id.

        With a ``key`` already used for this workflow, return that job's id and
        create nothing; the same key with another context raises KeyConflict.
        """
        flow = self._flow(workflow)
        try:
            model = flow.context.model_validate(context.model_dump() if isinstance(context, BaseModel) else context)
        except ValidationError as exc:
            raise ContextInvalid(f"submit({workflow!r}): the context does not validate against "
                                 f"{flow.context.__name__}: {exc}") from exc
        text = model.model_dump_json()
        # position ranks steps by phase order, then declaration order, so readers
        # (the CLI) recover the phase order from the rows alone.
        ranked = sorted(flow.steps.values(), key=lambda s: (flow.phases.index(s.phase), s.position))
        steps = [(s.name, s.phase, rank) for rank, s in enumerate(ranked)]
        job_id, existing = self.store.write.create_job(workflow, key, text, steps)
        if existing is not None and json.loads(existing) != json.loads(text):
            raise KeyConflict(
                f"{self.path}: key {key!r} of workflow {workflow!r} already names job {job_id}, submitted with "
                f"another context ({existing}); use a new key or the same context"
            )
        return job_id

    def _row(self, job_id: int) -> JobRow:
        row = self.store.read.job(job_id)
        if row is None:
            raise UnknownJob(f"{self.path}: no job {job_id}")
        return row

    def run(self, job_id: int) -> JobStatus:
        """Run (or resume) job ``job_id`` to its end and return its status.

        Raises JobFailed if a sub-step failed for good, JobOwned if a live
        process is running it.
        """
        row = self._row(job_id)
        flow = self._flow(row.workflow)
        if row.state in TERMINAL_JOB_STATES:
            return self._finished(row)
        with ownership.LiveRun(self.owner, job_id):
            if row.owner != self.owner and ownership.owner_alive(row.owner, job_id, row.lease_expires):
                raise JobOwned(f"{self.path}: job {job_id} is being run by {row.owner}; not taking it over")
            job = JobHandle(job_id, row.workflow, row.state, row.owner, self.store.write)
            claim = (self.owner, time.time() + self.lease)
            taken = f"{self.path}: job {job_id} was claimed by another process just now"
            if job.state == "pending":
                try:
                    job.fire("start", claim=claim)  # claim and start share one commit
                except (StaleState, LeaseLost) as exc:
                    raise JobOwned(taken) from exc
            elif row.owner != self.owner:
                if not self.store.write.claim(job_id, row.owner, *claim):
                    raise JobOwned(taken)
                job.owner = self.owner
            # The claim just set the lease: the next renewal is due a period from now.
            self._renewals.forget(job_id)
            self._renewals.run_once(job_id, lambda: None)
            rows = self.store.read.steps(job_id)
            if {r.name for r in rows} != set(flow.steps):
                raise DefinitionError(
                    f"{self.path}: job {job_id} was created with steps {sorted(r.name for r in rows)} but workflow "
                    f"{flow.name!r} now declares {sorted(flow.steps)}; run it with the definition it was created with"
                )
            steps = {r.name: SubStep(job, r) for r in rows}
            resumed = any(s.attempt for s in steps.values())
            interruptions = self.store.read.interruptions(job_id) if resumed else {}
            run = JobRun(self.store, flow, job, steps, interruptions, row.context, self._workers(),
                         renew=lambda: self._renewals.run_once(job_id, lambda: self.store.write.renew(
                             job_id, self.owner, time.time() + self.lease)), workers=self.workers)
            run.execute()
        return self._finished(self._row(job_id))

    def _finished(self, row: JobRow) -> JobStatus:
        status = self._status(row)
        if row.state == "failed":
            errors = {n: s.error or "" for n, s in status.steps.items() if s.state == "failed"}
            raise JobFailed(f"{self.path}: job {row.id} ({row.workflow}) failed: {row.error}", job_id=row.id, errors=errors)
        return status

    def recover(self) -> list[int]:
        """Resume every unfinished job that no live process is running; return their ids.

        Jobs that end ``failed`` are resumed too (their ids are returned); use
        :meth:`status` to see how each ended.
        """
        resumed = []
        for row in self.store.read.unfinished_jobs():
            if row.workflow not in self._flows:
                continue
            if row.owner is not None and ownership.owner_alive(row.owner, row.id, row.lease_expires):
                continue
            try:
                self.run(row.id)
            except JobFailed:
                pass
            except JobOwned:
                continue
            resumed.append(row.id)
        return resumed

    # -- reading ----------------------------------------------------------------

    def status(self, job_id: int) -> JobStatus:
        """The job as stored now: state, context, and every sub-step."""
        return self._status(self._row(job_id))

    def _status(self, row: JobRow) -> JobStatus:
        flow = self._flows.get(row.workflow)
        context: Any = json.loads(row.context) if flow is None else flow.context.model_validate_json(row.context)
        steps = {
            s.name: StepStatus(s.name, s.state, s.phase, s.attempt, None if s.output is None else json.loads(s.output), s.error)
            for s in self.store.read.steps(row.id)
        }
        return JobStatus(row.id, row.workflow, row.key, row.state, context, steps, row.error, row.created_at, row.updated_at)

    def history(self, job_id: int, step: str | None = None) -> list[TransitionRecord]:
        """The job's transition journal in commit order (optionally of one sub-step)."""
        self._row(job_id)
        return [TransitionRecord(r.step, r.from_state, r.to_state, r.attempt, r.at, r.note)
                for r in self.store.read.journal(job_id, step)]

    # -- lifecycle --------------------------------------------------------------

    def _workers(self) -> ThreadPoolExecutor | None:
        if self.workers == 1:
            return None
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="walstate")
            return self._pool

    def close(self) -> None:
        """Stop the worker threads and close the database."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
