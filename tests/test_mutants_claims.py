"""Tests written for the mutants of the write path's claims and ``once()`` records that survived the rest of the suite.

``make mutmut`` mutates ``WritePath.claim``, ``claim_runnable``, ``once_lookup``
and ``record_once``; each test here kills mutants no other test noticed:
which fault points a claim or a record passes (the crash suites plan their
crashes by them), what a refused or failed statement raises, what a lost
claim is told. Real SQLite files throughout; a refusal is another connection
holding the file's writer while a store opened with ``busy_timeout=0`` writes.
"""

from __future__ import annotations

import logging
import math
import re
import sqlite3
from collections.abc import Callable, Iterator

import pytest
from pydantic import BaseModel

from walstate.storage.postgres import PgStore
from walstate import DatabaseBusy, Engine, InjectedCrash, LeaseLost, StepContext, Workflow
from walstate.storage import Store, faults
from walstate.storage.contract import open_store
from walstate.storage.errors import WriteFailed
from walstate.storage.types import JobRow

from .test_mutants_retrying import Holder, terminate_sessions

LOGGER = "walstate.storage"
#: Every fault point a write that claims one job passes, once each, in this order.
CLAIM_POINTS = ["before_begin", "after_update", "after_journal", "before_commit", "after_commit"]


class Ctx(BaseModel):
    n: int = 0


