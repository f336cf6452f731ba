"""The memory store's tables: rows in dicts, one lock, transactions that undo on any error, and the reads.

A transaction (:meth:`Tables.transaction`) holds the lock and logs every
row it replaces, so an exception anywhere inside (a missed compare-and-set,
a context validator, a transactional step's handler) puts every table back as
it was: all of a write or nothing, as the SQL stores' transactions do.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .planning import plan_migration
from .errors import LeaseLost, StaleState
from .types import (TERMINAL_JOB_STATES, UNFINISHED_JOB_STATES, Change, JobRow, JournalRow, MigratedJob, StepCount,
                    StepRow)

_MISSING = object()


@dataclasses.dataclass(slots=True)
class Message:
    """A message row (``consumed_by``: the ``step:name`` of the wait that consumed it)."""

    id: int
    job_id: int
    topic: str
    payload: str
    key: str | None
    consumed_by: str | None = None


class Tables:
    """Every row of one in-memory walstate database; shared by each store opened on its name."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.database_id = uuid.uuid4().hex
        self.jobs: dict[int, JobRow] = {}
        self.steps: dict[int, StepRow] = {}  # by step id
        self.initial: dict[int, str] = {}  # a job's context as submitted (what a repeated key returns)
        self.keys: dict[tuple[str, str], int] = {}  # (workflow, key) -> job id
        self.messages: dict[int, Message] = {}
        self.once_records: dict[tuple[int, str, str], str] = {}
        self.slots: dict[str, float] = {}
        self.journal_rows: list[JournalRow] = []
        # Ids are never handed out twice, pruned jobs' included (as AUTOINCREMENT and BIGSERIAL do).
        self.counters = {"job": 0, "step": 0, "journal": 0, "message": 0}
        self.version = 0  # changes with every commit: data_version()
        self._undo: list[tuple[Any, Any, Any]] | None = None

    # -- transactions ----------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All of the block's writes or none of them; nested blocks join the outer one."""
        with self.lock:
            if self._undo is not None:
                yield
                return
            self._undo = []
            journal, counters = len(self.journal_rows), dict(self.counters)
            try:
                yield
            except BaseException:
                for table, key, old in reversed(self._undo):
                    if old is _MISSING:
                        table.pop(key, None)
                    else:
                        table[key] = old
                del self.journal_rows[journal:]
                self.counters = counters
                raise
            else:
                self.version += 1
            finally:
                self._undo = None

    def put(self, table: dict[Any, Any], key: Any, value: Any) -> None:
        """Set ``table[key]`` (``_MISSING``-safe undo logged); only inside :meth:`transaction`."""
        assert self._undo is not None, "a write outside a transaction"
        self._undo.append((table, key, table.get(key, _MISSING)))
        table[key] = value

    def delete(self, table: dict[Any, Any], key: Any) -> None:
        assert self._undo is not None, "a write outside a transaction"
        if key in table:
            self._undo.append((table, key, table[key]))
            del table[key]

    def next_id(self, kind: str) -> int:
        self.counters[kind] += 1
        return self.counters[kind]

    def update_job(self, job_id: int, **values: Any) -> JobRow:
        row = dataclasses.replace(self.jobs[job_id], **values)
        self.put(self.jobs, job_id, row)
        return row

    def update_step(self, step_id: int, **values: Any) -> StepRow:
        row = dataclasses.replace(self.steps[step_id], **values)
        self.put(self.steps, step_id, row)
        return row

    def add_journal(self, job_id: int, step: str | None, from_state: str, to_state: str, attempt: int, at: float,
                    note: str | None) -> None:
        assert self._undo is not None, "a write outside a transaction"
        self.journal_rows.append(JournalRow(self.next_id("journal"), job_id, step, from_state, to_state, attempt, at,
                                            note))

    def add_once(self, job_id: int, step: str, name: str, result: str) -> None:
        if (job_id, step, name) not in self.once_records:
            self.put(self.once_records, (job_id, step, name), result)

    def owns(self, job_id: int, owner: str | None, epoch: int) -> bool:
        job = self.jobs.get(job_id)
        return job is not None and job.owner == owner and job.epoch == epoch

    # -- reads -------------------------------------------------------------------------

    def job(self, job_id: int) -> JobRow | None:
        with self.lock:
            return self.jobs.get(job_id)

    def jobs_page(self, state: str | None, workflow: str | None, limit: int | None, offset: int) -> list[JobRow]:
        with self.lock:
            rows = [j for _, j in sorted(self.jobs.items(), reverse=True)
                    if (state is None or j.state == state) and (workflow is None or j.workflow == workflow)]
        return rows[offset:] if limit is None else rows[offset:offset + limit]

    def steps_of(self, job_id: int) -> list[StepRow]:
        with self.lock:
            return sorted((s for s in self.steps.values() if s.job_id == job_id), key=lambda s: s.position)

    def step_counts(self, job_ids: Sequence[int]) -> list[StepCount]:
        wanted = set(job_ids)
        counts: dict[tuple[int, str, str], list[int]] = {}
        with self.lock:
            for s in self.steps.values():
                if s.job_id in wanted:
                    entry = counts.setdefault((s.job_id, s.phase, s.state), [0, s.position])
                    entry[0] += 1
                    entry[1] = min(entry[1], s.position)
        return [StepCount(job, phase, state, n, rank) for (job, phase, state), (n, rank) in counts.items()]

    def journal(self, job_id: int, step: str | None) -> list[JournalRow]:
        with self.lock:
            return [r for r in self.journal_rows if r.job_id == job_id and (step is None or r.step == step)]

    def unfinished(self) -> list[JobRow]:
        with self.lock:
            return [j for _, j in sorted(self.jobs.items()) if j.state in UNFINISHED_JOB_STATES]

    def runnable(self, workflows: Sequence[str], now: float, skip: Sequence[int],
                 versions: Sequence[tuple[str, int]]) -> list[JobRow]:
        """Unclaimed unfinished due jobs of ``workflows`` (of ``versions``, if any), runnable longest first."""
        names, skipped, pairs = set(workflows), set(skip), set(versions)
        with self.lock:
            rows = [j for j in self.jobs.values()
                    if j.state in UNFINISHED_JOB_STATES and j.owner is None and (j.wake_at is None or j.wake_at <= now)
                    and j.workflow in names and j.id not in skipped and (not pairs or (j.workflow, j.version) in pairs)]
        return sorted(rows, key=lambda j: (j.updated_at, j.id))

    def next_wake(self, workflows: Sequence[str], versions: Sequence[tuple[str, int]]) -> float | None:
        names, pairs = set(workflows), set(versions)
        with self.lock:
            times = [j.wake_at for j in self.jobs.values()
                     if j.state in UNFINISHED_JOB_STATES and j.owner is None and j.wake_at is not None
                     and j.workflow in names and (not pairs or (j.workflow, j.version) in pairs)]
        return min(times) if times else None

    def message_topics(self, job_id: int) -> set[str]:
        with self.lock:
            return {m.topic for m in self.messages.values() if m.job_id == job_id and m.consumed_by is None}

    # -- moves -------------------------------------------------------------------------

    def apply(self, path: str, c: Change, now: float) -> None:
        """Write change ``c`` (its context patch, compare-and-set, journal row, once records) or raise; in a transaction."""
        t = self
        if c.context is not None:
            job = t.jobs.get(c.job_id)
            if job is None:
                raise StaleState(f"{path}: job {c.job_id} does not exist", kind="job", row_id=c.job_id,
                                 expected="", actual=None)
            t.update_job(c.job_id, context=c.context.merge({**json.loads(job.context), **c.context.patch}),
                         updated_at=now)
        owned = t.owns(c.job_id, c.owner, c.epoch)
        if c.kind == "step":
            step = t.steps.get(c.row_id)
            if step is None or step.state != c.expected or not owned:
                self._miss(path, c, None if step is None else step.state)
            t.update_step(c.row_id, state=c.new, attempt=c.attempt, failures=c.failures,
                          interruptions=c.interruptions, output=c.output, error=c.error, updated_at=now,
                          wake_at=c.wake_at, wait_topic=c.topic)
        elif c.kind == "job":
            job = t.jobs.get(c.row_id)
            if job is None or job.state != c.expected or not owned:
                self._miss(path, c, None if job is None else job.state)
            release = {"owner": None, "lease_expires": None, "epoch": c.epoch + 1, "cancel_requested": False}
            t.update_job(c.row_id, state=c.new, error=c.error, updated_at=now, **(release if c.release else {}))
        else:
            raise ValueError(f"unknown change kind {c.kind!r}")
        t.add_journal(c.job_id, c.step, c.expected, c.new, c.attempt, now, c.note)
        for step_name, name, result in c.once:
            t.add_once(c.job_id, step_name, name, result)

    def _miss(self, path: str, c: Change, actual: str | None) -> None:
        job = self.jobs.get(c.job_id)
        what = f"sub-step {c.step!r} of job {c.job_id}" if c.kind == "step" else f"job {c.job_id}"
        if actual is not None and job is not None and (job.owner, job.epoch) != (c.owner, c.epoch):
            raise LeaseLost(f"{path}: {what} is now held by {job.owner!r} (claim epoch {job.epoch}), not by "
                            f"{c.owner!r} (epoch {c.epoch}); this run lost its claim and must stop writing to it")
        raise StaleState(f"{path}: {what} is {actual!r}, not {c.expected!r} as expected for the move to "
                         f"{c.new!r}; another writer changed it first; reload it and decide again",
                         kind=c.kind, row_id=c.row_id, expected=c.expected, actual=actual)

    # -- migration and retention ---------------------------------------------------------

    def migrate(self, path: str, now: float, job_id: int, workflow: str, epoch: int, from_version: int,
                to_version: int, fingerprint: str, steps: Sequence[tuple[str, str, int]], drop: Sequence[str],
                context: Callable[[str], str]) -> MigratedJob | None:
        """The contract's ``migrate_job`` on these tables (``path`` for messages, ``now`` for timestamps)."""
        with self.transaction():
            job = self.jobs.get(job_id)
            if job is None or job.state not in UNFINISHED_JOB_STATES or (job.epoch, job.version) != (epoch,
                                                                                                  from_version):
                return None
            stored = self.steps_of(job_id)
            removed = plan_migration(path, job_id, workflow, from_version, to_version, steps,
                                     [(s.name, s.state, s.phase) for s in stored], drop)
            self.update_job(job_id, version=to_version, fingerprint=fingerprint, context=context(job.context),
                            epoch=epoch + 1, updated_at=now)
            by_name = {s.name: s for s in stored}
            added = []
            for name, phase, rank in steps:
                if name in by_name:
                    self.update_step(by_name[name].id, phase=phase, position=rank, updated_at=now)
                else:
                    step_id = self.next_id("step")
                    self.put(self.steps, step_id, StepRow(step_id, job_id, name, phase, rank, "pending", 0, None, None,
                                                          now))
                    added.append(name)
            dropped = [n for n in removed if n in drop]
            for name in dropped:
                self.delete(self.steps, by_name[name].id)
            retired = [n for n in removed if n not in drop]
            for offset, name in enumerate(retired):  # ranked after the new version's steps; the phase stays
                self.update_step(by_name[name].id, position=len(steps) + offset)
            result = MigratedJob(tuple(added), tuple(dropped), tuple(retired))
            self.add_journal(job_id, None, job.state, job.state, 0, now, result.note(from_version, to_version))
            return result

    def prune(self, before: float, states: Sequence[str], dry_run: bool) -> int:
        """Delete (or with ``dry_run`` count) the jobs in ``states`` last updated before ``before``, with their rows."""
        chosen = set(states) & set(TERMINAL_JOB_STATES)
        with self.lock:
            doomed = {j.id for j in self.jobs.values() if j.state in chosen and j.updated_at < before}
            if dry_run:
                return len(doomed)
            with self.transaction():
                for job_id in doomed:
                    job = self.jobs[job_id]
                    self.delete(self.jobs, job_id)
                    self.delete(self.initial, job_id)
                    if job.key is not None:
                        self.delete(self.keys, (job.workflow, job.key))
                for table in (self.steps, self.messages):
                    for row_id in [i for i, row in table.items() if row.job_id in doomed]:
                        self.delete(table, row_id)
                for once_key in [k for k in self.once_records if k[0] in doomed]:
                    self.delete(self.once_records, once_key)
            # The journal last: a transaction's undo only truncates what it appended.
            self.journal_rows[:] = [r for r in self.journal_rows if r.job_id not in doomed]
        return len(doomed)


__all__ = ["Message", "Tables"]
