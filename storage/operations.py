"""The contract's operations for SQL stores, written once for SQLite and PostgreSQL.

:class:`SqlOperations` is what :class:`.store.Store` and
:class:`.postgres.PgStore` have in common: every operation of
:class:`.contract.Storage` over the store's :class:`.reads.Reader` (reads),
:class:`.writepath.WritePath` (fenced writes, group commit, retries),
:mod:`.versions` (job migration) and :mod:`.retention` (prune). A store
supplies those four attributes; the dialect lives in its database object.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from . import retention, versions
from .connection import WriteLocked
from .reads import Reader
from .types import Change, Claimed, JobRow, JournalRow, MigratedJob, StepCount, StepRow
from .writepath import WritePath


class SqlOperations:
    """The operations of :class:`~.contract.Storage` on a SQL database (see the protocol for each promise)."""

    path: str
    db: WriteLocked
    read: Reader
    write: WritePath

    # -- settings ----------------------------------------------------------------------

    @property
    def patience(self) -> float:
        return self.write.retry.patience

    @property
    def handle(self) -> Any:
        return self.db

    def configure(self, *, patience: float, hold_warning: float | None, idle_limit: float) -> None:
        retry = self.write.retry
        retry.patience = patience
        retry.claim_patience = float("inf")  # a fenced write waits until its claim is lost or the store stops
        self.write.hold_warning = hold_warning
        self.write.limit_idle_transactions(idle_limit)

    def stop_retrying(self) -> None:
        self.write.retry.stop()

    def transaction_active(self) -> bool:
        return self.db.transaction_depth() > 0

    def transient_refusal(self, exc: BaseException) -> Exception | None:
        return self.write.transient_refusal(exc)

    # -- reads -------------------------------------------------------------------------

    def job(self, job_id: int) -> JobRow | None:
        return self.read.job(job_id)

    def jobs(self, *, state: str | None = None, workflow: str | None = None, limit: int | None = None,
             offset: int = 0) -> list[JobRow]:
        return self.read.jobs(state=state, workflow=workflow, limit=limit, offset=offset)

    def steps(self, job_id: int) -> list[StepRow]:
        return self.read.steps(job_id)

    def step_counts(self, job_ids: Sequence[int]) -> list[StepCount]:
        return self.read.step_counts(job_ids)

    def journal(self, job_id: int, step: str | None = None) -> list[JournalRow]:
        return self.read.journal(job_id, step)

    def unfinished_jobs(self) -> list[JobRow]:
        return self.read.unfinished_jobs()

    def once(self, job_id: int, step: str, name: str) -> str | None:
        return self.read.once(job_id, step, name)

    def cancel_requested(self, job_ids: Sequence[int]) -> set[int]:
        return self.read.cancel_requested(job_ids)

    def owned_unfinished(self) -> list[tuple[int, int, str, str, float | None]]:
        return self.read.owned_unfinished()

    def runnable_exists(self, workflows: Sequence[str], now: float, skip: Sequence[int] = (),
                        versions: Sequence[tuple[str, int]] = ()) -> bool:
        return self.read.runnable_exists(workflows, now, skip, versions)

    def next_wake(self, workflows: Sequence[str], versions: Sequence[tuple[str, int]] = ()) -> float | None:
        return self.read.next_wake(workflows, versions)

    def message_topics(self, job_id: int) -> set[str]:
        return self.read.message_topics(job_id)

    def schedule_slot(self, name: str) -> float | None:
        return self.read.schedule_slot(name)

    def data_version(self) -> int:
        return self.read.data_version()

    # -- making jobs -------------------------------------------------------------------

    def create_job(self, workflow: str, key: str | None, context: str, steps: Sequence[tuple[str, str, int]],
                   version: int = 1, fingerprint: str | None = None) -> tuple[int, str | None]:
        return self.write.create_job(workflow, key, context, steps, version, fingerprint)

    def create_scheduled(self, schedule: str, slot: float, workflow: str, key: str, context: str,
                         steps: Sequence[tuple[str, str, int]], version: int = 1,
                         fingerprint: str | None = None) -> int | None:
        return self.write.create_scheduled(schedule, slot, workflow, key, context, steps, version, fingerprint)

    def pass_slot(self, schedule: str, slot: float) -> bool:
        return self.write.pass_slot(schedule, slot)

    # -- claims ------------------------------------------------------------------------

    def claim(self, job_id: int, *, state: str, epoch: int, owner: str, lease_expires: float,
              note: str) -> Claimed | None:
        return self.write.claim(job_id, state=state, epoch=epoch, owner=owner, lease_expires=lease_expires, note=note)

    def claim_runnable(self, *, owner: str, lease_expires: float, limit: int, workflows: Sequence[str], now: float,
                       dead: Sequence[tuple[int, int]] = (), skip: Sequence[int] = (),
                       limits: dict[str, int] | None = None,
                       versions: Sequence[tuple[str, int]] = ()) -> list[tuple[str, str, str | None, Claimed]]:
        return self.write.claim_runnable(owner=owner, lease_expires=lease_expires, limit=limit, workflows=workflows,
                                         now=now, dead=dead, skip=skip, limits=limits, versions=versions)

    def renew(self, job_id: int, owner: str, epoch: int, lease_expires: float) -> bool | None:
        return self.write.renew(job_id, owner, epoch, lease_expires)

    def release(self, job_id: int, owner: str, epoch: int, note: str, *, undo_start: bool = False,
                patience: float | None = None) -> bool:
        return self.write.release(job_id, owner, epoch, note, undo_start=undo_start, patience=patience)

    def force_release(self, job_id: int, note: str) -> tuple[str, int] | None:
        return self.write.force_release(job_id, note)

    def park(self, job_id: int, owner: str, epoch: int, wake_at: float, topics: Sequence[str], note: str, *,
             patience: float | None = None) -> bool:
        return self.write.park(job_id, owner, epoch, wake_at, topics, note, patience=patience)

    # -- moves -------------------------------------------------------------------------

    def commit(self, changes: Sequence[Change] = (), effect: Callable[[], Sequence[Change]] | None = None) -> None:
        self.write.commit(changes, effect)

    def once_lookup(self, job_id: int, step: str, name: str, owner: str | None, epoch: int) -> str | None:
        return self.write.once_lookup(job_id, step, name, owner, epoch)

    def record_once(self, job_id: int, step: str, name: str, result: str, *, owner: str | None = None,
                    epoch: int | None = None) -> str:
        return self.write.record_once(job_id, step, name, result, owner=owner, epoch=epoch)

    def send(self, job_id: int, topic: str, payload: str, key: str | None) -> tuple[int, bool]:
        return self.write.send(job_id, topic, payload, key)

    def consume(self, job_id: int, step: str, name: str, topic: str, owner: str | None, epoch: int) -> str | None:
        return self.write.consume(job_id, step, name, topic, owner, epoch)

    def request_cancel(self, job_id: int) -> bool:
        return self.write.request_cancel(job_id)

    def migrate_job(self, job_id: int, workflow: str, *, epoch: int, from_version: int, to_version: int,
                    fingerprint: str, steps: Sequence[tuple[str, str, int]], drop: Sequence[str],
                    context: Callable[[str], str]) -> MigratedJob | None:
        return versions.migrate_job(self.db, self.path, job_id, workflow, epoch=epoch, from_version=from_version,
                                    to_version=to_version, fingerprint=fingerprint, steps=steps, drop=drop,
                                    context=context)

    def prune(self, older_than: float, states: Sequence[str], *, batch: int, dry_run: bool = False) -> int:
        return retention.prune(self.db, self.path, older_than, states, batch=batch, dry_run=dry_run)
