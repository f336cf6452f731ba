"""The storage contract suite: every promise of walstate.storage.contract.Storage, on every store.

One list of promises, run against the memory store, a SQLite file and a PostgreSQL database: each
operation's results and errors, every owner/epoch fence (a superseded claim's writes change nothing),
all-or-nothing commits, ids that never repeat. A new backend passes this file or it is not a backend
(see the README, "Storage backends"). Backend-specific behaviour (SQLite's pragmas and files,
PostgreSQL's reconnects and server clock) is tested beside it, in the files about those.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from walstate import Engine, StepContext, UsageError, Workflow
from walstate.storage.contract import BACKENDS, Storage, open_store
from walstate.storage.errors import (ConfigurationError, JobFinished, LeaseLost, MigrationRefused, StaleState,
                                     UnknownJob)
from walstate.storage.memory import MemoryStore
from walstate.storage.types import Change, ContextPatch

STORES = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
STEPS = [("a", "p1", 0), ("b", "p1", 1), ("c", "p2", 2)]
LEASE = 1e12  # far in the future on any lease clock: these tests never let a lease run out


@pytest.fixture(params=STORES)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def target(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if kind == "memory":
        return f"memory://contract-{uuid.uuid4().hex}"
    if kind == "postgres":
        return str(request.getfixturevalue("pg_database"))
    return str(tmp_path / "contract.db")


@pytest.fixture
def s(target: str) -> Iterator[Storage]:
    store = open_store(target)
    yield store
    store.close()


def new_job(s: Storage, key: str | None = None, workflow: str = "wf", context: str = '{"n": 0}') -> int:
    job_id, known = s.create_job(workflow, key, context, STEPS)
    assert known is None
    return job_id


def claimed(s: Storage, job_id: int, owner: str = "w1") -> int:
    """Claim ``job_id`` for ``owner``; its epoch."""
    row = s.job(job_id)
    assert row is not None
    got = s.claim(job_id, state=row.state, epoch=row.epoch, owner=owner, lease_expires=LEASE, note="claimed")
    assert got is not None
    return got.epoch


def step_change(s: Storage, job_id: int, name: str, expected: str, new: str, owner: str | None, epoch: int,
                **extra: Any) -> Change:
    row = next(r for r in s.steps(job_id) if r.name == name)
    return Change("step", row.id, job_id, name, expected, new, 1, owner, epoch, **extra)


def test_every_target_kind_opens_its_own_store(tmp_path: Path) -> None:
    with_memory = open_store("memory://")
    assert isinstance(with_memory, MemoryStore) and with_memory.path == "memory://"
    assert [name for name, _ in [(o.__name__, a) for a, o in BACKENDS]] == ["_memory", "_postgres", "_sql"]
    sqlite = open_store(tmp_path / "x.db")
    try:
        assert type(sqlite).__name__ == "Store" and sqlite.path == str(tmp_path / "x.db")
    finally:
        sqlite.close()


def test_create_job_stores_a_pending_job_with_its_steps_and_a_known_key_inserts_nothing(s: Storage) -> None:
    job_id = new_job(s, key="k1", context='{"n": 1}')
    row = s.job(job_id)
    assert row is not None and (row.workflow, row.key, row.state, row.owner, row.epoch) == ("wf", "k1", "pending",
                                                                                            None, 0)
    assert [(r.name, r.phase, r.position, r.state, r.attempt) for r in s.steps(job_id)] == [
        ("a", "p1", 0, "pending", 0), ("b", "p1", 1, "pending", 0), ("c", "p2", 2, "pending", 0)]
    again, known = s.create_job("wf", "k1", '{"n": 2}', STEPS)
    assert (again, known) == (job_id, '{"n": 1}')
    other, known = s.create_job("other", "k1", "{}", STEPS)  # a key is per workflow
    assert other != job_id and known is None
    assert s.job(12345) is None and s.steps(12345) == []


def test_job_ids_never_repeat_after_the_newest_jobs_are_pruned(s: Storage) -> None:
    first = new_job(s)
    epoch = claimed(s, first)
    s.commit([Change("job", first, first, None, "running", "succeeded", 0, "w1", epoch, release=True)])
    assert s.prune(0, ["succeeded"], batch=10) == 1
    assert s.job(first) is None
    assert new_job(s) > first


def test_jobs_pages_newest_first_and_filters_by_state_and_workflow(s: Storage) -> None:
    ids = [new_job(s, workflow=w) for w in ("a", "b", "a", "a")]
    claimed(s, ids[0])
    assert [j.id for j in s.jobs()] == ids[::-1]
    assert [j.id for j in s.jobs(workflow="a")] == [ids[3], ids[2], ids[0]]
    assert [j.id for j in s.jobs(workflow="a", limit=1, offset=1)] == [ids[2]]
    assert [j.id for j in s.jobs(state="running")] == [ids[0]]
    assert [j.id for j in s.jobs(offset=3)] == [ids[0]]
    assert [j.id for j in s.unfinished_jobs()] == ids
    assert [(o[0], o[3]) for o in s.owned_unfinished()] == [(ids[0], "w1")]
    counts = {(c.job_id, c.phase, c.state): (c.count, c.rank) for c in s.step_counts([ids[0], ids[1]])}
    assert counts == {(ids[0], "p1", "pending"): (2, 0), (ids[0], "p2", "pending"): (1, 2),
                      (ids[1], "p1", "pending"): (2, 0), (ids[1], "p2", "pending"): (1, 2)}


def test_a_claim_is_a_compare_and_set_on_the_epoch_and_state_it_read(s: Storage) -> None:
    job_id = new_job(s)
    got = s.claim(job_id, state="pending", epoch=0, owner="w1", lease_expires=LEASE, note="claimed")
    assert got is not None and got.epoch == 1 and [r.name for r in got.steps] == ["a", "b", "c"]
    assert got.context == '{"n": 0}' and not got.cancel_requested
    row = s.job(job_id)
    assert row is not None and (row.state, row.owner, row.epoch, row.lease_expires) == ("running", "w1", 1, LEASE)
    assert s.claim(job_id, state="pending", epoch=0, owner="w2", lease_expires=LEASE, note="x") is None
    assert s.claim(job_id, state="running", epoch=0, owner="w2", lease_expires=LEASE, note="x") is None
    assert s.claim(job_id, state="running", epoch=1, owner="w2", lease_expires=LEASE, note="taken") is not None
    assert [(r.from_state, r.to_state, r.note) for r in s.journal(job_id)] == [
        ("pending", "running", "claimed"), ("running", "running", "taken")]


def test_claim_runnable_takes_the_longest_runnable_first_and_never_a_skipped_parked_or_other_job(s: Storage) -> None:
    older, newer, skipped, parked = (new_job(s) for _ in range(4))
    other = new_job(s, workflow="other")
    epoch = claimed(s, parked)
    assert s.park(parked, "w1", epoch, time.time() + 3600, (), "parked")
    assert s.runnable_exists(["wf"], time.time())
    assert s.next_wake(["wf"]) is not None and s.next_wake(["other"]) is None
    got = s.claim_runnable(owner="w2", lease_expires=LEASE, limit=2, workflows=["wf"], now=time.time(),
                           skip=[skipped])
    assert [c.job_id for _, _, _, c in got] == [older, newer]
    assert [(w, before, prior) for w, before, prior, _ in got] == [("wf", "pending", None)] * 2
    rest = s.claim_runnable(owner="w2", lease_expires=LEASE, limit=5, workflows=["wf"], now=time.time())
    assert [c.job_id for _, _, _, c in rest] == [skipped]  # the parked job sleeps; the other workflow is not asked
    assert not s.runnable_exists(["wf"], time.time())
    assert s.claim_runnable(owner="w2", lease_expires=LEASE, limit=0, workflows=["wf"], now=time.time()) == []
    woken = s.claim_runnable(owner="w2", lease_expires=LEASE, limit=5, workflows=["wf", "other"],
                             now=time.time() + 7200)
    assert sorted(c.job_id for _, _, _, c in woken) == [parked, other]


def test_claim_runnable_takes_a_dead_owners_job_only_at_the_epoch_found_dead(s: Storage) -> None:
    job_id = new_job(s)
    epoch = claimed(s, job_id, owner="dead")
    assert s.claim_runnable(owner="w2", lease_expires=LEASE, limit=5, workflows=["wf"], now=time.time(),
                            dead=[(job_id, epoch - 1)]) == []
    got = s.claim_runnable(owner="w2", lease_expires=LEASE, limit=5, workflows=["wf"], now=time.time(),
                           dead=[(job_id, epoch)])
    assert [(before, prior, c.epoch) for _, before, prior, c in got] == [("running", "dead", epoch + 1)]
    assert s.journal(job_id)[-1].note == "claimed from dead, found dead"


def test_claim_runnable_keeps_each_workflow_within_its_limit_and_its_versions(s: Storage) -> None:
    jobs = [new_job(s) for _ in range(3)]
    v2, _ = s.create_job("wf", None, "{}", STEPS, version=2)
    got = s.claim_runnable(owner="w1", lease_expires=LEASE, limit=5, workflows=["wf"], now=time.time(),
                           limits={"wf": 2}, versions=[("wf", 1)])
    assert [c.job_id for _, _, _, c in got] == jobs[:2]
    assert s.claim_runnable(owner="w1", lease_expires=LEASE, limit=5, workflows=["wf"], now=time.time(),
                            limits={"wf": 2}) == []
    got = s.claim_runnable(owner="w1", lease_expires=LEASE, limit=5, workflows=["wf"], now=time.time(),
                           versions=[("wf", 2)])
    assert [(c.job_id, c.version) for _, _, _, c in got] == [(v2, 2)]


def test_renew_release_and_park_are_fenced_by_owner_and_epoch(s: Storage) -> None:
    job_id = new_job(s)
    epoch = claimed(s, job_id)
    assert s.renew(job_id, "w1", epoch - 1, LEASE) is None
    assert s.renew(job_id, "w2", epoch, LEASE) is None
    assert s.renew(job_id, "w1", epoch, LEASE) is False
    assert s.request_cancel(job_id) is True
    assert s.renew(job_id, "w1", epoch, LEASE) is True
    assert s.cancel_requested([job_id, 999]) == {job_id}
    assert not s.release(job_id, "w1", epoch - 1, "stale")
    assert not s.park(job_id, "w2", epoch, 0.0, (), "stale")
    before = s.job(job_id)
    assert s.release(job_id, "w1", epoch, "shutdown", undo_start=True)
    row = s.job(job_id)
    assert row is not None and before is not None
    assert (row.state, row.owner, row.epoch) == ("pending", None, epoch + 1)
    assert s.journal(job_id)[-1].note == "shutdown"
    assert not s.release(job_id, "w1", epoch, "again")


def test_force_release_takes_the_claim_from_whoever_holds_it(s: Storage) -> None:
    job_id = new_job(s)
    assert s.force_release(job_id, "operator") is None  # nobody holds it
    epoch = claimed(s, job_id, owner="hung")
    assert s.force_release(job_id, "operator") == ("hung", epoch)
    row = s.job(job_id)
    assert row is not None and (row.owner, row.epoch, row.state) == (None, epoch + 1, "running")
    assert s.journal(job_id)[-1].note == f"operator (taken from hung, epoch {epoch})"
    assert s.renew(job_id, "hung", epoch, LEASE) is None
    with pytest.raises(UnknownJob):
        s.force_release(999, "operator")


def test_a_commit_applies_every_change_with_its_journal_row_or_none_of_them(s: Storage) -> None:
    job_id = new_job(s)
    epoch = claimed(s, job_id)
    good = step_change(s, job_id, "a", "pending", "running", "w1", epoch)
    stale = step_change(s, job_id, "b", "running", "succeeded", "w1", epoch)  # b is pending, not running
    with pytest.raises(StaleState):
        s.commit([good, stale])
    assert [r.state for r in s.steps(job_id)] == ["pending"] * 3
    journal = len(s.journal(job_id))
    s.commit([good])
    assert [r.state for r in s.steps(job_id)] == ["running", "pending", "pending"]
    assert [(r.step, r.from_state, r.to_state, r.attempt) for r in s.journal(job_id)[journal:]] == [
        ("a", "pending", "running", 1)]
    assert [r.to_state for r in s.journal(job_id, "a")] == ["running"]
    done = step_change(s, job_id, "a", "running", "succeeded", "w1", epoch, output='{"x": 1}',
                       once=(("a", "charge", '"ch_1"'),),
                       context=ContextPatch({"n": 5}, lambda merged: __import__("json").dumps(merged)))
    s.commit([done])
    a = s.steps(job_id)[0]
    assert (a.state, a.output) == ("succeeded", '{"x": 1}')
    row = s.job(job_id)
    assert row is not None and __import__("json").loads(row.context) == {"n": 5}
    assert s.once(job_id, "a", "charge") == '"ch_1"'


def test_a_superseded_claims_commit_is_refused_as_lease_lost_and_changes_nothing(s: Storage) -> None:
    job_id = new_job(s)
    old = claimed(s, job_id, owner="w1")
    new = claimed(s, job_id, owner="w2")
    with pytest.raises(LeaseLost):
        s.commit([step_change(s, job_id, "a", "pending", "running", "w1", old)])
    with pytest.raises(LeaseLost):
        s.commit([Change("job", job_id, job_id, None, "running", "succeeded", 0, "w1", old, release=True)])
    assert [r.state for r in s.steps(job_id)] == ["pending"] * 3
    s.commit([Change("job", job_id, job_id, None, "running", "succeeded", 0, "w2", new, release=True)])
    row = s.job(job_id)
    assert row is not None and (row.state, row.owner, row.epoch) == ("succeeded", None, new + 1)


def test_an_effect_that_raises_rolls_back_the_whole_commit(s: Storage) -> None:
    job_id = new_job(s)
    epoch = claimed(s, job_id)

    def effect() -> list[Change]:
        raise RuntimeError("the handler failed")

    with pytest.raises(RuntimeError):
        s.commit([step_change(s, job_id, "a", "pending", "running", "w1", epoch)], effect)
    assert [r.state for r in s.steps(job_id)] == ["pending"] * 3
    s.commit((), lambda: [step_change(s, job_id, "a", "pending", "running", "w1", epoch)])
    assert s.steps(job_id)[0].state == "running"


def test_once_records_are_fenced_and_the_first_stored_result_wins(s: Storage) -> None:
    job_id = new_job(s)
    old = claimed(s, job_id, owner="w1")
    assert s.once_lookup(job_id, "a", "pay", "w1", old) is None
    assert s.record_once(job_id, "a", "pay", '"first"', owner="w1", epoch=old) == '"first"'
    assert s.record_once(job_id, "a", "pay", '"second"', owner="w1", epoch=old) == '"first"'
    new = claimed(s, job_id, owner="w2")
    with pytest.raises(LeaseLost):
        s.once_lookup(job_id, "a", "pay", "w1", old)  # a superseded run learns nothing, not even the record
    with pytest.raises(LeaseLost):
        s.record_once(job_id, "a", "other", '"stale"', owner="w1", epoch=old)
    assert s.once(job_id, "a", "other") is None
    assert s.once_lookup(job_id, "a", "pay", "w2", new) == '"first"'
    assert s.record_once(job_id, "b", "free", '"unfenced"') == '"unfenced"'


def test_messages_are_stored_once_per_key_and_consumed_once_oldest_first_under_the_claim(s: Storage) -> None:
    job_id = new_job(s)
    first, new = s.send(job_id, "paid", '"one"', "k1")
    assert new and s.send(job_id, "paid", '"again"', "k1") == (first, False)
    s.send(job_id, "paid", '"two"', None)
    assert s.message_topics(job_id) == {"paid"}
    with pytest.raises(UnknownJob):
        s.send(999, "paid", '"x"', None)
    epoch = claimed(s, job_id)
    assert s.consume(job_id, "a", "w_paid", "paid", "w1", epoch) == '"one"'
    assert s.consume(job_id, "a", "w_paid", "paid", "w1", epoch) == '"one"'  # the wait's record, not a new one
    assert s.consume(job_id, "b", "w_paid", "paid", "w1", epoch) == '"two"'
    assert s.consume(job_id, "c", "w_paid", "paid", "w1", epoch) is None
    assert s.message_topics(job_id) == set()
    with pytest.raises(LeaseLost):
        s.consume(job_id, "c", "w_paid", "paid", "w1", epoch - 1)
    s.commit([Change("job", job_id, job_id, None, "running", "succeeded", 0, "w1", epoch, release=True)])
    assert s.send(job_id, "paid", '"late"', "k1") == (first, False)  # a webhook's retry is a duplicate
    with pytest.raises(JobFinished):
        s.send(job_id, "paid", '"new"', "k2")
    assert s.request_cancel(job_id) is False


def test_a_message_wakes_a_parked_job_whose_step_waits_for_its_topic(s: Storage) -> None:
    job_id = new_job(s)
    epoch = claimed(s, job_id)
    s.commit([step_change(s, job_id, "a", "pending", "running", "w1", epoch)])
    s.commit([step_change(s, job_id, "a", "running", "waiting", "w1", epoch, wake_at=float("inf"), topic="go")])
    assert s.park(job_id, "w1", epoch, 1e18, ["go"], "waits for go")
    assert not s.runnable_exists(["wf"], time.time())
    s.send(job_id, "go", '"now"', None)
    assert s.runnable_exists(["wf"], time.time())
    # A message already there when the job parks makes it runnable at once.
    epoch = claimed(s, job_id)
    assert s.park(job_id, "w1", epoch, 1e18, ["go"], "waits again")
    assert s.runnable_exists(["wf"], time.time())


def test_a_schedule_makes_one_job_per_whole_second_slot_and_passed_slots_make_none(s: Storage) -> None:
    made = s.create_scheduled("daily", 100.0, "wf", "daily@100", "{}", STEPS)
    assert made is not None and s.schedule_slot("daily") == 100.0
    assert s.create_scheduled("daily", 100.0000001, "wf", "daily@100", "{}", STEPS) is None
    assert s.pass_slot("daily", 101.0) and not s.pass_slot("daily", 101.0)
    assert s.create_scheduled("daily", 101.0, "wf", "daily@101", "{}", STEPS) is None
    assert s.schedule_slot("daily") == 101.0 and s.schedule_slot("never") is None


def test_migrate_job_moves_an_unclaimed_job_at_its_epoch_or_refuses_and_writes_nothing(s: Storage) -> None:
    job_id = new_job(s)
    new_steps = [("a", "p1", 0), ("c", "p2", 1), ("d", "p2", 2)]  # b removed, d added
    with pytest.raises(MigrationRefused):
        s.migrate_job(job_id, "wf", epoch=0, from_version=1, to_version=2, fingerprint="f2", steps=new_steps,
                      drop=[], context=lambda c: c)
    assert [r.name for r in s.steps(job_id)] == ["a", "b", "c"]
    assert s.migrate_job(job_id, "wf", epoch=5, from_version=1, to_version=2, fingerprint="f2", steps=new_steps,
                         drop=["b"], context=lambda c: c) is None  # the epoch moved on
    done = s.migrate_job(job_id, "wf", epoch=0, from_version=1, to_version=2, fingerprint="f2", steps=new_steps,
                         drop=["b"], context=lambda c: '{"n": 9}')
    assert done is not None and (done.added, done.dropped, done.retired) == (("d",), ("b",), ())
    row = s.job(job_id)
    assert row is not None and (row.version, row.fingerprint, row.context, row.epoch) == (2, "f2", '{"n": 9}', 1)
    assert [(r.name, r.position) for r in s.steps(job_id)] == [("a", 0), ("c", 1), ("d", 2)]


def test_prune_deletes_only_finished_jobs_of_the_chosen_states_with_their_rows(s: Storage) -> None:
    done, running = new_job(s, key="done"), new_job(s)
    epoch = claimed(s, done)
    s.record_once(done, "a", "x", '"1"')
    s.commit([Change("job", done, done, None, "running", "succeeded", 0, "w1", epoch, release=True)])
    claimed(s, running)
    with pytest.raises(ConfigurationError):
        s.prune(0, ["running"], batch=10)
    assert s.prune(0, ["failed"], batch=10) == 0
    assert s.prune(3600, ["succeeded"], batch=10) == 0  # finished less than an hour ago
    assert s.prune(0, ["succeeded"], batch=10, dry_run=True) == 1 and s.job(done) is not None
    assert s.prune(0, ["succeeded"], batch=10) == 1
    assert s.job(done) is None and s.steps(done) == [] and s.journal(done) == [] and s.once(done, "a", "x") is None
    assert s.job(running) is not None
    again, known = s.create_job("wf", "done", "{}", STEPS)  # a pruned job's key can be used again
    assert known is None and again > running


def test_another_store_on_the_same_database_sees_commits_and_its_data_version_moves(target: str, s: Storage) -> None:
    other = open_store(target)
    try:
        seen = other.data_version()
        job_id = new_job(s)
        assert other.job(job_id) is not None
        assert other.data_version() != seen
        assert other.database_id == s.database_id
    finally:
        other.close()


class Ctx(BaseModel):
    n: int = 0


def test_an_engine_runs_a_job_with_once_and_a_message_on_the_memory_store() -> None:
    flow = Workflow("mem", context=Ctx, phases=["p", "q"])

    @flow.step(phase="p")
    def first(ctx: Ctx, step: StepContext) -> dict[str, int]:
        return {"n": ctx.n + step.once("one", lambda: 1)}

    @flow.step(phase="q")
    def second(ctx: Ctx, step: StepContext) -> dict[str, int]:
        return {"n": ctx.n + int(step.wait_for("go"))}

    with Engine("memory://engine-contract") as engine:
        engine.register(flow)
        job = engine.submit(flow, Ctx())
        engine.send(job, "go", 41)
        status = engine.run(job)
        assert status.state == "succeeded" and status.context.n == 42


def test_a_transactional_steps_sql_on_the_memory_store_fails_the_step_saying_why() -> None:
    flow = Workflow("mem_tx", context=Ctx, phases=["p"])

    @flow.step(phase="p", transactional=True)
    def write(ctx: Ctx, step: StepContext) -> None:
        step.execute("INSERT INTO t VALUES (1)")

    with Engine("memory://") as engine:
        engine.register(flow)
        job = engine.submit(flow, Ctx())
        with pytest.raises(Exception) as failed:
            engine.run(job)
        assert "no SQL database" in str(failed.value)
    with pytest.raises(UsageError, match="no SQL database"):
        open_store("memory://").handle.execute_sql("SELECT 1")


def test_concurrent_commits_each_get_their_own_outcome(s: Storage) -> None:
    # Group commit may put several callers' changes in one transaction: a stale one fails alone.
    import threading

    jobs = [new_job(s) for _ in range(6)]
    epochs = {j: claimed(s, j) for j in jobs}
    stale = jobs[3]
    changes = {j: step_change(s, j, "a", "running" if j == stale else "pending", "running", "w1", epochs[j])
               for j in jobs}
    outcomes: dict[int, BaseException | None] = {}
    start = threading.Barrier(len(jobs))

    def commit(job_id: int) -> None:
        start.wait()
        try:
            s.commit([changes[job_id]])
            outcomes[job_id] = None
        except BaseException as exc:  # noqa: BLE001 - the outcome is what this test reads
            outcomes[job_id] = exc

    threads = [threading.Thread(target=commit, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(outcomes[stale], StaleState)
    assert all(outcomes[j] is None for j in jobs if j != stale)
    assert [s.steps(j)[0].state for j in jobs] == ["pending" if j == stale else "running" for j in jobs]


def test_every_store_refuses_a_durability_it_does_not_know(target: str) -> None:
    # A typo must fail in a unit test on memory as it would in production on a file or a server.
    with pytest.raises(ConfigurationError, match="durability must be 'normal' or 'full'"):
        open_store(target, durability="bogus")  # type: ignore[arg-type]


def test_a_named_memory_store_outlives_its_engines_and_a_nameless_one_is_private() -> None:
    name = f"memory://kept-{uuid.uuid4().hex}"
    first = open_store(name)
    job = new_job(first)
    first.close()
    again = open_store(name)
    assert again.job(job) is not None  # the same name in one process is the same database
    assert open_store("memory://").job(job) is None and open_store("memory://").database_id != again.database_id


def test_claim_runnable_takes_no_more_than_its_limit_and_counts_only_claimed_running_jobs(s: Storage) -> None:
    jobs = [new_job(s) for _ in range(4)]
    one = s.claim_runnable(owner="w1", lease_expires=LEASE, limit=1, workflows=["wf"], now=time.time())
    assert [c.job_id for _, _, _, c in one] == jobs[:1]
    # A running job parked (no owner) does not count against the limit; one held by an owner does.
    assert s.park(jobs[0], "w1", one[0][3].epoch, time.time() + 3600, (), "parked")
    got = s.claim_runnable(owner="w1", lease_expires=LEASE, limit=5, workflows=["wf"], now=time.time(),
                           limits={"wf": 1})
    assert [c.job_id for _, _, _, c in got] == jobs[1:2]
    assert s.claim_runnable(owner="w1", lease_expires=LEASE, limit=5, workflows=["wf"], now=time.time(),
                            limits={"wf": 1}) == []


def test_a_dead_owners_job_of_a_version_not_asked_for_is_left_alone(s: Storage) -> None:
    job_id, _ = s.create_job("wf", None, "{}", STEPS, version=2)
    epoch = claimed(s, job_id, owner="dead")
    assert s.claim_runnable(owner="w2", lease_expires=LEASE, limit=5, workflows=["wf"], now=time.time(),
                            dead=[(job_id, epoch)], versions=[("wf", 1)]) == []
    got = s.claim_runnable(owner="w2", lease_expires=LEASE, limit=5, workflows=["wf"], now=time.time(),
                           dead=[(job_id, epoch)], versions=[("wf", 2)])
    assert [c.job_id for _, _, _, c in got] == [job_id]
