"""Group commit: parallel changes share one transaction, each caller returns after its own COMMIT."""

from __future__ import annotations

import threading
from typing import Any
import time

import pytest

from walstate import InjectedCrash, LeaseLost, StaleState
from walstate.substep import SubStep
from walstate.storage import Change, Store, faults

from .conftest import StatementLog
from .helpers import new_step, stored_state


class HoldFirstCommit(faults.Injector):
    """Keeps the first leader inside its transaction until ``waiting`` other callers have queued."""

    def __init__(self, store: Store, waiting: int, crash_second: bool = False) -> None:
        super().__init__()
        self.store, self.waiting, self.crash_second = store, waiting, crash_second
        self.commits = 0

    def hit(self, name: str) -> None:
        if name != "before_commit":
            return
        self.commits += 1
        if self.commits == 1:
            deadline = time.monotonic() + 10
            while len(self.store.write._queue) < self.waiting and time.monotonic() < deadline:
                time.sleep(0.001)
        elif self.commits == 2 and self.crash_second:
            raise InjectedCrash(name, 2)


def race(steps: list[SubStep], act: object) -> dict[str, BaseException | None]:
    results: dict[str, BaseException | None] = {}
    lock = threading.Lock()

    def run(step: SubStep) -> None:
        try:
            act(step)  # type: ignore[operator]
            # Returned: the change must already be visible to another connection.
            assert stored_state(step.job.write.path, step.id)[0] == step.state
            err = None
        except BaseException as exc:  # noqa: BLE001 - collected for the assertions
            err = exc
        with lock:
            results[step.name] = err

    first = threading.Thread(target=run, args=(steps[0],))
    first.start()
    while not steps[0].job.write._leader:
        time.sleep(0.0005)
    others = [threading.Thread(target=run, args=(s,)) for s in steps[1:]]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(20)
    return results


def test_parallel_changes_share_one_commit_and_each_returns_after_it(store: Store) -> None:
    steps = [new_step(store, f"s{i}") for i in range(8)]
    with HoldFirstCommit(store, waiting=7):
        results = race(steps, SubStep.start)
    assert results == {s.name: None for s in steps}
    assert store.write.batches == 2 and store.write.batched_requests == 8  # 1 + 7 in two commits
    assert all(stored_state(store.path, s.id) == ("running", 1) for s in steps)


def test_one_stale_change_fails_alone_and_the_rest_of_its_batch_commits(store: Store) -> None:
    steps = [new_step(store, f"s{i}") for i in range(5)]
    stale = steps[3]
    stale.state = "retrying"  # memory disagrees with the row: its CAS must miss
    with HoldFirstCommit(store, waiting=4):
        results = race(steps, SubStep.start)
    assert isinstance(results["s3"], StaleState)
    assert all(results[s.name] is None for s in steps if s is not stale)
    assert stored_state(store.path, stale.id) == ("pending", 0)
    assert all(stored_state(store.path, s.id) == ("running", 1) for s in steps if s is not stale)
    assert store.write.batches == 2


def test_a_crash_in_a_shared_commit_reaches_every_caller_and_commits_none_of_them(store: Store) -> None:
    steps = [new_step(store, f"s{i}") for i in range(4)]
    with HoldFirstCommit(store, waiting=3, crash_second=True):
        results = race(steps, SubStep.start)
    assert results["s0"] is None
    assert all(isinstance(results[s.name], InjectedCrash) for s in steps[1:])
    assert all(stored_state(store.path, s.id) == ("pending", 0) for s in steps[1:])
    assert all(s.state == "pending" for s in steps[1:])  # memory did not believe it


def test_a_lone_writer_commits_at_once_without_waiting_for_company(store: Store) -> None:
    step = new_step(store)
    for _ in range(50):
        step.retry(error="e") if step.state == "running" else step.start()
    # Each change led its own batch: nobody waited to be joined.
    assert store.write.batches == 50 and store.write.batched_requests == 50


@pytest.mark.parametrize("group", [True, False])
def test_group_commit_can_be_turned_off(db_path: str, group: bool) -> None:
    s = Store(db_path, group_commit=group)
    step = new_step(s)
    step.start()
    assert s.write.batches == (1 if group else 0)
    s.close()