def pending_job(db_path: str, workflow: str = "w") -> int:
    flow = Workflow(workflow, context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def only(ctx: Ctx, step: StepContext) -> None:
        pass

    with Engine(db_path) as e:
        e.register(flow)
        return int(e.submit(workflow, Ctx()))


def row_of(store: Store, job: int) -> JobRow:
    row = store.read.job(job)
    assert row is not None
    return row


def claim(store: Store, job: int, owner: str = "me") -> int:
    row = row_of(store, job)
    claimed = store.write.claim(job, state=row.state, epoch=row.epoch, owner=owner, lease_expires=1e12, note="test")
    assert claimed is not None
    return claimed.epoch


@pytest.fixture
def store(db_path: str) -> Iterator[Store]:
    s = Store(db_path, busy_timeout=0.0)
    yield s
    s.close()


class Hits(faults.Injector):
    """An injector that also keeps the order in which points were hit."""

    def __init__(self, crash: faults.Crash | None = None) -> None:
        super().__init__(crash)
        self.order: list[str] = []

    def hit(self, name: str) -> None:
        self.order.append(name)
        super().hit(name)

    def __enter__(self) -> Hits:
        super().__enter__()
        return self


class OnRefusal(logging.Handler):
    """Keeps every walstate.storage record; on the first 'was refused' one, calls ``then()`` (on the write's thread)."""

    def __init__(self, then: Callable[[], None]) -> None:
        super().__init__(logging.DEBUG)
        self.then = then
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if " was refused " in record.getMessage() and len(self.messages) == 1:
            self.then()


@pytest.fixture
def refusing(store: Store) -> Iterator[tuple[Holder, OnRefusal]]:
    """The holder (not yet holding: call ``hold()``) and a handler that lets it go at the first refusal."""
    holder = Holder(store.path)
    holder.release()
    handler = OnRefusal(holder.release)
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield holder, handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        holder.close()


def hold(holder: Holder) -> None:
    holder.conn.execute("BEGIN IMMEDIATE")
    holder.held = True


def drop(db_path: str, table: str) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute(f"DROP TABLE {table}")
    finally:
        conn.close()


# -- claim() ---------------------------------------------------------------------------------------


def test_a_claim_passes_each_of_its_fault_points_once_and_a_missed_claim_stops_after_its_update(
        db_path: str, store: Store) -> None:
    job = pending_job(db_path)
    row = row_of(store, job)
    with Hits() as hits:
        missed = store.write.claim(job, state=row.state, epoch=row.epoch + 1, owner="me", lease_expires=1e12, note="n")
    assert missed is None
    assert hits.order == ["before_begin", "after_update"]  # nothing committed: no after_commit
    with Hits() as hits:
        claimed = store.write.claim(job, state=row.state, epoch=row.epoch, owner="me", lease_expires=1e12, note="n")
    assert claimed is not None and claimed.epoch == row.epoch + 1
    assert hits.order == CLAIM_POINTS


def test_a_claim_crashed_before_it_begins_claims_nothing_and_one_crashed_after_its_commit_holds(
        db_path: str, store: Store) -> None:
    job = pending_job(db_path)
    row = row_of(store, job)
    with faults.Injector(faults.Crash("before_begin", 1)):
        with pytest.raises(InjectedCrash):
            store.write.claim(job, state=row.state, epoch=row.epoch, owner="me", lease_expires=1e12, note="n")
    assert (row_of(store, job).owner, row_of(store, job).epoch) == (None, row.epoch)
    with faults.Injector(faults.Crash("after_commit", 1)):
        with pytest.raises(InjectedCrash):
            store.write.claim(job, state=row.state, epoch=row.epoch, owner="me", lease_expires=1e12, note="n")
    after = row_of(store, job)
    assert (after.state, after.owner, after.epoch) == ("running", "me", row.epoch + 1)


def test_a_claim_refused_busy_waits_for_the_patience_of_unfenced_writes_not_a_runs_claim_patience(
        db_path: str, store: Store, refusing: tuple[Holder, OnRefusal]) -> None:
    holder, handler = refusing
    job = pending_job(db_path)
    store.write.retry.patience = 30.0
    store.write.retry.claim_patience = 0.0  # a claim is no run's write yet: this does not apply
    hold(holder)
    epoch = claim(store, job)
    assert epoch == 1
    first, last = handler.messages
    assert first.startswith(f"{store.path}: claiming job {job} was refused (") and first.endswith(
        "); trying again (for up to 30s)"), first
    assert last.startswith(f"{store.path}: claiming job {job} written after 2 attempts over "), last


def test_a_claim_returns_the_job_as_it_found_it_and_journals_itself(db_path: str, store: Store) -> None:
    job = pending_job(db_path)
    assert store.write.request_cancel(job)
    row = row_of(store, job)
    claimed = store.write.claim(job, state="pending", epoch=row.epoch, owner="me", lease_expires=1e12, note="by me")
    assert claimed is not None
    assert (claimed.epoch, claimed.context, claimed.cancel_requested) == (row.epoch + 1, '{"n":0}', True)
    assert claimed.steps == store.read.steps(job) and [s.name for s in claimed.steps] == ["only"]
    last = store.read.journal(job)[-1]
    assert (last.step, last.from_state, last.to_state, last.attempt, last.note) == (None, "pending", "running", 0,
                                                                                     "by me")


# -- claim_runnable() ------------------------------------------------------------------------------


def test_a_batch_claim_passes_each_of_its_fault_points_once_and_one_that_finds_nothing_only_begins(
        db_path: str, store: Store) -> None:
    job = pending_job(db_path)
    with Hits() as hits:
        assert store.write.claim_runnable(owner="me", lease_expires=1e12, limit=1, workflows=["other"], now=0.0) == []
    assert hits.order == ["before_begin"]
    with Hits() as hits:
        got = store.write.claim_runnable(owner="me", lease_expires=1e12, limit=1, workflows=["w"], now=0.0)
    assert [(g[0], g[1], g[2], g[3].job_id) for g in got] == [("w", "pending", None, job)]
    assert hits.order == CLAIM_POINTS


def test_a_batch_claim_of_no_jobs_or_of_no_workflows_touches_nothing(db_path: str, store: Store) -> None:
    job = pending_job(db_path)
    for limit, workflows in ((0, ["w"]), (-1, ["w"]), (1, [])):
        with Hits() as hits:
            assert store.write.claim_runnable(owner="me", lease_expires=1e12, limit=limit, workflows=workflows,
                                              now=0.0) == []
        assert hits.order == [], (limit, workflows)
    assert row_of(store, job).owner is None
    # One job is a batch too.
    [(_, _, _, got)] = store.write.claim_runnable(owner="me", lease_expires=1e12, limit=1, workflows=["w"], now=0.0)
    assert got.job_id == job and row_of(store, job).owner == "me"


def test_a_batch_claim_crashed_before_its_commit_claims_nothing_and_one_crashed_after_it_holds(
        db_path: str, store: Store) -> None:
    job = pending_job(db_path)
    with faults.Injector(faults.Crash("before_commit", 1)):
        with pytest.raises(InjectedCrash):
            store.write.claim_runnable(owner="me", lease_expires=1e12, limit=1, workflows=["w"], now=0.0)
    assert (row_of(store, job).owner, row_of(store, job).epoch) == (None, 0)
    with faults.Injector(faults.Crash("after_commit", 1)):
        with pytest.raises(InjectedCrash):
            store.write.claim_runnable(owner="me", lease_expires=1e12, limit=1, workflows=["w"], now=0.0)
    after = row_of(store, job)
    assert (after.state, after.owner, after.epoch) == ("running", "me", 1)


def test_a_batch_claim_refused_busy_raises_database_busy_saying_it_was_claiming_runnable_jobs(
        db_path: str, store: Store, refusing: tuple[Holder, OnRefusal]) -> None:
    holder, handler = refusing
    job = pending_job(db_path)
    hold(holder)
    with pytest.raises(DatabaseBusy) as caught:
        store.write.claim_runnable(owner="me", lease_expires=1e12, limit=1, workflows=["w"], now=0.0)
    assert str(caught.value).startswith(f"{store.path}: database is locked by another connection (")
    assert " while claiming runnable jobs; retry, or raise busy_timeout" in str(caught.value), caught.value
    assert caught.value.path == store.path
    assert holder.held and handler.messages == []
    holder.release()
    assert row_of(store, job).owner is None


def test_a_batch_claim_given_versions_takes_only_jobs_of_those_versions(db_path: str, store: Store) -> None:
    job = pending_job(db_path)
    assert row_of(store, job).version == 1
    for versions in ([("w", 2)], [("other", 1)]):
        assert store.write.claim_runnable(owner="me", lease_expires=1e12, limit=1, workflows=["w"], now=0.0,
                                          versions=versions) == [], versions
    assert row_of(store, job).owner is None
    [(_, _, _, got)] = store.write.claim_runnable(owner="me", lease_expires=1e12, limit=1, workflows=["w"], now=0.0,
                                                  versions=[("w", 2), ("w", 1)])
    assert (got.job_id, got.version) == (job, 1)


# -- once_lookup() ---------------------------------------------------------------------------------


def test_once_lookup_returns_the_stored_text_of_a_record_and_none_without_one(db_path: str, store: Store) -> None:
    job = pending_job(db_path)
    epoch = claim(store, job)
    assert store.write.once_lookup(job, "only", "x", "me", epoch) is None
    assert store.write.record_once(job, "only", "x", '{"a": 1}', owner="me", epoch=epoch) == '{"a": 1}'
    assert store.write.once_lookup(job, "only", "x", "me", epoch) == '{"a": 1}'
    assert store.write.once_lookup(job, "only", "y", "me", epoch) is None
    assert store.write.once_lookup(job, "other", "x", "me", epoch) is None


def test_once_lookup_of_a_run_that_lost_its_claim_says_so_and_returns_nothing(db_path: str, store: Store) -> None:
    job = pending_job(db_path)
    epoch = claim(store, job)
    store.write.record_once(job, "only", "x", "1", owner="me", epoch=epoch)
    for owner, at in (("me", epoch - 1), ("someone else", epoch)):
        with pytest.raises(LeaseLost) as lost:
            store.write.once_lookup(job, "only", "x", owner, at)
        assert str(lost.value) == (f"{store.path}: job {job}: this run lost its claim on the job (claim epoch {at} "
                                   "is over); once('x') of step 'only' was not called")


def test_once_lookup_that_fails_names_the_file_and_the_record_it_was_reading(db_path: str, store: Store) -> None:
    job = pending_job(db_path)
    epoch = claim(store, job)
    drop(db_path, "walstate_once")
    with pytest.raises(WriteFailed) as failed:
        store.write.once_lookup(job, "only", "x", "me", epoch)
    assert str(failed.value) == (f"{store.path}: SQLite error while reading once('x') of step 'only': "
                                 "no such table: walstate_once")
    assert failed.value.path == store.path
    assert isinstance(failed.value.__cause__, sqlite3.OperationalError)


# -- record_once() ---------------------------------------------------------------------------------


def test_record_once_passes_its_two_fault_points_around_the_write(db_path: str, store: Store) -> None:
    job = pending_job(db_path)
    epoch = claim(store, job)
    with Hits() as hits:
        store.write.record_once(job, "only", "x", "1", owner="me", epoch=epoch)
    assert hits.order == ["before_once_record", "after_once_record"]
    with faults.Injector(faults.Crash("before_once_record", 1)):
        with pytest.raises(InjectedCrash):
            store.write.record_once(job, "only", "y", "2", owner="me", epoch=epoch)
    assert store.write.once_lookup(job, "only", "y", "me", epoch) is None
    with faults.Injector(faults.Crash("after_once_record", 1)):
        with pytest.raises(InjectedCrash):
            store.write.record_once(job, "only", "z", "3", owner="me", epoch=epoch)
    assert store.write.once_lookup(job, "only", "z", "me", epoch) == "3"


def test_record_once_keeps_the_first_result_and_returns_it_to_every_later_caller(db_path: str, store: Store) -> None:
    job = pending_job(db_path)
    epoch = claim(store, job)
    assert store.write.record_once(job, "only", "x", "1", owner="me", epoch=epoch) == "1"
    assert store.write.record_once(job, "only", "x", "2", owner="me", epoch=epoch) == "1"
    # Unfenced (no epoch): stored whoever holds the job, for another name; the first still wins.
    assert store.write.record_once(job, "only", "y", "3") == "3"
    assert store.write.record_once(job, "only", "y", "4", owner="nobody") == "3"
    assert store.write.record_once(job, "other", "x", "5", owner="me", epoch=epoch) == "5"


def test_record_once_of_a_run_that_lost_its_claim_stores_nothing_and_says_so(db_path: str, store: Store) -> None:
    job = pending_job(db_path)
    epoch = claim(store, job)
    for owner, at in (("me", epoch - 1), ("someone else", epoch), (None, epoch)):
        with pytest.raises(LeaseLost) as lost:
            store.write.record_once(job, "only", "x", "1", owner=owner, epoch=at)
        assert str(lost.value) == (f"{store.path}: job {job}: this run lost its claim on the job (claim epoch {at} "
                                   "is over); the result of once('x') of step 'only' is not recorded")
    assert store.write.once_lookup(job, "only", "x", "me", epoch) is None


def test_record_once_that_fails_names_the_file_and_the_record_it_was_writing(db_path: str, store: Store) -> None:
    job = pending_job(db_path)
    epoch = claim(store, job)
    drop(db_path, "walstate_once")
    with pytest.raises(WriteFailed) as failed:
        store.write.record_once(job, "only", "x", "1", owner="me", epoch=epoch)
    assert str(failed.value) == (f"{store.path}: SQLite error while recording once('x') of step 'only': "
                                 "no such table: walstate_once")
    assert failed.value.path == store.path


def test_record_once_refused_busy_keeps_trying_under_the_runs_claim_patience(
        db_path: str, store: Store, refusing: tuple[Holder, OnRefusal]) -> None:
    holder, handler = refusing
    job = pending_job(db_path)
    epoch = claim(store, job)
    store.write.retry.patience = 0.0
    store.write.retry.claim_patience = math.inf
    hold(holder)
    assert store.write.record_once(job, "only", "x", "7", owner="me", epoch=epoch) == "7"
    first, last = handler.messages
    doing = f"recording once('x') of step 'only' of job {job}"
    assert first.startswith(f"{store.path}: {doing} was refused (") and first.endswith(
        "); trying again (the run keeps its claim)"), first
    assert re.fullmatch(rf"{re.escape(store.path)}: {re.escape(doing)} written after 2 attempts over \d+\.\ds",
                        last), last
    assert store.write.once_lookup(job, "only", "x", "me", epoch) == "7"


@pytest.mark.postgres
def test_a_once_record_whose_session_was_lost_is_written_again_on_a_new_one(pg_database: str) -> None:
    # Safe to repeat after a lost session (lost_ok): a record that landed is found by the second attempt's
    # ON CONFLICT DO NOTHING, which returns it. SQLite never loses a session: PostgreSQL only.
    job = pending_job(pg_database)
    store = PgStore(pg_database)  # its write path and reader themselves, not the contract's operations
    try:
        store.write.retry.claim_patience = 30.0  # an engine's is infinite; a bare store's 0 retries nothing
        row = store.read.job(job)
        assert row is not None
        claimed = store.write.claim(job, state=row.state, epoch=row.epoch, owner="me", lease_expires=1e12, note="t")
        assert claimed is not None
        terminate_sessions(pg_database)
        assert store.write.record_once(job, "only", "x", "1", owner="me", epoch=claimed.epoch) == "1"
        assert store.write.once_lookup(job, "only", "x", "me", claimed.epoch) == "1"
    finally:
        store.close()
