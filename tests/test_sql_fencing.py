"""Every owner and epoch condition of the SQL refuses a superseded run's write, each on its own.

Issue 26, item 13: mutmut never mutates SQL, and weakened by hand (``AND epoch=?`` -> ``AND
(epoch=? OR 1=1)``) the fencing of ``claim``, ``renew``, ``release``, message consumption and
more survived the suite, because the runs above them stop for other reasons first. These tests
call each write of the storage contract directly with a stale owner or a stale epoch (what a run
that was stopped, superseded and continued holds) and check that nothing is written.
``tests/sql_mutants.py`` (run by ``make mutmut``) weakens each condition in turn and runs these.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from pydantic import BaseModel

from walstate import Engine, LeaseLost, StepContext, UnknownJob, Workflow
from walstate.storage import Change
from walstate.storage.contract import Storage, open_store
from walstate.storage.postgres import is_postgres_url
from walstate.storage.reads import JobRow
from walstate.storage.versions import migrate_job

pytestmark = pytest.mark.backends

ME, OTHER = "owner-me", "owner-other"


class Ctx(BaseModel):
    n: int = 0


def flow() -> Workflow[Ctx]:
    w = Workflow("w", context=Ctx, phases=["p"])

    @w.step(phase="p")
    def only(ctx: Ctx, step: StepContext) -> None:
        step.wait_for("go")

    return w


@pytest.fixture
def store(db_path: str) -> Iterator[Storage]:
    with Engine(db_path) as e:
        e.register(flow())
    s = open_store(db_path)
    yield s
    s.close()


def new_job(db_path: str) -> int:
    with Engine(db_path) as e:
        e.register(flow())
        return int(e.submit("w", Ctx()))


def row(store: Storage, job: int) -> JobRow:
    r = store.read.job(job)
    assert r is not None
    return r


def take(store: Storage, job: int, owner: str) -> int:
    """Claim the job for ``owner`` (whoever held it); return the new epoch."""
    r = row(store, job)
    claimed = store.write.claim(job, state=r.state, epoch=r.epoch, owner=owner, lease_expires=1e12, note="test")
    assert claimed is not None
    return claimed.epoch


@pytest.fixture
def superseded(db_path: str, store: Storage) -> tuple[int, int, int]:
    """A job ME claimed at epoch ``old``, then OTHER at ``new``: ``(job, old, new)``."""
    job = new_job(db_path)
    old = take(store, job, ME)
    new = take(store, job, OTHER)
    return job, old, new


def step_change(store: Storage, job: int, owner: str, epoch: int) -> Change:
    s = store.read.steps(job)[0]
    return Change("step", s.id, job, s.name, s.state, "running" if s.state == "pending" else "succeeded",
                  s.attempt + 1, owner, epoch, note="test")


@pytest.mark.parametrize("stale", ["owner", "epoch"])
def test_a_step_change_under_a_stale_owner_or_epoch_is_refused_and_writes_nothing(
        store: Storage, superseded: tuple[int, int, int], stale: str) -> None:
    job, old, new = superseded
    owner, epoch = (ME, new) if stale == "owner" else (OTHER, old)
    before = store.read.steps(job)
    with pytest.raises(LeaseLost):
        store.write.commit([step_change(store, job, owner, epoch)])
    assert store.read.steps(job) == before
    store.write.commit([step_change(store, job, OTHER, new)])  # the holder's own change is written
    assert store.read.steps(job)[0].state == "running"


@pytest.mark.sqlite_only
@pytest.mark.parametrize("stale", ["owner", "epoch"])
def test_a_stale_step_change_sharing_a_batch_with_others_fails_alone(
        db_path: str, store: Storage, superseded: tuple[int, int, int], stale: str) -> None:
    # Several callers' changes in one transaction go out as one multi-row UPDATE (SQLite): its
    # fence must refuse the stale row while the others commit.
    from walstate.storage.writepath import _Request

    job, old, new = superseded
    fresh = new_job(db_path)
    epoch = take(store, fresh, OTHER)
    owner, stale_epoch = (ME, new) if stale == "owner" else (OTHER, old)
    bad, good = (_Request([step_change(store, job, owner, stale_epoch)]),
                 _Request([step_change(store, fresh, OTHER, epoch)]))
    with store.write._lock:
        store.write._write_batch([bad, good])
    assert isinstance(bad.error, LeaseLost), bad.error
    assert good.error is None
    assert store.read.steps(job)[0].state == "pending" and store.read.steps(fresh)[0].state == "running"


@pytest.mark.parametrize("release", [False, True])
@pytest.mark.parametrize("stale", ["owner", "epoch"])
def test_a_job_change_under_a_stale_owner_or_epoch_is_refused_with_or_without_its_release(
        store: Storage, superseded: tuple[int, int, int], stale: str, release: bool) -> None:
    job, old, new = superseded
    owner, epoch = (ME, new) if stale == "owner" else (OTHER, old)
    change = Change("job", job, job, None, "running", "cancelled", 0, owner, epoch, note="test", release=release)
    with pytest.raises(LeaseLost):
        store.write.commit([change])
    r = row(store, job)
    assert (r.state, r.owner, r.epoch) == ("running", OTHER, new)


@pytest.mark.parametrize("stale", ["owner", "epoch"])
def test_renew_release_and_park_under_a_stale_owner_or_epoch_change_nothing(
        store: Storage, superseded: tuple[int, int, int], stale: str) -> None:
    job, old, new = superseded
    owner, epoch = (ME, new) if stale == "owner" else (OTHER, old)
    before = row(store, job)
    assert store.write.renew(job, owner, epoch, 5.0) is None
    assert not store.write.release(job, owner, epoch, "test")
    assert not store.write.park(job, owner, epoch, 5.0, ["go"], "test")
    after = row(store, job)
    assert (after.owner, after.epoch, after.lease_expires, after.wake_at) == (OTHER, new, before.lease_expires, None)
    assert store.write.renew(job, OTHER, new, 5.0) is False  # the holder's own renewal is written
    assert row(store, job).lease_expires == 5.0


@pytest.mark.parametrize("stale", ["owner", "epoch"])
def test_a_wait_under_a_stale_owner_or_epoch_consumes_no_message(
        store: Storage, superseded: tuple[int, int, int], stale: str) -> None:
    job, old, new = superseded
    owner, epoch = (ME, new) if stale == "owner" else (OTHER, old)
    store.write.send(job, "go", '{"x": 1}', None)
    with pytest.raises(LeaseLost):
        store.write.consume(job, "only", "wait:go", "go", owner, epoch)
    assert store.read.message_topics(job) == {"go"}  # still there for the run that holds the job
    assert store.write.consume(job, "only", "wait:go", "go", OTHER, new) == '{"x": 1}'
    assert store.read.message_topics(job) == set()


def stored_once(store: Storage, job: int) -> list[tuple[str, str]]:
    return [(str(r[0]), str(r[1])) for r in
            store.db.raw().execute("SELECT name, result FROM walstate_once WHERE job_id=?", (job,)).fetchall()]


@pytest.mark.parametrize("stale", ["owner", "epoch"])
def test_a_once_lookup_or_record_under_a_stale_owner_or_epoch_is_refused_and_stores_nothing(
        store: Storage, superseded: tuple[int, int, int], stale: str) -> None:
    # Issue 26, item 2: the stale run learns nothing (not even the live run's value) and stores nothing.
    job, old, new = superseded
    owner, epoch = (ME, new) if stale == "owner" else (OTHER, old)
    with pytest.raises(LeaseLost):
        store.write.once_lookup(job, "only", "charge", owner, epoch)
    with pytest.raises(LeaseLost):
        store.write.record_once(job, "only", "charge", '"stale"', owner=owner, epoch=epoch)
    assert stored_once(store, job) == []
    # The holder's own lookup finds nothing yet, its record is stored, and the stale run still learns nothing.
    assert store.write.once_lookup(job, "only", "charge", OTHER, new) is None
    assert store.write.record_once(job, "only", "charge", '"live"', owner=OTHER, epoch=new) == '"live"'
    assert store.write.once_lookup(job, "only", "charge", OTHER, new) == '"live"'
    with pytest.raises(LeaseLost):
        store.write.once_lookup(job, "only", "charge", owner, epoch)
    assert stored_once(store, job) == [("charge", '"live"')]



def test_force_release_takes_the_claim_from_its_holder_whoever_it_is_and_journals_whom_from(
        db_path: str, store: Storage, superseded: tuple[int, int, int]) -> None:
    job, old, new = superseded
    store.write.renew(job, OTHER, new, 1e12)
    assert store.write.force_release(job, "released by a test") == (OTHER, new)
    after = row(store, job)
    assert (after.state, after.owner, after.lease_expires, after.epoch) == ("running", None, None, new + 1)
    last = store.read.journal(job)[-1]
    assert (last.step, last.from_state, last.to_state, last.attempt) == (None, "running", "running", 0)
    assert last.note == f"released by a test (taken from {OTHER}, epoch {new})"
    # The holder's writes are refused now, and a claim of the runnable job is anyone's.
    assert store.write.renew(job, OTHER, new, 1e12) is None
    journal = store.read.journal(job)
    assert store.write.force_release(job, "again") is None  # nobody holds it: nothing is journalled
    assert store.read.journal(job) == journal
    [(_, _, prior, got)] = store.write.claim_runnable(owner=ME, lease_expires=1e12, limit=1, workflows=["w"], now=0.0)
    assert prior is None and got.job_id == job and got.epoch == new + 2
    with pytest.raises(UnknownJob, match="no job 1000000"):
        store.write.force_release(10**6, "missing")


def test_force_release_leaves_a_finished_job_as_it_is(db_path: str, store: Storage) -> None:
    job = new_job(db_path)
    epoch = take(store, job, ME)
    store.write.commit([Change("job", job, job, None, "running", "cancelled", 0, ME, epoch, note="test", release=True)])
    before = row(store, job), store.read.journal(job)
    assert store.write.force_release(job, "late") is None
    assert (row(store, job), store.read.journal(job)) == before

def test_a_claim_on_an_epoch_read_before_another_claim_takes_nothing(
        db_path: str, store: Storage) -> None:
    job = new_job(db_path)
    r = row(store, job)
    take(store, job, OTHER)
    # Read as pending at the epoch before that claim: the claim's compare-and-set misses, in either state.
    assert store.write.claim(job, state="pending", epoch=r.epoch, owner=ME, lease_expires=1e12, note="late") is None
    assert store.write.claim(job, state="running", epoch=r.epoch, owner=ME, lease_expires=1e12, note="late") is None
    assert row(store, job).owner == OTHER


def test_a_batch_claim_of_a_job_found_dead_at_an_older_epoch_leaves_it_to_its_new_owner(
        db_path: str, store: Storage, superseded: tuple[int, int, int]) -> None:
    job, old, new = superseded
    # A worker found ME dead at epoch ``old``; OTHER has claimed the job since.
    claimed = store.write.claim_runnable(owner="worker", lease_expires=1e12, limit=5, workflows=["w"], now=0.0,
                                         dead=[(job, old)])
    assert claimed == []
    assert (row(store, job).owner, row(store, job).epoch) == (OTHER, new)
    [(_, _, prior, got)] = store.write.claim_runnable(owner="worker", lease_expires=1e12, limit=5, workflows=["w"],
                                                      now=0.0, dead=[(job, new)])
    assert prior == OTHER and got.epoch == new + 1


def test_a_migration_that_a_claim_overtakes_between_its_read_and_its_write_changes_nothing(
        db_path: str, store: Storage) -> None:
    if not is_postgres_url(db_path):
        pytest.skip("SQLite's one writer: no claim can come between the migration's read and its write")
    job = new_job(db_path)
    r = row(store, job)
    other = open_store(db_path)
    taken: list[int] = []

    def context(text: str) -> str:
        # Runs after the migration read the job and before it writes: another session claims it now.
        t = threading.Thread(target=lambda: taken.append(take(other, job, OTHER)))
        t.start()
        t.join(30)
        return text

    try:
        done = migrate_job(store.db, store.path, job, "w", epoch=r.epoch, from_version=1, to_version=2,
                           fingerprint="f", steps=[("only", "p", 0)], drop=(), context=context)
        assert taken, "the claim did not happen"
        assert done is None
        after = row(store, job)
        assert (after.version, after.owner, after.epoch) == (1, OTHER, taken[0])
    finally:
        other.close()


# -- item 11: claims take the job runnable longest first ----------------------------------------------


def claim_one(store: Storage) -> tuple[int, int]:
    [(_, _, _, got)] = store.write.claim_runnable(owner=ME, lease_expires=1e12, limit=1, workflows=["w"], now=0.0)
    return got.job_id, got.epoch


def test_a_claim_takes_the_job_runnable_longest_not_the_lowest_id(db_path: str, store: Storage) -> None:
    old, b, c = new_job(db_path), new_job(db_path), new_job(db_path)
    epoch = take(store, old, ME)
    assert store.write.release(old, ME, epoch, "released: runnable again, after b and c")
    assert [claim_one(store)[0] for _ in range(3)] == [b, c, old]


def test_a_job_that_becomes_runnable_again_and_again_does_not_starve_newer_pending_jobs(
        db_path: str, store: Storage) -> None:
    # One worker slot: each claimed job is given back at once (a retried job, runnable again every time).
    jobs = [new_job(db_path) for _ in range(4)]
    claimed = []
    for _ in range(12):
        job, epoch = claim_one(store)
        claimed.append(job)
        assert store.write.release(job, ME, epoch, "runnable again")
    assert claimed == jobs * 3, claimed  # round robin: every job waits behind each other one once