def _commit_pairs(store: Store, stale: int | None,
                  log: StatementLog | None = None) -> tuple[list[SubStep], dict[int, BaseException | None]]:
    """Five callers each commit a step's start with its job's start (two changes), the last four in one batch.

    With ``stale``, that caller's second change expects a state its job is not in. ``log``
    records the statements of the writer connection they all commit on.
    """
    steps = [new_step(store, f"s{i}") for i in range(5)]
    results: dict[int, BaseException | None] = {}

    def run(i: int) -> None:
        s = steps[i]
        changes = [Change("step", s.id, s.job.id, s.name, "pending", "running", 1),
                   Change("job", s.job.id, s.job.id, None, "succeeded" if i == stale else "pending", "running")]
        try:
            store.write.commit(changes)
            results[i] = None
        except BaseException as exc:  # noqa: BLE001 - collected for the assertions
            results[i] = exc

    if log is not None:
        store.db.writer().set_trace_callback(log)
    with HoldFirstCommit(store, waiting=4):
        first = threading.Thread(target=run, args=(0,))
        first.start()
        while not store.write._leader:
            time.sleep(0.0005)
        others = [threading.Thread(target=run, args=(i,)) for i in range(1, 5)]
        for t in others:
            t.start()
        for t in [first, *others]:
            t.join(20)
    assert store.write.batches == 2
    return steps, results


@pytest.mark.sqlite_only  # counts SQLite's statements
def test_a_batch_whose_changes_all_apply_is_written_without_a_savepoint_per_caller(store: Store) -> None:
    log = StatementLog()
    steps, results = _commit_pairs(store, stale=None, log=log)
    assert results == {i: None for i in range(5)}
    assert log.count("SAVEPOINT") == 0 and log.count("COMMIT") == 2
    assert all(stored_state(store.path, s.id) == ("running", 1) for s in steps)


def test_a_caller_whose_second_change_misses_writes_neither_and_the_rest_of_its_batch_commits(store: Store) -> None:
    steps, results = _commit_pairs(store, stale=3)
    assert isinstance(results[3], StaleState)
    assert all(results[i] is None for i in range(5) if i != 3)
    # Its first change applied before the miss: taken back with it, while the others' stayed.
    assert stored_state(store.path, steps[3].id) == ("pending", 0)
    assert all(stored_state(store.path, s.id) == ("running", 1) for i, s in enumerate(steps) if i != 3)


def test_a_job_submitted_while_others_commit_is_created_in_their_next_commit(store: Store) -> None:
    step = new_step(store, "s0")
    created: list[int] = []

    def create() -> None:
        created.append(store.write.create_job("wf", None, "{}", [("a", "p", 0), ("b", "p", 1)])[0])

    with HoldFirstCommit(store, waiting=2):
        leader = threading.Thread(target=step.start)
        leader.start()
        while not store.write._leader:
            time.sleep(0.0005)
        others = [threading.Thread(target=create), threading.Thread(target=create)]
        for t in others:
            t.start()
        for t in [leader, *others]:
            t.join(20)
    # The start alone, then both jobs in one batch: three callers, two commits.
    assert store.write.batches == 2 and store.write.batched_requests == 3
    assert len(set(created)) == 2
    assert all([s.state for s in store.read.steps(job)] == ["pending", "pending"] for job in created)


# -- issue 16: few statements per batch, one writer connection -------------------------------


@pytest.mark.sqlite_only  # counts SQLite's statements
def test_a_batch_sends_its_step_updates_as_one_statement_and_its_journal_rows_as_another(store: Store) -> None:
    steps = [new_step(store, f"s{i}") for i in range(8)]
    log = StatementLog()
    store.db.writer().set_trace_callback(log)
    with HoldFirstCommit(store, waiting=7):
        results = race(steps, SubStep.start)
    assert results == {s.name: None for s in steps}
    # The lone first change row by row; the batch of seven in one UPDATE and one INSERT.
    assert log.count("UPDATE WALSTATE_STEP") == 2 and log.count("INSERT INTO WALSTATE_JOURNAL") == 2
    assert log.count("COMMIT") == 2
    assert all(stored_state(store.path, s.id) == ("running", 1) for s in steps)
    journal = [r[0] for r in store.db.writer().execute(
        "SELECT step FROM walstate_journal WHERE to_state='running' AND step IS NOT NULL ORDER BY id")]
    assert sorted(journal[1:]) == [f"s{i}" for i in range(1, 8)]


def test_a_change_from_a_run_that_lost_its_claim_fails_alone_in_a_shared_batch(store: Store) -> None:
    """The fence (owner and epoch) holds row by row inside a multi-row update too."""
    steps = [new_step(store, f"s{i}", owner="me") for i in range(5)]
    fenced = steps[2]
    fenced.job.epoch += 5  # this run believes in a claim the job no longer has
    with HoldFirstCommit(store, waiting=4):
        results = race(steps, SubStep.start)
    assert isinstance(results["s2"], LeaseLost)
    assert all(results[s.name] is None for s in steps if s is not fenced)
    assert stored_state(store.path, fenced.id) == ("pending", 0) and fenced.state == "pending"
    assert all(stored_state(store.path, s.id) == ("running", 1) for s in steps if s is not fenced)


