"""The Engine: one SQLite file, the workflows registered on it, and the API users call."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import MappingProxyType
from typing import Any, Generic, cast, overload

from pydantic import BaseModel, ValidationError

from . import checks, log, operator, ownership, views
from .context import dump_context, message_json, validate_submission
from .ownership import Clock
from .runner import JobRun, describe
from .storage.contract import Storage, open_store
from .storage.types import (DEFAULT_BATCH, DEFAULT_FILE_MODE, DEFAULT_HOLD_WARNING, DEFAULT_PATIENCE,
                            TERMINAL_JOB_STATES, TERMINAL_STEP_STATES, Claimed, Durability, JobRow, MigratedJob,
                            StepRow)
from .storage.errors import (
    ConfigurationError,
    ContextInvalid,
    DatabaseError,
    DefinitionError,
    EngineClosed,
    JobCancelled,
    JobFailed,
    JobOwned,
    KeyConflict,
    LeaseLost,
    MigrationRefused,
    UnknownJob,
    UsageError,
    VersionNotRegistered,
    WalstateError,
)
from .aio import EngineAsyncAPI
from .runtime import JobHandle, Worker
from .schedules import DEFAULT_GRACE, Missed, Schedule
from .substep import LiveJob, SubStep
from .threads import ThreadCache
from .versions import Plan, Registry
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
class OwnerStatus:
    """Who holds an unfinished job's claim: the host and pid its owner token names, and its lease.

    ``renewed_at`` (when the claim was last taken or renewed) and
    ``lease_expires`` are on the store's lease clock, which keeps close to
    Unix time. An owner whose lease has been expired for
    ``walstate.ownership.HUNG_GRACE`` seconds is judged hung and loses the job.
    """

    token: str
    host: str | None
    pid: int | None
    renewed_at: float | None
    lease_expires: float | None


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
    #: The version of the workflow the job runs on (see :class:`Workflow`).
    version: int = 1
    #: Who holds the job's claim now (None: nobody).
    owner: OwnerStatus | None = None


@dataclass(frozen=True)
class TransitionRecord:
    """One journal row: ``step`` is ``None`` for a change of the job's own state."""

    step: str | None
    from_state: str
    to_state: str
    attempt: int
    at: float
    note: str | None


