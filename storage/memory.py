"""The in-memory store: the whole storage contract with no database, for fast unit tests of an app's flows.

``Engine("memory://NAME")`` (or :func:`~.contract.open_store`) opens one.
Stores opened on the same name in one process share its tables until the
process ends; ``memory://`` with no name is a private database of its own.
Nothing survives the process: this store is for tests and for the contract's
own sake, never for durable work. Every promise of
:class:`~.contract.Storage` holds here as in the SQL stores (the contract
suite runs against all three), with one exception said where it is met: a
transactional step's SQL (``step.db``, ``step.execute``) raises
:class:`UsageError`, as there is no SQL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .errors import ConfigurationError, JobFinished, LeaseLost, UnknownJob, UsageError
from .memory_tables import Message, Tables
from .types import (DEFAULT_PATIENCE, UNFINISHED_JOB_STATES, Change, Claimed, Durability,
                    JobRow, JournalRow, MigratedJob, StepCount, StepRow, check_states)

_NAMED: dict[str, Tables] = {}
_NAMED_LOCK = threading.Lock()


class _NoSQL:
    """``step.db`` on the memory store: any use says why there is no SQL here."""

    def __init__(self, path: str) -> None:
        self._path = path

    def __getattr__(self, name: str) -> Any:
        raise UsageError(f"{self._path}: the memory store has no SQL database; a transactional step's SQL "
                         "(step.db, step.execute) needs a SQLite file or PostgreSQL")


class MemoryStore:
    """A walstate database held in this process's memory (see the module docstring)."""

    def __init__(self, target: str, *, durability: Durability = "normal", readonly: bool = False,
                 database_id: str | None = None, **_ignored: Any) -> None:
        if durability not in ("normal", "full"):  # refused as the other stores refuse it: no typo passes here only
            raise ConfigurationError(f"durability must be 'normal' or 'full', not {durability!r}")
        name = target.split("://", 1)[1] if "://" in target else target
        with _NAMED_LOCK:
            tables = _NAMED.get(name) if name else None
            if tables is None:
                tables = Tables()
                if database_id is not None:
                    tables.database_id = database_id
                if name:
                    _NAMED[name] = tables
        self.t = tables
        self.path = f"memory://{name}"
        self.durability: Durability = durability
        self.readonly = readonly
        self.database_id = tables.database_id
        self.migrated: tuple[int, ...] = ()
        self.lease_clock: Callable[[], float] = time.monotonic
        self.clock: Callable[[], float] = time.time
        self.handle: Any = _NoSQL(self.path)
        self.patience = DEFAULT_PATIENCE
        self._closed = False

    # -- settings ----------------------------------------------------------------------

    def synced(self, local: Callable[[], float]) -> Callable[[], float]:
        return local

    def configure(self, *, patience: float, hold_warning: float | None, idle_limit: float) -> None:
        self.patience = patience  # nothing here is ever refused for a transient reason: kept for the contract

    def stop_retrying(self) -> None:
        """Nothing waits: the memory store never refuses a write for a transient reason."""

    def transaction_active(self) -> bool:
        return False

    def transient_refusal(self, exc: BaseException) -> Exception | None:
        return None

    def close(self) -> None:
        self._closed = True

    def _writable(self, doing: str) -> None:
        if self.readonly:
            raise UsageError(f"{self.path}: opened read-only; not {doing}")

    # -- reads -------------------------------------------------------------------------

    def job(self, job_id: int) -> JobRow | None:
        return self.t.job(job_id)

    def jobs(self, *, state: str | None = None, workflow: str | None = None, limit: int | None = None,
             offset: int = 0) -> list[JobRow]:
        return self.t.jobs_page(state, workflow, limit, offset)

    def steps(self, job_id: int) -> list[StepRow]:
        return self.t.steps_of(job_id)

    def step_counts(self, job_ids: Sequence[int]) -> list[StepCount]:
        return self.t.step_counts(job_ids)

    def journal(self, job_id: int, step: str | None = None) -> list[JournalRow]:
        return self.t.journal(job_id, step)

    def unfinished_jobs(self) -> list[JobRow]:
        return self.t.unfinished()

    def once(self, job_id: int, step: str, name: str) -> str | None:
        with self.t.lock:
            return self.t.once_records.get((job_id, step, name))

    def cancel_requested(self, job_ids: Sequence[int]) -> set[int]:
        with self.t.lock:
            return {i for i in job_ids if (j := self.t.jobs.get(i)) is not None and j.cancel_requested}

    def owned_unfinished(self) -> list[tuple[int, int, str, str, float | None]]:
        with self.t.lock:
            return [(j.id, j.epoch, j.workflow, j.owner, j.lease_expires) for _, j in sorted(self.t.jobs.items())
                    if j.state in UNFINISHED_JOB_STATES and j.owner is not None]

    def runnable_exists(self, workflows: Sequence[str], now: float, skip: Sequence[int] = (),
                        versions: Sequence[tuple[str, int]] = ()) -> bool:
        return bool(self.t.runnable(workflows, now, skip, versions))

    def next_wake(self, workflows: Sequence[str], versions: Sequence[tuple[str, int]] = ()) -> float | None:
        return self.t.next_wake(workflows, versions)

    def message_topics(self, job_id: int) -> set[str]:
        return self.t.message_topics(job_id)

    def schedule_slot(self, name: str) -> float | None:
        with self.t.lock:
            return self.t.slots.get(name)

    def data_version(self) -> int:
        with self.t.lock:
            return self.t.version

    # -- making jobs -------------------------------------------------------------------

    def _insert_job(self, workflow: str, key: str | None, context: str, steps: Sequence[tuple[str, str, int]],
                    version: int, fingerprint: str | None, now: float) -> int:
        t = self.t
        job_id = t.next_id("job")
        t.put(t.jobs, job_id, JobRow(job_id, workflow, key, "pending", context, None, None, None, now, now,
                                     version=version, fingerprint=fingerprint))
        t.put(t.initial, job_id, context)
        if key is not None:
            t.put(t.keys, (workflow, key), job_id)
        for name, phase, position in steps:
            step_id = t.next_id("step")
            t.put(t.steps, step_id, StepRow(step_id, job_id, name, phase, position, "pending", 0, None, None, now))
        return job_id

    def create_job(self, workflow: str, key: str | None, context: str, steps: Sequence[tuple[str, str, int]],
                   version: int = 1, fingerprint: str | None = None) -> tuple[int, str | None]:
        self._writable(f"creating a {workflow!r} job")
        with self.t.transaction():
            known = None if key is None else self.t.keys.get((workflow, key))
            if known is not None:
                return known, self.t.initial[known]
            return self._insert_job(workflow, key, context, steps, version, fingerprint, self.clock()), None

    def create_scheduled(self, schedule: str, slot: float, workflow: str, key: str, context: str,
                         steps: Sequence[tuple[str, str, int]], version: int = 1,
                         fingerprint: str | None = None) -> int | None:
        self._writable(f"creating the {key!r} job of schedule {schedule!r}")
        with self.t.transaction():
            if not self._advance(schedule, slot):
                return None
            known = self.t.keys.get((workflow, key))
            if known is not None:
                return known
            return self._insert_job(workflow, key, context, steps, version, fingerprint, self.clock())

    def _advance(self, schedule: str, slot: float) -> bool:
        slot = float(round(slot))  # a slot is a whole second (see WritePath.create_scheduled)
        last = self.t.slots.get(schedule)
        if last is not None and last >= slot:
            return False
        self.t.put(self.t.slots, schedule, slot)
        return True

    def pass_slot(self, schedule: str, slot: float) -> bool:
        self._writable(f"recording the progress of schedule {schedule!r}")
        with self.t.transaction():
            return self._advance(schedule, slot)

    # -- claims ------------------------------------------------------------------------

    def _take(self, job: JobRow, owner: str, lease_expires: float, now: float, note: str) -> Claimed:
        row = self.t.update_job(job.id, owner=owner, lease_expires=lease_expires, renewed_at=self.lease_clock(),
                                epoch=job.epoch + 1, updated_at=now, wake_at=None,
                                state="running" if job.state == "pending" else job.state)
        self.t.add_journal(job.id, None, job.state, "running", 0, now, note)
        return Claimed(row.epoch, row.context, row.cancel_requested, self.t.steps_of(job.id), job.id, row.version,
                       row.fingerprint)

    def claim(self, job_id: int, *, state: str, epoch: int, owner: str, lease_expires: float,
              note: str) -> Claimed | None:
        self._writable(f"claiming job {job_id}")
        with self.t.transaction():
            job = self.t.jobs.get(job_id)
            if job is None or job.epoch != epoch or job.state != state or state not in UNFINISHED_JOB_STATES:
                return None
            return self._take(job, owner, lease_expires, self.clock(), note)

    def claim_runnable(self, *, owner: str, lease_expires: float, limit: int, workflows: Sequence[str], now: float,
                       dead: Sequence[tuple[int, int]] = (), skip: Sequence[int] = (),
                       limits: dict[str, int] | None = None,
                       versions: Sequence[tuple[str, int]] = ()) -> list[tuple[str, str, str | None, Claimed]]:
        if limit < 1 or not workflows:
            return []
        self._writable("claiming runnable jobs")
        t = self.t
        with t.transaction():
            found = {j.id: j for j in t.runnable(workflows, now, skip, versions)}
            pairs, names = set(versions), set(workflows)
            for job_id, epoch in dead:
                j = t.jobs.get(job_id)
                if (j is not None and j.epoch == epoch and j.state in UNFINISHED_JOB_STATES and j.workflow in names
                        and job_id not in skip and (not pairs or (j.workflow, j.version) in pairs)):
                    found[job_id] = j
            candidates = sorted(found.values(), key=lambda j: (j.updated_at, j.id))
            running: dict[str, int] = {}
            for j in t.jobs.values():
                if j.state == "running" and j.owner is not None:
                    running[j.workflow] = running.get(j.workflow, 0) + 1
            chosen: list[JobRow] = []
            for j in candidates:
                budget = (limits or {}).get(j.workflow)
                # A job already running (being taken over) does not add to the count.
                if budget is not None and (j.state == "pending" or j.owner is None):
                    if running.get(j.workflow, 0) >= budget:
                        continue
                    running[j.workflow] = running.get(j.workflow, 0) + 1
                chosen.append(j)
                if len(chosen) == limit:
                    break
            stamp = self.clock()
            out = []
            for j in sorted(chosen, key=lambda j: j.id):
                note = "claimed" if j.owner is None else f"claimed from {j.owner}, found dead"
                out.append((j.workflow, j.state, j.owner, self._take(j, owner, lease_expires, stamp, note)))
            return out

    def renew(self, job_id: int, owner: str, epoch: int, lease_expires: float) -> bool | None:
        self._writable(f"renewing the lease on job {job_id}")
        with self.t.transaction():
            if not self.t.owns(job_id, owner, epoch):
                return None
            return self.t.update_job(job_id, lease_expires=lease_expires, renewed_at=self.lease_clock()).cancel_requested

    def _let_go(self, job_id: int, owner: str | None, epoch: int, note: str, **values: Any) -> str | None:
        """Clear the claim of ``owner`` at ``epoch`` (journalled); the job's state after, or None if it was lost."""
        if not self.t.owns(job_id, owner, epoch):
            return None
        now = self.clock()
        before = self.t.jobs[job_id].state
        row = self.t.update_job(job_id, owner=None, lease_expires=None, epoch=epoch + 1, updated_at=now, **values)
        self.t.add_journal(job_id, None, "running" if "state" in values else before, row.state, 0, now, note)
        return row.state

    def release(self, job_id: int, owner: str, epoch: int, note: str, *, undo_start: bool = False,
                patience: float | None = None) -> bool:
        self._writable(f"releasing job {job_id}")
        with self.t.transaction():
            job = self.t.jobs.get(job_id)
            state = {"state": "pending"} if undo_start else {"state": job.state} if job is not None else {}
            return self._let_go(job_id, owner, epoch, note, **state) is not None

    def force_release(self, job_id: int, note: str) -> tuple[str, int] | None:
        self._writable(f"releasing job {job_id}")
        with self.t.transaction():
            job = self.t.jobs.get(job_id)
            if job is None:
                raise UnknownJob(f"{self.path}: no job {job_id}")
            if job.owner is None or job.state not in UNFINISHED_JOB_STATES:
                return None
            self._let_go(job_id, job.owner, job.epoch, f"{note} (taken from {job.owner}, epoch {job.epoch})")
            return job.owner, job.epoch

    def park(self, job_id: int, owner: str, epoch: int, wake_at: float, topics: Sequence[str], note: str, *,
             patience: float | None = None) -> bool:
        self._writable(f"parking job {job_id}")
        with self.t.transaction():
            wanted = set(topics)
            ready = any(m.job_id == job_id and m.consumed_by is None and m.topic in wanted
                        for m in self.t.messages.values())
            return self._let_go(job_id, owner, epoch, note, wake_at=None if ready else wake_at) is not None

    # -- moves -------------------------------------------------------------------------

    def commit(self, changes: Sequence[Change] = (), effect: Callable[[], Sequence[Change]] | None = None) -> None:
        self._writable("writing a state change")
        with self.t.transaction():
            # As on SQL: a transactional step's handler runs inside the transaction, before the changes apply.
            todo = [*changes, *(effect() if effect is not None else ())]
            now = self.clock()
            for c in todo:
                self.t.apply(self.path, c, now)

    def once_lookup(self, job_id: int, step: str, name: str, owner: str | None, epoch: int) -> str | None:
        with self.t.lock:
            if not self.t.owns(job_id, owner, epoch):
                raise LeaseLost(f"{self.path}: job {job_id}: this run lost its claim on the job (claim epoch {epoch} "
                                f"is over); once({name!r}) of step {step!r} was not called")
            return self.t.once_records.get((job_id, step, name))

    def record_once(self, job_id: int, step: str, name: str, result: str, *, owner: str | None = None,
                    epoch: int | None = None) -> str:
        self._writable(f"recording once({name!r}) of step {step!r}")
        with self.t.transaction():
            if epoch is not None and not self.t.owns(job_id, owner, epoch):
                raise LeaseLost(f"{self.path}: job {job_id}: this run lost its claim on the job (claim epoch "
                                f"{epoch} is over); the result of once({name!r}) of step {step!r} is not recorded")
            self.t.add_once(job_id, step, name, result)
            return self.t.once_records[(job_id, step, name)]

    def send(self, job_id: int, topic: str, payload: str, key: str | None) -> tuple[int, bool]:
        self._writable(f"sending {topic!r} to job {job_id}")
        t = self.t
        with t.transaction():
            job = t.jobs.get(job_id)
            if job is None:
                raise UnknownJob(f"{self.path}: no job {job_id} to send {topic!r} to")
            if key is not None:  # before the finished check: a webhook's retry is a duplicate, not an error
                for m in t.messages.values():
                    if m.job_id == job_id and m.key == key:
                        return m.id, False
            if job.state not in UNFINISHED_JOB_STATES:
                raise JobFinished(f"{self.path}: job {job_id} is {job.state}; it will never read {topic!r}")
            message_id = t.next_id("message")
            t.put(t.messages, message_id, Message(message_id, job_id, topic, payload, key))
            waiting = any(s.job_id == job_id and s.state == "waiting" and s.wait_topic == topic
                          for s in t.steps.values())
            if job.owner is None and job.wake_at is not None and waiting:
                t.update_job(job_id, wake_at=None)
            return message_id, True

    def consume(self, job_id: int, step: str, name: str, topic: str, owner: str | None, epoch: int) -> str | None:
        self._writable(f"consuming {topic!r} for step {step!r} of job {job_id}")
        t = self.t
        with t.transaction():
            if not t.owns(job_id, owner, epoch):
                raise LeaseLost(f"{self.path}: job {job_id}: this run lost its claim; it may not consume messages "
                                f"of {topic!r}")
            known = t.once_records.get((job_id, step, name))
            if known is not None:
                return known
            waiting = sorted(m.id for m in t.messages.values()
                             if m.job_id == job_id and m.topic == topic and m.consumed_by is None)
            if not waiting:
                return None
            m = t.messages[waiting[0]]
            t.put(t.messages, m.id, Message(m.id, m.job_id, m.topic, m.payload, m.key, f"{step}:{name}"))
            t.add_once(job_id, step, name, m.payload)
            return m.payload

    def request_cancel(self, job_id: int) -> bool:
        self._writable(f"requesting the cancellation of job {job_id}")
        with self.t.transaction():
            job = self.t.jobs.get(job_id)
            if job is None or job.state not in UNFINISHED_JOB_STATES:
                return False
            self.t.update_job(job_id, cancel_requested=True)
            return True

    def migrate_job(self, job_id: int, workflow: str, *, epoch: int, from_version: int, to_version: int,
                    fingerprint: str, steps: Sequence[tuple[str, str, int]], drop: Sequence[str],
                    context: Callable[[str], str]) -> MigratedJob | None:
        self._writable(f"migrating job {job_id} to version {to_version}")
        return self.t.migrate(self.path, self.clock(), job_id, workflow, epoch, from_version, to_version, fingerprint,
                              steps, drop, context)

    def prune(self, older_than: float, states: Sequence[str], *, batch: int, dry_run: bool = False) -> int:
        chosen = check_states(states)
        if not dry_run:
            self._writable("pruning finished jobs")
        return self.t.prune(time.time() - older_than, chosen, dry_run)


__all__ = ["MemoryStore"]