def test_two_changes_of_one_step_in_a_batch_apply_in_their_order(store: Store) -> None:
    steps = [new_step(store, f"s{i}") for i in range(3)]
    log = StatementLog()
    store.db.writer().set_trace_callback(log)

    def start_and_retry(step: SubStep) -> None:
        s = step
        store.write.commit([
            Change("step", s.id, s.job.id, s.name, "pending", "running", 1),
            Change("step", s.id, s.job.id, s.name, "running", "retrying", 1, error="e", failures=1),
        ])
        s.state = "retrying"

    with HoldFirstCommit(store, waiting=2):
        results = race(steps, start_and_retry)
    assert results == {s.name: None for s in steps}
    assert log.count("SAVEPOINT") == 0  # written as it came, not rolled back and written again
    assert all(stored_state(store.path, s.id) == ("retrying", 1) for s in steps)
    for s in steps:
        rows = store.db.writer().execute(
            "SELECT from_state, to_state FROM walstate_journal WHERE job_id=? AND step=? ORDER BY id", (s.job.id, s.name))
        assert list(rows) == [("pending", "running"), ("running", "retrying")]


@pytest.mark.sqlite_only  # SQLite's connections
def test_walstate_writes_of_every_thread_go_through_one_shared_connection(store: Store) -> None:
    """So a commit finds the pages the last one wrote still cached, whichever thread wrote it."""
    log = StatementLog()
    store.db.writer().set_trace_callback(log)
    mine = store.db.connection()
    done: list[bool] = []

    def other_thread() -> None:
        assert store.db.writer() is writer
        new_step(store, "t").start()
        done.append(store.db.connection() is not mine)

    writer = store.db.writer()
    new_step(store, "m").start()
    t = threading.Thread(target=other_thread)
    t.start()
    t.join(20)
    assert done == [True]  # the other thread has a connection of its own, for its reads
    assert log.count("BEGIN IMMEDIATE") == 4 and log.count("COMMIT") == 4  # two creations, two starts


@pytest.mark.sqlite_only
def test_closing_the_store_closes_the_shared_writer_connection(db_path: str) -> None:
    import sqlite3

    s = Store(db_path)
    new_step(s).start()
    writer = s.db.writer()
    s.close()
    with pytest.raises(sqlite3.ProgrammingError):
        writer.execute("SELECT 1")


@pytest.mark.sqlite_only
def test_a_store_closed_from_a_thread_that_never_used_it_still_closes_the_writer(db_path: str) -> None:
    import sqlite3

    s = Store(db_path)
    new_step(s).start()
    writer = s.db.writer()
    t = threading.Thread(target=s.close)
    t.start()
    t.join(20)
    with pytest.raises(sqlite3.ProgrammingError):
        writer.execute("SELECT 1")


class CrashInSecondBatch(HoldFirstCommit):
    """HoldFirstCommit, then a crash at the first ``point`` of the second (shared, multi-row) batch."""

    def __init__(self, store: Store, waiting: int, point: str) -> None:
        super().__init__(store, waiting)
        self.point = point
        self.crashed = 0

    def hit(self, name: str) -> None:
        super().hit(name)
        # The first batch has committed (one before_commit) and the second is being written.
        if name == self.point and self.store.write.batches == 2 and self.crashed == 0:
            self.crashed += 1
            raise InjectedCrash(name, 1)


@pytest.mark.parametrize("point", ["after_update", "after_journal"])
def test_a_crash_inside_a_multi_row_batch_commits_none_of_its_changes(store: Store, point: str) -> None:
    """The fault points of a shared batch are reached once per change, inside its transaction."""
    steps = [new_step(store, f"s{i}") for i in range(4)]
    crash = CrashInSecondBatch(store, waiting=3, point=point)
    with crash:
        results = race(steps, SubStep.start)
    assert crash.crashed == 1
    assert results["s0"] is None
    assert all(isinstance(results[s.name], InjectedCrash) for s in steps[1:])
    assert all(stored_state(store.path, s.id) == ("pending", 0) for s in steps[1:])
    journal = store.db.writer().execute("SELECT count(*) FROM walstate_journal WHERE to_state='running'").fetchone()
    assert journal == (1,)