class RecoveryReport(list[int]):
    """The ids of the jobs :meth:`Engine.recover` resumed (a list), plus what it skipped and why.

    ``skipped`` maps a job id to the reason it was left alone and unclaimed
    (its workflow version is not registered here, its definition changed,
    its stored context no longer validates, its migration was refused, ...). Jobs a live run holds are not listed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.skipped: dict[int, str] = {}


class MigrationReport(list[int]):
    """The ids of the jobs :meth:`Engine.migrate_jobs` moved onto a newer version (a list).

    ``notes`` maps each to what its migration did (the note it journalled);
    ``skipped`` maps a job id to why it was not migrated (a live run holds
    it, or its migration was refused: nothing of it changed).
    """

    def __init__(self) -> None:
        super().__init__()
        self.notes: dict[int, str] = {}
        self.skipped: dict[int, str] = {}


class _Active:
    """A run of one job in this engine: later ``run()`` calls of the job wait for it."""

    __slots__ = ("done", "run", "thread", "stop")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.run: JobRun | None = None
        self.thread = threading.get_ident()
        #: Set when the run must stop after its steps in flight (worker shutdown).
        self.stop = False

    def halt(self) -> None:
        self.stop = True
        if self.run is not None:
            self.run.signal("close")


class Engine(EngineAsyncAPI):
    """Runs registered workflows durably in the database at ``path``.

    ``path`` is a SQLite file (WAL mode), or a ``postgresql://user@host/db``
    URL for a PostgreSQL database that workers on several hosts share (needs
    ``pip install 'walstate[postgres]'``). The API and the guarantees are the
    same; see the README's "PostgreSQL" section for what differs. ``memory://NAME``
    is an in-memory database for unit tests (not durable; no SQL for
    transactional steps): the README's "Storage backends".

    ``durability="normal"`` survives process crashes; ``"full"`` also power
    loss (an fsync per commit). ``workers`` threads run a phase's sub-steps in
    parallel, per run. ``lease`` is how long a claim on a job holds against
    processes that cannot check this one's liveness directly (another host,
    container or pid namespace); a heartbeat renews it every ``lease / 3``
    while a run lives, however long its handlers take. ``clock`` (wall-clock
    seconds) is what wake-ups (``step.sleep``) and schedules are measured
    with; tests inject one. On PostgreSQL it is corrected to the server's
    clock (an injected clock once, at start, unless it is over an hour off:
    then it is a test's simulated time and is used as it is). Leases are
    never measured with it but with the store's lease clock
    (:attr:`lease_clock`: CLOCK_BOOTTIME on SQLite, the server's clock followed
    on the monotonic clock on PostgreSQL), so no step of one engine's clock
    makes another's live lease look expired.
    ``group_commit`` lets parallel sub-steps' changes share one commit (one
    fsync under ``"full"``); each trigger still returns only after its own
    change is durable. ``sync_interval`` (seconds, ``None`` for off) bounds
    what a power cut can take from ``"normal"``: the WAL is fsynced in the
    background at most that often while it has unsynced commits.
    ``file_mode`` is the permission bits of a SQLite file the engine creates:
    owner only (0o600) by default, since contexts, outputs and messages are
    in it (SQLite gives ``-wal`` and ``-shm`` the same); ``None`` leaves it to
    the umask. An existing file keeps its mode.

    Every operation that touches the database has an awaitable form for
    asyncio apps, named with ``_async`` (``await engine.send_async(...)``,
    ``status_async``, ``submit_async``...): see :class:`walstate.aio.EngineAsyncAPI`.

    Transient refusals (a busy or locked database, a serialization failure,
    a lost PostgreSQL session) are the library's to retry. A run's own
    writes (its sub-steps' moves, ``once()`` records, waits) keep trying for
    as long as the run holds its claim, each attempt fenced by it; a
    handler that returned is not called again for it. Other writes
    (``submit``, ``send``, ``cancel``'s request, ``run``'s claim) keep trying
    for ``patience`` seconds, then raise :class:`DatabaseBusy`.
    ``hold_warning`` (seconds, ``None`` for never): a transactional step
    that holds SQLite's only writer for longer is named in a WARNING on
    ``walstate.storage``.
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
        clock: Clock = time.time,
        sync_interval: float | None = 0.1,
        file_mode: int | None = DEFAULT_FILE_MODE,
        patience: float = DEFAULT_PATIENCE,
        hold_warning: float | None = DEFAULT_HOLD_WARNING,
    ) -> None:
        # Typed errors here, not a ValueError from the driver or an OverflowError from a later wait.
        checks.count(workers, "workers", maximum=10_000, error=ConfigurationError)
        checks.seconds(lease, "lease", error=ConfigurationError)
        checks.seconds(busy_timeout, "busy_timeout", zero=True, error=ConfigurationError)
        if sync_interval is not None:
            checks.seconds(sync_interval, "sync_interval (or None)", error=ConfigurationError)
        if not 0 <= patience < math.inf:
            raise ConfigurationError(f"patience must be a number of seconds >= 0, not {patience}")
        if hold_warning is not None and not 0 <= hold_warning < math.inf:
            raise ConfigurationError(f"hold_warning must be a number of seconds >= 0 (or None), not {hold_warning}")
        # sync_interval: see Store (bounds what a power cut can take from durability="normal").
        self.store: Storage = open_store(path, durability=durability, busy_timeout=busy_timeout,
                                         group_commit=group_commit, sync_interval=sync_interval,
                                         file_mode=file_mode)
        self.path = self.store.path
        # A fenced write waits until its claim is lost or the engine closes. A process stopped inside a
        # transaction must not keep its locks past the time its jobs are taken from it: PostgreSQL ends
        # such a session then (see ownership.HUNG_GRACE).
        self.store.configure(patience=patience, hold_warning=hold_warning, idle_limit=lease + ownership.HUNG_GRACE)
        self.workers = workers
        self.lease = lease
        self.clock = clock = self.store.synced(clock)
        self._nonce = ownership.new_nonce()
        # Every registered version of every workflow; _flows is its name -> newest version view.
        self._registry = Registry()
        self._flows: dict[str, Workflow[Any]] = self._registry.newest
        self._threads = ThreadCache()
        #: Leases are set and judged on the store's lease clock, never on ``clock``: a step of this
        #: engine's clock must not make other engines' leases look expired (see ownership.HUNG_GRACE).
        self.lease_clock = self.store.lease_clock
        self._heartbeat = ownership.Heartbeat(lease, self.store.renew, self.lease_clock,
                                              self.store.cancel_requested)
        self._active: dict[int, _Active] = {}
        self._active_lock = threading.Lock()
        self._closing = False
        self._worker: Worker | None = None
        self._worker_lock = threading.Lock()
        self._schedules: dict[str, Schedule] = {}
        # Notified whenever a run of this engine ends (JobHandle.result waits on it).
        self._ends = threading.Condition()
        _engines.add(self)

    @property
    def owner(self) -> str:
        """The owner token this engine claims jobs under (a forked child gets its own)."""
        return ownership.identity().token(self._nonce)

    def _after_fork_in_child(self) -> None:
        # The parent's runs are not ours to wait for or to write under.
        self._active = {}
        self._active_lock = threading.Lock()
        self._threads = ThreadCache()
        # The parent's worker thread did not survive the fork.
        self._worker = None
        self._worker_lock = threading.Lock()
        self._ends = threading.Condition()

    # -- definitions ------------------------------------------------------------

    def register(self, flow: Workflow[C]) -> Workflow[C]:
        """Make ``flow`` runnable here; validates its step order (raises DefinitionError).

        Several versions of one workflow may be registered side by side: jobs
        run on the version they were submitted with. Registering the same
        object again is a no-op; another object with the same name and
        version raises DefinitionError.
        """
        self._registry.register(flow, self.path)
        return flow

    def _flow(self, name: str, version: int | None = None) -> Workflow[Any]:
        """The registered ``version`` of workflow ``name`` (its newest by default), or UnknownJob."""
        return self._registry.pick(name, version, self.path)

    # -- jobs -------------------------------------------------------------------

    @overload
    def submit(self, workflow: Workflow[C], context: C | dict[str, Any], *, key: str | None = None,
               version: int | None = None) -> JobId[C]: ...

    @overload
    def submit(self, workflow: str, context: BaseModel | dict[str, Any], *, key: str | None = None,
               version: int | None = None) -> JobId[Any]: ...

    def submit(self, workflow: Workflow[Any] | str, context: BaseModel | dict[str, Any], *,
               key: str | None = None, version: int | None = None) -> JobId[Any]:
        """Create a job (all sub-steps ``pending``) and return its id.

        ``workflow`` is a registered :class:`Workflow` (then the id is typed
        ``JobId[C]``, and the job is made for that object's version) or its
        name (then for ``version``, by default the newest registered one).
        The job records its version and definition fingerprint, and always
        runs on that definition. ``context`` is an instance of the
        workflow's context model or a dict of its fields; anything else (an
        instance of another model class, a dict naming unknown or misspelled
        fields, values that do not validate) raises ContextInvalid and creates
        nothing. With a ``key`` already used for this workflow, return that
        job's id and create nothing; the same key with another context raises
        KeyConflict.
        """
        if isinstance(workflow, Workflow):
            if version is not None and version != workflow.version:
                raise UsageError(f"submit(): the Workflow passed is version {workflow.version}, not version={version}; "
                                 "pass its name with version=, or the Workflow object alone")
            self.register(workflow)  # a no-op when registered; another object of that name and version raises
            version = workflow.version
            workflow = workflow.name
        if key is not None:
            checks.text(key, f"{self.path}: submit({workflow!r}): the job key")
        flow = self._flow(workflow, version)
        model = validate_submission(flow.context, context, f"submit({workflow!r})")
        text = dump_context(flow.context, model, f"submit({workflow!r})")  # also refuses NaN and infinities
        # position ranks steps by phase order, then declaration order, so readers
        # (the CLI) recover the phase order from the rows alone.
        steps = flow.ranked_steps()
        job_id, existing = self.store.create_job(workflow, key, text, steps, flow.version, flow.fingerprint)
        if existing is not None and json.loads(existing) != json.loads(text):
            raise KeyConflict(
                f"{self.path}: key {key!r} of workflow {workflow!r} already names job {job_id}, submitted with "
                f"another context ({existing}); use a new key or the same context"
            )
        worker = self._worker
        if worker is not None and existing is None:
            worker.wake()  # an idle worker of this process starts it now, not at its next poll
        return JobId(job_id)

    def _row(self, job_id: int) -> JobRow:
        row = self.store.job(checks.job_id(job_id, self.path))
        if row is None:
            raise UnknownJob(f"{self.path}: no job {job_id}")
        return row

    @overload
    def run(self, job_id: JobId[C]) -> JobStatus[C]: ...

    @overload
    def run(self, job_id: int) -> JobStatus[Any]: ...

    def run(self, job_id: int) -> JobStatus[Any]:
        """Run (or resume) job ``job_id`` to its end and return its status.

        If its steps wait (``step.sleep``, ``step.wait_for``) before the end,
        it returns when the job *parks* (state ``running``, those sub-steps
        ``waiting``): a worker, or a later ``run``/``recover`` once it is due,
        resumes it. ``JobHandle.result`` waits for the end instead.

        Every run starts with one claim of the job that bumps its claim epoch;
        all its writes are fenced by it. If this engine is already running the
        job (another thread called ``run``), this call starts no second
        execution: it waits for that run and returns its outcome.

        Raises :class:`JobFailed` or :class:`JobCancelled` when the job ended
        so, :class:`JobOwned` if a live run elsewhere holds it,
        :class:`LeaseLost` if this run lost its claim to another,
        :class:`EngineClosed` if the engine was closed during the run (the
        job is released for another run), and, before claiming anything,
        :class:`DefinitionError` (:class:`VersionNotRegistered` among them),
        :class:`ContextInvalid` or :class:`MigrationRefused` when the job
        cannot run on this engine's definitions.
        """
        job_id = checks.job_id(job_id, self.path)
        if self.store.transaction_active():
            raise UsageError(
                f"{self.path}: run({job_id}) inside an open transaction (a transactional step, or db.atomic()) "
                "would wait for that very transaction; submit() the job there and run it after the step, or make "
                "the step non-transactional"
            )
        while True:
            if self._closing:
                raise EngineClosed(f"{self.path}: the engine is closed; it starts no new run of job {job_id}")
            with self._active_lock:
                active = self._active.get(job_id)
                mine = active is None
                if active is None:
                    active = self._active[job_id] = _Active()
            if mine:
                try:
                    return self._run_claimed(job_id, active)
                finally:
                    self._ended(job_id, active)
            if active.thread == threading.get_ident():
                raise UsageError(f"{self.path}: run({job_id}) from inside that job's own run would wait forever")
            active.done.wait()
            row = self._row(job_id)
            if row.state in TERMINAL_JOB_STATES:
                return self._finished(row)
            # The live run stopped without finishing (closed, or lost its
            # claim): try again, which claims it if nobody else holds it.

    def _ended(self, job_id: int, active: _Active) -> None:
        with self._active_lock:
            if self._active.get(job_id) is active:
                del self._active[job_id]
        active.done.set()
        with self._ends:
            self._ends.notify_all()
        worker = self._worker
        if worker is not None:
            worker._done(job_id)

    def _wait_for_an_end(self, timeout: float) -> None:
        with self._ends:
            self._ends.wait(timeout)

    # -- versions: which definition a stored job runs on (see versions.py) ---------

    def _plan(self, row: JobRow) -> Plan:
        """The job's own registered definition (or a declared migration onto a newer one); raises why not.

        Raises VersionNotRegistered, DefinitionError (fingerprint mismatch) or
        ContextInvalid; reads nothing but, for jobs stored before versions
        existed, their step names.
        """
        return self._registry.resolve(row, lambda: self.store.steps(row.id), self.path)

    def _runnable(self, row: JobRow) -> str | None:
        """Why this engine must leave job ``row`` alone (``"TypeName: message"``), or None if it can run it.

        Writes nothing and never raises for the job's sake: recovery and
        workers call it before claiming. None includes a job of an
        unregistered version that a registered version declares a migration
        from: running it migrates it first.
        """
        try:
            self._plan(row)
        except (DefinitionError, ContextInvalid) as exc:  # VersionNotRegistered is a DefinitionError
            return f"{type(exc).__name__}: {exc}"
        return None

    def _prepare(self, row: JobRow) -> tuple[JobRow, Workflow[Any]]:
        """Before any claim: the job's definition, the job migrated onto it first when that is the plan.

        Returns the job as stored now (a migration bumps its epoch) and the
        definition to run it on; raises what :meth:`_plan` raises, JobOwned
        when a migration is due but a live run holds the job, or
        MigrationRefused (nothing changed).
        """
        while True:
            plan = self._plan(row)
            if plan.migration is None:
                return row, plan.flow
            self._migrate(row, plan)
            # Migrated here, or moved on meanwhile (claimed, migrated elsewhere): judge it again as stored now.
            row = self._row(row.id)

    def _migrate(self, row: JobRow, plan: Plan) -> MigratedJob | None:
        """Apply ``plan``'s migration to the unowned (or dead-owned) job ``row``; None if it moved on first."""
        migration, target = plan.migration, plan.flow
        assert migration is not None
        if row.owner is not None and ownership.owner_alive(row.owner, row.id, row.lease_expires, self.lease_clock()):
            raise JobOwned(f"{self.path}: job {row.id} is being run by {row.owner}; it is migrated once that run "
                           "has stopped")
        where = f"{self.path}: job {row.id} ({row.workflow}), migrating from version {row.version} to {target.version}"

        def context(text: str) -> str:
            try:
                mapped = migration.fn(json.loads(text))
            except Exception as exc:
                raise MigrationRefused(f"{where}: its migrate({migration.from_version}) function raised "
                                       f"{type(exc).__name__}: {exc}; nothing changed") from exc
            try:
                if isinstance(mapped, BaseModel):
                    return dump_context(target.context, validate_submission(target.context, mapped, where), where)
                return dump_context(target.context, mapped, where)
            except ContextInvalid as exc:
                raise MigrationRefused(f"{exc}; the migration was refused and nothing changed") from exc

        done = self.store.migrate_job(row.id, row.workflow, epoch=row.epoch, from_version=row.version,
                                      to_version=target.version, fingerprint=target.fingerprint,
                                      steps=target.ranked_steps(), drop=migration.drop, context=context)
        if done is not None:
            log.job_migrated(row.id, row.workflow, done.note(row.version, target.version))  # log
        return done

    def migrate_jobs(self, workflow: str | None = None) -> MigrationReport:
        """Migrate now every unfinished job that a registered version declares a migration for.

        A job whose own version is registered is migrated too (its run would
        not migrate it: a job runs on its own version while this process has
        it). Jobs a live run holds, and refused migrations, are listed in the
        report's ``skipped`` (with the reason) and left unchanged. Each job is
        migrated in its own transaction, fenced by its claim epoch.
        """
        report = MigrationReport()
        for row in self.store.unfinished_jobs():
            if workflow is not None and row.workflow != workflow:
                continue
            found = self._registry.migration_to(row.workflow, row.version)
            if found is None:
                continue
            try:
                done = self._migrate(row, Plan(found[0], found[1]))
            except (JobOwned, MigrationRefused) as exc:
                report.skipped[row.id] = f"{type(exc).__name__}: {exc}"
                log.job_left_alone(row.id, row.workflow, report.skipped[row.id])  # log
                continue
            if done is None:
                report.skipped[row.id] = "it changed while being migrated (claimed or migrated elsewhere); try again"
                continue
            report.append(row.id)
            report.notes[row.id] = done.note(row.version, found[0].version)
        return report

    def _run_claimed(self, job_id: int, active: _Active) -> JobStatus[Any]:
        row = self._row(job_id)
        if row.state in TERMINAL_JOB_STATES:
            return self._finished(row)
        row, flow = self._prepare(row)  # versions: the job's own definition, migrated onto first if declared
        owner = self.owner
        # Marked live *before* the claim commits, so that another engine of
        # this process never sees our claim with no live run behind it.
        with ownership.LiveRun(owner, job_id):
            if row.owner is not None and ownership.owner_alive(row.owner, job_id, row.lease_expires,
                                                               self.lease_clock()):
                log.job_left_alone(job_id, row.workflow, f"{row.owner} is running it")  # log
                raise JobOwned(f"{self.path}: job {job_id} is being run by {row.owner}; not taking it over")
            note = "claimed" if row.owner is None else f"claimed from {row.owner} (epoch {row.epoch}), found dead"
            claimed = self.store.claim(job_id, state=row.state, epoch=row.epoch, owner=owner,
                                       lease_expires=self._heartbeat.lease_expires(), note=note)
            if claimed is None:
                raise JobOwned(f"{self.path}: job {job_id} was claimed by another run just now")
            log.job_claimed(job_id, row.workflow, row.owner)  # log: a takeover when row.owner is set
            status = self._execute(flow, job_id, row.state, claimed, active, owner)
            assert status is not None
            return status

    def _execute(self, flow: Workflow[Any], job_id: int, prior_state: str, claimed: Claimed, active: _Active,
                 owner: str, report: bool = True) -> JobStatus[Any] | None:
        """Run a job this engine has just claimed (the caller holds its LiveRun mark) to its end.

        Returns its status (raising JobFailed/JobCancelled as ``run`` does), or None without
        reading it back when not ``report`` (a worker's run: nobody waits for that status).
        """
        job = LiveJob(job_id, flow.name, "running", owner, self.store, claimed.epoch)
        steps = {r.name: SubStep(job, r) for r in claimed.steps}
        if prior_state == "pending":  # log
            log.job_started(job_id, flow.name)
        elif any(s.attempt for s in steps.values()):  # log
            log.job_resumed(job_id, flow.name, sum(s.state in TERMINAL_STEP_STATES for s in steps.values()), len(steps))
        run = JobRun(self.store, flow, job, steps, claimed.context, self._threads, workers=self.workers,
                     clock=self.clock)
        active.run = run
        if claimed.cancel_requested:
            run.signal("cancel")
        claim = ownership.Claim(job_id, owner, claimed.epoch, run.signal)
        self._heartbeat.add(claim)
        try:
            if self._closing or active.stop:
                run.signal("close")
            outcome = run.execute()
        except LeaseLost:
            if "shutdown" not in run.reasons:
                raise
            outcome = "released"  # the engine released it when its grace ran out
        except Exception as exc:
            # Not an outcome of the job's own: never leave the claim behind it (and never a
            # takeover of a job from this engine's own live identity later).
            self._abandon(run, owner, exc)
            raise
        finally:
            self._heartbeat.remove(claim)
        if outcome == "parked":
            wake_at, topics = run.waits()
            self.store.park(job_id, owner, job.epoch, wake_at, topics,
                            "parked: " + ", ".join(f"{n} waits" for n, st in steps.items() if st.state == "waiting"))
            log.job_parked(job_id, flow.name, wake_at, topics)  # log
            return self._status(self._row(job_id))
        if outcome == "released":
            # Not when the shutdown released it already (the claim is gone: nothing is written).
            if self.store.release(job_id, owner, job.epoch, "released: the engine was closed"):
                log.job_released(job_id, flow.name, "the engine was closed", cut_short=False)  # log
            raise EngineClosed(f"{self.path}: the engine was closed during the run of job {job_id}; its "
                               "unfinished steps are left for another run")
        log.job_ended(job_id, flow.name, job.state,  # log
                      None if job.state == "succeeded" else self._row(job_id).error)
        if not report:
            return None
        return self._finished(self._row(job_id))

    def _abandon(self, run: JobRun, owner: str, exc: Exception) -> None:
        """An unexpected error stopped ``run`` (no handler of it still executes): give up its claim cleanly.

        A database error (the file failing, or busy past every retry) is not
        the job's fault: the job is given back, unfinished, for another run
        after a pause (:meth:`_give_back`; a step cut short is retried,
        journalled as interrupted). Anything else
        would most likely happen again on every run: the job fails with the
        error, as a step that ran out of attempts fails it, and an operator's
        ``retry`` requeues it. Best effort: when even that write fails, the
        claim is given back if it can be; the caller re-raises ``exc``.
        """
        job = run.job
        why = describe(exc)
        with contextlib.suppress(WalstateError):
            if not isinstance(exc, DatabaseError) and job.state == "running":
                for step in run.steps.values():
                    if step.state not in TERMINAL_STEP_STATES:
                        step.cancel(note=f"the run stopped on an unexpected error ({why})")
                job.fire("fail", error=f"the run stopped on an unexpected error: {why}", release=True)
                log.job_ended(job.id, run.flow.name, "failed", why)  # log
                return
        self._give_back(job.id, run.flow.name, owner, job, exc)

    #: Seconds a job whose run stopped on a lasting error waits before a worker claims it again.
    GIVE_BACK_PAUSE = 2.0

    def _give_back(self, job_id: int, workflow: str, owner: str, job: LiveJob, exc: Exception) -> None:
        """Release the claim of a run that stopped on an error, runnable again after a pause.

        Best effort (should the database refuse this too, the lease expires). The pause keeps a
        lasting error (a full disk) from becoming a loop of claims; the step that was running
        when the run stopped is retried then, counted as an interrupted attempt.
        """
        if job.owner is None:
            return  # its last commit released it already
        why = f"released: the run stopped on {type(exc).__name__}: {exc}"
        try:
            if self.store.park(job_id, owner, job.epoch, self.clock() + self.GIVE_BACK_PAUSE, (), why,
                               patience=self.store.patience):
                log.job_left_alone(job_id, workflow, why)  # log
        except WalstateError as failed:
            log.job_left_alone(job_id, workflow, f"{why}; releasing it failed too ({failed})")  # log

    # -- the runtime -------------------------------------------------------------

    def _claim_batch(self, limit: int, dead: list[tuple[int, int]], worker: Worker) -> int:
        """Claim up to ``limit`` runnable jobs for ``worker`` and start each on a thread; return how many."""
        owner = self.owner
        limits = {name: f.concurrency for name, f in self._flows.items() if f.concurrency is not None}
        # Under the engine's run registry lock: a run() of this engine either
        # registered its job before (so it is skipped here) or finds the worker's
        # run registered after, and waits for it; never two runs of one job here.
        with ownership.Claiming(owner), self._active_lock:
            claims = self.store.claim_runnable(
                owner=owner, lease_expires=self._heartbeat.lease_expires(), limit=limit, workflows=list(self._flows),
                now=self.clock(), dead=dead, skip=[*worker.unrunnable, *self._active], limits=limits or None,
                versions=self._registry.claimable())
            for workflow, prior_state, prior_owner, claimed in claims:
                # Marked live before the batch's Claiming mark goes away.
                live = ownership.LiveRun(owner, claimed.job_id)
                live.__enter__()
                active = _Active()
                self._active[claimed.job_id] = active
                worker._adopt(claimed.job_id, active)
                log.job_claimed(claimed.job_id, workflow, prior_owner)  # log
                self._threads.submit(functools.partial(self._run_for_worker, workflow, prior_state, claimed, active,
                                                       live, owner, worker))
        return len(claims)

    def _run_for_worker(self, workflow: str, prior_state: str, claimed: Claimed, active: _Active,
                        live: ownership.LiveRun, owner: str, worker: Worker) -> None:
        job_id = claimed.job_id
        active.thread = threading.get_ident()
        try:
            try:
                # The job's own version (a worker claims only versions it has or can migrate from). The claim returned
                # what _plan checks: when its definition is registered here, unchanged, and the
                # context validates, that is the plan, with no read of the job.
                flow = self._registry.get(workflow, claimed.version)
                plan = None
                if flow is not None and claimed.fingerprint is not None and claimed.fingerprint == flow.fingerprint:
                    try:
                        flow.context.model_validate_json(claimed.context)
                        plan = Plan(flow)
                    except ValidationError:
                        pass  # _plan below says why, as it does for every job
                if plan is None:
                    plan = self._plan(self._row(job_id))
                    if plan.migration is None:
                        plan.flow.context.model_validate_json(claimed.context)
            except Exception as exc:
                # Nothing ran: give the job back at once and never claim it here again.
                worker.unrunnable[job_id] = f"{type(exc).__name__}: {exc}"
                self.store.release(job_id, owner, claimed.epoch, f"released: cannot run here ({exc})",
                                   undo_start=prior_state == "pending")
                log.job_unrunnable(job_id, workflow, worker.unrunnable[job_id])  # log
                return
            if plan.migration is not None:
                # A declared migration moves it onto a newer version first: only an
                # unowned job can be migrated, so give it back, migrate it, and let
                # the next claim (here or elsewhere) run it.
                self.store.release(job_id, owner, claimed.epoch, "released: to be migrated",
                                   undo_start=prior_state == "pending")
                self._migrate(self._row(job_id), plan)
                return
            flow = plan.flow
            self._execute(flow, job_id, prior_state, claimed, active, owner, report=False)
        except (JobFailed, JobCancelled, EngineClosed):
            pass  # the job's outcome is in the database
        except LeaseLost as exc:
            log.job_left_alone(job_id, workflow, str(exc))  # log
        except Exception as exc:  # a bug, or the file failing: _execute has failed or released the job
            log.worker_error(exc)  # log
        finally:
            live.__exit__()
            self._ended(job_id, active)

    def schedule(self, workflow: Workflow[C], *, cron: str, context: C | dict[str, Any], name: str | None = None,
                 missed: Missed = "latest", grace: float = DEFAULT_GRACE) -> Schedule:
        """Run a job of ``workflow`` on every slot of ``cron`` (UTC) while a worker of this engine runs.

        Each slot makes one job across every process on the database, restarts
        and prunes included: the schedule's progress is stored and advances in
        the transaction that creates the slot's job (key ``schedule:NAME:SLOT``).
        A slot less than ``grace`` seconds old when a worker checks it is on
        time and gets its job, however late the check; older ones were missed:
        ``missed="latest"`` gives the latest missed slot one job if no slot is
        on time, ``"skip"`` gives missed slots none (see
        :mod:`walstate.schedules`). ``name`` defaults to the workflow's name;
        one schedule per name.
        """
        self.register(workflow)
        sched = Schedule(name or workflow.name, workflow, cron, context, missed, grace)
        if sched.name in self._schedules:
            raise DefinitionError(f"{self.path}: a schedule named {sched.name!r} exists already")
        self._schedules[sched.name] = sched
        worker = self._worker
        if worker is not None:
            worker.wake()
        return sched

    @property
    def schedules(self) -> Mapping[str, Schedule]:
        """The schedules registered on this engine, by name (a read-only view)."""
        return MappingProxyType(self._schedules)

    def _submit_due(self) -> None:
        """Submit the job of every schedule slot that has come (the worker calls this)."""
        now = self.clock()
        for sched in list(self._schedules.values()):
            slots, passed = sched.due(now, self.store.schedule_slot(sched.name))
            for slot in slots:
                self._submit_slot(sched, slot)
            if passed is not None:
                self.store.pass_slot(sched.name, passed)

    def _submit_slot(self, sched: Schedule, slot: float) -> None:
        """Create the job of one slot and advance the schedule's progress to it (nothing if another process did)."""
        flow = sched.flow
        where = f"schedule {sched.name!r}"
        text = dump_context(flow.context, validate_submission(flow.context, sched.context, where), where)
        job_id = self.store.create_scheduled(sched.name, slot, flow.name, sched.key(slot), text,
                                             flow.ranked_steps(), flow.version, flow.fingerprint)
        worker = self._worker
        if worker is not None and job_id is not None:
            worker.wake()

    def start_worker(self, concurrency: int | None = None, *, poll: float = 0.02) -> Worker:
        """Start a worker in background threads: it claims and runs jobs until :meth:`stop_worker`.

        At most ``concurrency`` jobs (default: ``workers``) run at once in this
        engine; workers of several processes on one file share the work (no
        job runs twice) and take over the jobs of dead owners by themselves.
        Usable as a context manager (``with engine.start_worker(4): ...``).
        An engine has one worker: when it already runs, this sets its
        ``concurrency`` (if given) and returns it.
        """
        if concurrency is not None:
            # Checked here: 0 used to mean "the default" silently.
            checks.count(concurrency, "start_worker(concurrency=)", maximum=10_000, error=ConfigurationError)
        checks.seconds(poll, "start_worker(poll=)", error=ConfigurationError)
        with self._worker_lock:
            if self._closing:
                raise EngineClosed(f"{self.path}: the engine is closed; it starts no worker")
            if self._worker is not None and self._worker.running:
                # One worker per engine: a second call (say after start() began one) adjusts it.
                if concurrency is not None:
                    self._worker.concurrency = concurrency
                    self._worker.wake()
                return self._worker
            self._worker = Worker(self, concurrency or self.workers, poll=poll).start()
            log.worker_started(self._worker.concurrency)  # log
            return self._worker

    def stop_worker(self, *, drain: bool = True, grace: float = 30.0) -> None:
        """Stop this engine's worker: no new claims; see :meth:`Worker.stop` for ``drain`` and ``grace``."""
        checks.seconds(grace, "stop_worker(grace=)", zero=True)
        with self._worker_lock:
            worker = self._worker
        if worker is not None:
            worker.stop(drain=drain, grace=grace)
            log.worker_stopped()  # log

    def serve(self, concurrency: int | None = None, *, grace: float = 30.0) -> None:
        """Run a worker in this thread until :meth:`stop_worker` is called from elsewhere or Ctrl-C.

        On Ctrl-C (``KeyboardInterrupt``) it stops claiming, lets steps in
        flight finish within ``grace`` seconds and releases the rest.
        """
        worker = self.start_worker(concurrency)
        try:
            while worker.running:
                worker._stopped.wait(0.2)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop_worker(drain=False, grace=grace)

    def start(self, workflow: Workflow[C] | str, context: C | BaseModel | dict[str, Any], *,
              key: str | None = None) -> JobHandle[C]:
        """Submit a job and run it in this engine's background runtime; return its :class:`JobHandle`.

        Starts the engine's worker (``concurrency=workers``) if it is not
        running yet: like any worker, it also runs other runnable jobs of the
        workflows registered here (those ``submit`` stored, those of dead
        processes).
        """
        job_id: int = self.submit(cast(Any, workflow), cast(Any, context), key=key)
        with self._worker_lock:
            worker = self._worker
        if worker is None or not worker.running:
            worker = self.start_worker()
        worker.wake()
        return JobHandle(self, job_id)

    async def run_async(self, job_id: int) -> JobStatus[Any]:
        """:meth:`run` for asyncio apps: the run happens in a thread; the event loop only awaits it."""
        from .aio import run_async

        return await run_async(self, job_id)

    async def start_async(self, workflow: Workflow[C] | str, context: C | BaseModel | dict[str, Any], *,
                          key: str | None = None) -> JobHandle[C]:
        """:meth:`start` for asyncio apps (the submit's commit happens in a thread)."""
        from .aio import start_async

        return await start_async(self, workflow, context, key=key)

    def handle(self, job_id: int) -> JobHandle[Any]:
        """A :class:`JobHandle` for any existing job (raises UnknownJob)."""
        self._row(job_id)
        return JobHandle(self, job_id)

    def _force_release(self, job_id: int, active: _Active) -> None:
        """Shutdown's grace is over and the run still has steps in flight: release its claim now.

        Its handlers see ``step.cancelled``; whatever they do later is fenced
        off (the claim is gone), and the steps cut short are retried, journalled
        as interrupted, by the run that takes the job next.
        """
        run = active.run
        if run is None:
            return
        run.job.released = "released at shutdown"  # a late result refused from here on is expected
        run.signal("shutdown")
        owner, epoch = run.job.owner, run.job.epoch
        # Once: the grace is over, and should the database be busy, the lease expires anyway.
        if owner is not None and self.store.release(
                job_id, owner, epoch, "released: shut down before its steps in flight finished", patience=0.0):
            log.job_released(job_id, run.flow.name, "shut down before its steps in flight finished (the grace ran "  # log
                             "out); the next run retries them", cut_short=True)

    def _finished(self, row: JobRow) -> JobStatus[Any]:
        status = self._status(row)
        if row.state == "failed":
            errors = {n: s.error or "" for n, s in status.steps.items() if s.state == "failed"}
            raise JobFailed(f"{self.path}: job {row.id} ({row.workflow}) failed: {row.error}", job_id=row.id, errors=errors)
        if row.state == "cancelled":
            raise JobCancelled(f"{self.path}: job {row.id} ({row.workflow}) was cancelled", job_id=row.id)
        return status

    def recover(self) -> RecoveryReport:
        """Resume every unfinished job that no live run holds; return their ids.

        Each job is tried on its own: a job this engine cannot run (its
        workflow version not registered here, "waiting for code version N";
        a definition changed without a new version; a context that no longer
        validates; a refused migration; an error in user code) is left
        unclaimed and unchanged, logged and listed in the report's
        ``skipped``, and the next job is tried. A job of an unregistered
        version that a registered version declares a migration from is
        migrated, then run. Jobs that end
        ``failed`` or ``cancelled`` are resumed too (their ids are returned);
        use :meth:`status` to see how each ended.
        """
        report = RecoveryReport()
        for row in self.store.unfinished_jobs():
            with self._active_lock:
                if row.id in self._active:
                    continue  # this engine is running it right now
            if row.owner is not None and ownership.owner_alive(row.owner, row.id, row.lease_expires, self.lease_clock()):
                continue
            if row.owner is None and row.wake_at is not None and row.wake_at > self.clock():
                continue  # parked: its steps wait for a time or a message that has not come
            reason = self._runnable(row)
            if reason is not None:
                # Another version, a changed definition or context: left exactly as it is for a process that can run it.
                report.skipped[row.id] = reason
                log.job_left_alone(row.id, row.workflow, reason)  # log
                continue
            try:
                self.run(row.id)
            except (JobFailed, JobCancelled):
                pass
            except JobOwned:
                continue
            except EngineClosed:
                break
            except Exception as exc:
                report.skipped[row.id] = f"{type(exc).__name__}: {exc}"
                log.job_left_alone(row.id, row.workflow, report.skipped[row.id])  # log
                continue
            report.append(row.id)
        return report

    # -- operator actions -------------------------------------------------------

    def cancel(self, job_id: int, *, wait: float = 30.0) -> list[str]:
        """Cancel a job; return the names of the sub-steps cancelled.

        A job this engine is running is told at once: it starts no new step,
        its handlers in flight see ``step.cancelled``, and the run ends the
        job ``cancelled`` once they return. A job a live run elsewhere holds
        is asked through the database (its run sees it at its next
        heartbeat). Either way this waits up to ``wait`` seconds for the run
        to stop, then raises :class:`JobOwned` (the request stays). A job no
        live run holds is cancelled directly.
        """
        job_id = checks.job_id(job_id, self.path)
        checks.seconds(wait, "cancel(wait=)", zero=True)
        with self._active_lock:
            active = self._active.get(job_id)
        if active is not None and active.run is not None:
            before = {n for n, s in active.run.steps.items() if s.state in TERMINAL_STEP_STATES}
            # Stored as well as signalled: if this process dies before the run has
            # cancelled the job, the run that recovers it finds the request.
            self.store.request_cancel(job_id)
            active.run.signal("cancel")
            if not active.done.wait(wait):
                raise JobOwned(f"{self.path}: job {job_id} is still running; it will be cancelled once its handlers "
                               f"in flight return (waited {wait:g}s)")
            return [s.name for s in self.store.steps(job_id) if s.state == "cancelled" and s.name not in before]
        return operator.cancel(self.store, job_id, wait=wait, clock=self.lease_clock)

    def send(self, job_id: int, topic: str, payload: Any, *, key: str | None = None) -> bool:
        """Send ``payload`` (JSON) on ``topic`` to job ``job_id``; return whether it was stored (False: a known ``key``).

        The message is stored durably and delivered exactly once, to the
        job's first ``step.wait_for(topic)`` (in sending order); one sent
        before the wait is kept until then. A parked job waiting for ``topic``
        becomes runnable at once, and an idle worker of this process is woken.
        A repeated ``key`` returns False even once the job has ended (a
        webhook's retry of the message that ended it).

        ``True`` means exactly this: the message is new and committed, and the
        next ``wait_for(topic)`` of the job that asks gets it. It does not mean
        that a step waits for it now: a wait that has already timed out never
        gets it (a retry of its step that reaches the wait again does), and a
        message no wait asks for stays stored, unread, until the job is pruned.
        Raises :class:`UnknownJob`, :class:`JobFinished` (a new message to a
        job that has ended) or :class:`OutputNotJSON` (a payload that is not
        JSON, or holds text that is not valid Unicode, such as a lone
        surrogate: refused here, since it would fail every attempt of the step
        that consumes it).
        """
        job_id = checks.job_id(job_id, self.path)
        checks.text(topic, f"{self.path}: send() to job {job_id}: the topic")
        if key is not None:
            checks.text(key, f"{self.path}: send({job_id}, {topic!r}): the message key")
        text = message_json(payload, f"the payload of send({job_id}, {topic!r})")
        _, new = self.store.send(job_id, topic, text, key)
        worker = self._worker
        if worker is not None:
            worker.wake()
        return new

    def force_release(self, job_id: int) -> str | None:
        """Take job ``job_id``'s claim from whoever holds it, live or not; return that owner's token (None: nobody).

        For an owner you know is stuck (stopped, hung in a handler) and do not
        want to wait :data:`walstate.ownership.HUNG_GRACE` past its lease for:
        the claim's epoch is bumped in one journalled commit, so every later
        write of that run is refused; its heartbeat finds the claim lost and
        its handlers see ``step.cancelled`` (a stopped process: once it
        continues). The job is runnable again at once; the steps that run had
        in flight are retried, journalled as interrupted. A finished job is
        left as it is (None). Raises :class:`UnknownJob`.
        """
        taken = self.store.force_release(job_id, "released by an operator")
        if taken is None:
            self._row(job_id)  # UnknownJob for a job that does not exist
            return None
        with self._active_lock:
            active = self._active.get(job_id)
        if active is not None and active.run is not None and taken[0] == self.owner:
            active.run.signal("lost")  # our own run: told now, not at its next renewal
        worker = self._worker
        if worker is not None:
            worker.wake()
        return taken[0]

    def retry(self, job_id: int, step: str | None = None) -> list[str]:
        """Requeue a failed or cancelled job (or one failed ``step``) with a fresh retry budget.

        Returns the names of the sub-steps requeued; the job then runs again
        under :meth:`run`, :meth:`recover` or a worker.
        """
        return operator.retry(self.store, job_id, step)

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
        flow = self._registry.get(row.workflow, row.version)  # the job's own version's model
        if flow is None:
            context: Any = json.loads(row.context)
        else:
            try:
                context = flow.context.model_validate_json(row.context)
            except ValidationError as exc:
                raise ContextInvalid(f"{self.path}: job {row.id} ({row.workflow}): its stored context does not "
                                     f"validate against {flow.context.__name__}: {exc}") from exc
        steps = {
            s.name: StepStatus(s.name, s.state, s.phase, s.attempt, None if s.output is None else json.loads(s.output), s.error)
            for s in self.store.steps(row.id)
        }
        holder = None
        if row.owner is not None:
            who = ownership.describe_owner(row.owner)
            holder = OwnerStatus(row.owner, who.host, who.pid, row.renewed_at, row.lease_expires)
        return JobStatus(row.id, row.workflow, row.key, row.state, context, steps, row.error, row.created_at,
                         row.updated_at, row.version, holder)

    def jobs(self, state: str | None = None, workflow: str | None = None, limit: int = 50,
             offset: int = 0) -> views.JobPage:
        """A page of jobs, newest first: ``limit`` of them after the first ``offset``, optionally of one
        ``state`` (pending, running, succeeded, failed, cancelled) and one ``workflow``.

        Each is a :class:`JobSummary` (id, workflow, key, state, current
        phase, sub-steps counted by state, times, error); the page is a list
        whose ``next_offset`` is where the next page starts (``None`` on the
        last). Two reads whatever the page size: the jobs, then one aggregate
        of their sub-steps. Workflows need not be registered here.
        """
        return views.job_page(self.store, state=state, workflow=workflow, limit=limit, offset=offset)

    def history(self, job_id: int, step: str | None = None) -> list[TransitionRecord]:
        """The job's transition journal in commit order (optionally of one sub-step)."""
        self._row(job_id)
        if step is not None:
            checks.text(step, f"{self.path}: history({job_id}): the step")
        return [TransitionRecord(r.step, r.from_state, r.to_state, r.attempt, r.at, r.note)
                for r in self.store.journal(job_id, step)]

    # -- retention --------------------------------------------------------------

    def prune(self, older_than: float | timedelta, states: Sequence[str] = ("succeeded", "cancelled"), *,
              batch: int = DEFAULT_BATCH, dry_run: bool = False) -> int:
        """Delete jobs in ``states`` that finished more than ``older_than`` (seconds) ago; return how many.

        Their sub-steps, journal and once() records go with them, ``batch`` jobs
        per short transaction, so running workers keep committing meanwhile.
        Only finished states are accepted (ConfigurationError otherwise);
        ``dry_run`` counts without deleting. A pruned job's key can be used again.
        """
        age = older_than.total_seconds() if isinstance(older_than, timedelta) else older_than
        checks.seconds(age, "prune(older_than=)", zero=True, error=ConfigurationError)
        checks.count(batch, "prune(batch=)", maximum=1_000_000, error=ConfigurationError)
        return self.store.prune(float(age), tuple(states), batch=batch, dry_run=dry_run)

    # -- lifecycle --------------------------------------------------------------

    def close(self, grace: float = 30.0) -> None:
        """Stop new work, let runs in flight stop cleanly, release their claims, then close the database.

        Runs in other threads start no new step; their handlers in flight
        finish (up to ``grace`` seconds are waited for), then each run releases
        its job for another process (journalled) and its ``run()`` raises
        :class:`EngineClosed`.
        """
        checks.seconds(grace, "close(grace=)", zero=True)
        self._closing = True
        deadline = time.monotonic() + grace
        worker = self._worker
        if worker is not None:
            worker.stop(drain=False, grace=grace)
        with self._active_lock:
            actives = list(self._active.items())
        me = threading.get_ident()
        for _, active in actives:
            active.halt()
        for _, active in actives:
            if active.thread != me:
                active.done.wait(max(0.0, deadline - time.monotonic()))
        # Grace is over: a write still waiting for a busy database gives up (its run's claim is released below,
        # or expires).
        self.store.stop_retrying()
        for job_id, active in actives:
            if not active.done.is_set() and active.thread != me:
                with contextlib.suppress(WalstateError):  # the file may be failing: its lease expires anyway
                    self._force_release(job_id, active)
        self._heartbeat.close()
        self._threads.close()
        self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for engine in list(_engines):
        engine._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
