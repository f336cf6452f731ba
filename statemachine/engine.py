"""The Engine: one SQLite file, the workflows registered on it, and the API users call."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, overload

from pydantic import BaseModel

from .storage import Durability, JobRow, Store, TERMINAL_JOB_STATES, TERMINAL_STEP_STATES
from .storage.dedup import Deduper
from .storage.errors import (
    ConfigurationError,
    DefinitionError,
    JobFailed,
    JobOwned,
    KeyConflict,
    LeaseLost,
    StaleState,
    UnknownJob,
)

from . import log, ownership
from .runner import JobRun
from .substep import JobHandle, SubStep
from .context import validate_submission
from .workflow import C, Workflow


class JobId(int, Generic[C]):
    """A job id (an ``int``) that also tells type checkers the job's context model.

    :meth:`Engine.submit` returns one; :meth:`Engine.run` and
    :meth:`Engine.status` given one return a ``JobStatus[C]``. Any plain
    ``int`` is a job id too (its status's context is then typed ``Any``).
    """

    __slots__ = ()


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
class JobStatus(Generic[C]):
    """A job as stored. ``context`` is an instance of the workflow's model ``C`` when the workflow is registered
    on the engine (otherwise the stored JSON as a dict, and the status is a ``JobStatus[Any]``)."""

    id: int
    workflow: str
    key: str | None
    state: str
    context: C
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
    change is durable.
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
    ) -> None:
        if workers < 1:
            raise ConfigurationError(f"workers must be >= 1, not {workers}")
        self.store = Store(path, durability=durability, busy_timeout=busy_timeout, group_commit=group_commit)
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

    def register(self, flow: Workflow[C]) -> Workflow[C]:
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

    @overload
    def submit(self, workflow: Workflow[C], context: C | dict[str, Any], *, key: str | None = None) -> JobId[C]: ...

    @overload
    def submit(self, workflow: str, context: BaseModel | dict[str, Any], *, key: str | None = None) -> JobId[Any]: ...

    def submit(self, workflow: Workflow[Any] | str, context: BaseModel | dict[str, Any], *,
               key: str | None = None) -> JobId[Any]:
        """Create a job (all sub-steps ``pending``) and return its id.

        ``workflow`` is a registered :class:`Workflow` (then the id is typed
        ``JobId[C]``) or its name. ``context`` is an instance of the
        workflow's context model or a dict of its fields; anything else (an
        instance of another model class, a dict naming unknown or misspelled
        fields, values that do not validate) raises ContextInvalid and creates
        nothing. With a ``key`` already used for this workflow, return that
        job's id and create nothing; the same key with another context raises
        KeyConflict.
        """
        if isinstance(workflow, Workflow):
            self.register(workflow)  # a no-op when registered; a different flow of that name raises
            workflow = workflow.name
        flow = self._flow(workflow)
        model = validate_submission(flow.context, context, f"submit({workflow!r})")
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
        return JobId(job_id)

    def _row(self, job_id: int) -> JobRow:
        row = self.store.read.job(job_id)
        if row is None:
            raise UnknownJob(f"{self.path}: no job {job_id}")
        return row

    @overload
    def run(self, job_id: JobId[C]) -> JobStatus[C]: ...

    @overload
    def run(self, job_id: int) -> JobStatus[Any]: ...

    def run(self, job_id: int) -> JobStatus[Any]:
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
                log.job_left_alone(job_id, row.workflow, f"{row.owner} is running it")  # log
                raise JobOwned(f"{self.path}: job {job_id} is being run by {row.owner}; not taking it over")
            job = JobHandle(job_id, row.workflow, row.state, row.owner, self.store.write)
            claim = (self.owner, time.time() + self.lease)
            taken = f"{self.path}: job {job_id} was claimed by another process just now"
            if job.state == "pending":
                try:
                    job.fire("start", claim=claim)  # claim and start share one commit
                except (StaleState, LeaseLost) as exc:
                    raise JobOwned(taken) from exc
                log.job_claimed(job_id, row.workflow, None)  # log
                log.job_started(job_id, row.workflow)  # log
            elif row.owner != self.owner:
                if not self.store.write.claim(job_id, row.owner, *claim):
                    raise JobOwned(taken)
                log.job_claimed(job_id, row.workflow, row.owner)  # log: a takeover when row.owner is set
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
            if resumed:  # log
                log.job_resumed(job_id, row.workflow, sum(s.state in TERMINAL_STEP_STATES for s in steps.values()), len(steps))
            interruptions = self.store.read.interruptions(job_id) if resumed else {}
            run = JobRun(self.store, flow, job, steps, interruptions, row.context, self._workers(),
                         renew=lambda: self._renewals.run_once(job_id, lambda: self.store.write.renew(
                             job_id, self.owner, time.time() + self.lease)), workers=self.workers)
            run.execute()
            log.job_ended(job_id, row.workflow, job.state, None if job.state == "succeeded" else self._row(job_id).error)  # log
        return self._finished(self._row(job_id))

    def _finished(self, row: JobRow) -> JobStatus[Any]:
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
                log.job_left_alone(row.id, row.workflow, "its workflow is not registered on this engine")  # log
                continue
            if row.owner is not None and ownership.owner_alive(row.owner, row.id, row.lease_expires):
                log.job_left_alone(row.id, row.workflow, f"{row.owner} is running it")  # log
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

    @overload
    def status(self, job_id: JobId[C]) -> JobStatus[C]: ...

    @overload
    def status(self, job_id: int) -> JobStatus[Any]: ...

    def status(self, job_id: int) -> JobStatus[Any]:
        """The job as stored now: state, context, and every sub-step.

        Given the ``JobId[C]`` that :meth:`submit` returned, the status is typed
        ``JobStatus[C]``; for a plain ``int``, wrap it: ``JobId[Onboarding](42)``.
        """
        return self._status(self._row(job_id))

    def _status(self, row: JobRow) -> JobStatus[Any]:
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