def test_busy_writers_share_commits_without_waiting_between_them(store: Store) -> None:
    """A leader of busy writers yields the GIL once to let them join (sleep(0)); it never sleeps on a timer.

    200 commits from 8 threads take tens of milliseconds; the bound is two orders of magnitude above.
    """
    steps = [new_step(store, f"s{i}") for i in range(8)]
    together = threading.Barrier(8)

    def churn(step: SubStep) -> None:
        together.wait(10)
        for _ in range(25):
            step.start() if step.state != "running" else step.retry(error="again")

    threads = [threading.Thread(target=churn, args=(s,)) for s in steps]
    batches, requests = store.write.batches, store.write.batched_requests
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert time.monotonic() - started < 10
    assert store.write.batched_requests - requests == 8 * 25  # every change of every thread committed once
    assert store.write.batches - batches < 8 * 25  # and some of them shared a commit


def _claim_beside_a_commit(store: Store, leader_step: SubStep, claim: Any, other: SubStep) -> None:
    """``leader_step`` starts and holds its commit until ``claim`` and ``other``'s start have queued behind it."""
    with HoldFirstCommit(store, waiting=2):
        leader = threading.Thread(target=leader_step.start)
        leader.start()
        while not store.write._leader:
            time.sleep(0.0005)
        others = [threading.Thread(target=claim), threading.Thread(target=other.start)]
        for t in others:
            t.start()
        for t in [leader, *others]:
            t.join(20)


def test_a_batch_claim_made_while_others_commit_is_written_in_their_next_commit(store: Store) -> None:
    """One commit (one fsync under ``full``) for the claim and the changes it arrived with."""
    step, second = new_step(store, "s0"), new_step(store, "s1")
    jobs = [store.write.create_job("wf", None, "{}", [("a", "p", 0)])[0] for _ in range(2)]
    claims: list[Any] = []

    def claim() -> None:
        claims.extend(store.write.claim_runnable(owner="w", lease_expires=time.time() + 60, limit=1,
                                                 workflows=["wf"], now=time.time(),
                                                 skip=[step.job.id, second.job.id]))

    _claim_beside_a_commit(store, step, claim, second)
    # The start alone, then the claim and the other start in one batch: two commits for three callers.
    assert store.write.batches == 2 and store.write.batched_requests == 3
    assert [c[3].job_id for c in claims] == [jobs[0]]
    row = store.db.writer().execute("SELECT state, owner, epoch FROM walstate_job WHERE id=?", (jobs[0],)).fetchone()
    assert row == ("running", "w", 1)
    journal = store.db.writer().execute(
        "SELECT note FROM walstate_journal WHERE job_id=? AND to_state='running'", (jobs[0],)).fetchall()
    assert journal == [("claimed",)]


def test_a_claim_that_finds_nothing_in_a_shared_batch_claims_nothing_and_fails_nobody(store: Store) -> None:
    step, other = new_step(store, "s0"), new_step(store, "s1")
    claims: list[Any] = [None]

    def claim() -> None:
        claims[0] = store.write.claim_runnable(owner="w", lease_expires=time.time() + 60, limit=4,
                                               workflows=["nothing-here"], now=time.time())

    _claim_beside_a_commit(store, step, claim, other)
    assert claims == [[]]
    assert store.write.batches == 2 and store.write.batched_requests == 3  # the claim was in the batch
    assert stored_state(store.path, other.id) == ("running", 1)


def test_a_crash_while_a_batch_is_written_again_row_by_row_commits_none_of_it(store: Store) -> None:
    """One stale change sends its batch to the row-by-row path; a crash there still takes all of it back."""
    steps = [new_step(store, f"s{i}") for i in range(4)]
    steps[2].state = "retrying"  # its CAS misses: the shared batch is written again, request by request
    with HoldFirstCommit(store, waiting=3, crash_second=True):
        results = race(steps, SubStep.start)
    assert results["s0"] is None
    assert all(isinstance(results[s.name], InjectedCrash) for s in steps[1:])
    assert all(stored_state(store.path, s.id) == ("pending", 0) for s in steps[1:])


@pytest.mark.sqlite_only
def test_with_group_commit_off_writes_still_go_through_the_shared_writer(db_path: str) -> None:
    s = Store(db_path, group_commit=False)
    try:
        step = new_step(s)
        log = StatementLog()
        s.db.writer().set_trace_callback(log)
        step.start()
        assert log.count("BEGIN IMMEDIATE") == 1 and log.count("UPDATE WALSTATE_STEP") == 1
    finally:
        s.close()
