"""The durable sub-step machine: write before you believe, one commit per change, no redundant writes."""

from __future__ import annotations

import sqlite3
from unittest import mock

import pytest
import transitions
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from walstate import InjectedCrash, InvalidTransition, StaleState
from walstate.fsm import STEP
from walstate.substep import LiveJob, SubStep
from walstate.storage import Change, Store, faults
from walstate.storage.errors import DatabaseBusy, DatabaseFull, LeaseLost

from .conftest import trace
from .helpers import journal_of, new_step, stored_state

# A path from `pending` to each state that has outgoing transitions.
PATH_TO = {
    "pending": [],
    "running": ["start"],
    "retrying": ["start", "retry"],
    "waiting": ["start", "wait"],
    "failed": ["start", "fail"],
    "cancelled": ["cancel"],
}
LEGAL = [(trigger, source, dest) for trigger, m in STEP.table.items() for source, dest in m.items()]


def drive(step: SubStep, triggers: list[str]) -> None:
    for t in triggers:
        assert step.fire(t, error="e") if t in ("retry", "fail") else step.fire(t)


@pytest.mark.parametrize("trigger,source,dest", LEGAL, ids=[f"{t}:{s}->{d}" for t, s, d in LEGAL])
def test_every_legal_transition_writes_one_update_one_journal_row_and_one_commit(
    store: Store, trigger: str, source: str, dest: str
) -> None:
    step = new_step(store)
    drive(step, PATH_TO[source])
    before = len(journal_of(store.path, step.job.id))
    log = trace(store.db)

    assert step.fire(trigger, error="e") is True

    assert log.count("UPDATE") == 1
    assert log.count("INSERT INTO WALSTATE_JOURNAL") == 1
    assert len(log.writes) == 2
    assert log.count("COMMIT") == 1
    assert log.count("BEGIN IMMEDIATE") == 1
    assert step.state == dest
    assert stored_state(store.path, step.id)[0] == dest
    rows = journal_of(store.path, step.job.id)
    assert len(rows) == before + 1
    assert rows[-1][:3] == ("s", source, dest)


def test_start_counts_attempts_and_the_journal_records_them(store: Store) -> None:
    step = new_step(store)
    drive(step, ["start", "retry", "start", "retry", "start"])
    assert step.attempt == 3
    assert stored_state(store.path, step.id) == ("running", 3)
    assert [r[3] for r in journal_of(store.path, step.job.id) if r[2] == "running"] == [1, 2, 3]


@pytest.mark.parametrize("source,trigger", [("pending", "succeed"), ("pending", "retry"), ("succeeded", "start"),
                                            ("failed", "succeed"), ("skipped", "cancel"), ("running", "skip")])
def test_illegal_trigger_raises_invalid_transition_and_writes_nothing(store: Store, source: str, trigger: str) -> None:
    step = new_step(store)
    drive(step, {"succeeded": ["start", "succeed"], "skipped": ["skip"]}.get(source, PATH_TO.get(source, [])))
    log = trace(store.db)
    with pytest.raises(InvalidTransition) as err:
        step.fire(trigger)
    assert err.value.state == source and err.value.trigger == trigger
    assert repr(source) in str(err.value) and repr(trigger) in str(err.value)
    assert log.statements == []
    assert step.state == source == stored_state(store.path, step.id)[0]


def test_unknown_trigger_raises_invalid_transition(store: Store) -> None:
    step = new_step(store)
    with pytest.raises(InvalidTransition, match="unknown trigger 'explode'"):
        step.fire("explode")


@pytest.mark.parametrize("path,trigger", [(["start"], "start"), (["start", "succeed"], "succeed"),
                                          (["cancel"], "cancel"), (["start", "retry"], "retry")])
def test_trigger_to_the_state_it_already_has_writes_nothing(store: Store, path: list[str], trigger: str) -> None:
    step = new_step(store)
    drive(step, path)
    state, attempt = step.state, step.attempt
    log = trace(store.db)
    assert step.fire(trigger, error="e") is False
    assert log.statements == []
    assert (step.state, step.attempt) == (state, attempt) == stored_state(store.path, step.id)


def test_concurrent_writer_makes_the_cas_fail_and_memory_keeps_agreeing_with_the_database(store: Store) -> None:
    step = new_step(store)
    step.start()
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("UPDATE walstate_step SET state='cancelled' WHERE id=?", (step.id,))
    other.close()
    before = journal_of(store.path, step.job.id)

    with pytest.raises(StaleState) as err:
        step.succeed(output='"x"')

    assert err.value.expected == "running" and err.value.actual == "cancelled"
    assert "another writer" in str(err.value)
    assert step.state == "running"  # memory did not believe the failed write
    assert journal_of(store.path, step.job.id) == before  # nothing half-written


def test_a_writer_whose_job_was_taken_over_is_fenced_off(store: Store) -> None:
    step = new_step(store, owner="host|1|1|old")
    step.start()
    # Another run claims the job (a CAS on the epoch it read), bumping the epoch.
    assert store.write.claim(step.job.id, state="running", epoch=step.job.epoch, owner="host|2|2|new",
                             lease_expires=0.0, note="taken over") is not None
    with pytest.raises(LeaseLost, match="lost its claim"):
        step.succeed()
    assert step.state == "running" == stored_state(store.path, step.id)[0]


@pytest.mark.parametrize("point", ["before_begin", "after_update", "after_journal", "before_commit"])
def test_crash_before_commit_leaves_memory_and_database_in_the_old_state(store: Store, point: str) -> None:
    step = new_step(store)
    step.start()
    before = journal_of(store.path, step.job.id)
    with faults.Injector(faults.Crash(point, 1)), pytest.raises(InjectedCrash):
        step.succeed(output='"done"')
    assert step.state == "running"
    assert stored_state(store.path, step.id) == ("running", 1)
    assert journal_of(store.path, step.job.id) == before


def test_crash_after_commit_leaves_the_change_in_the_database(store: Store) -> None:
    step = new_step(store)
    step.start()
    with faults.Injector(faults.Crash("after_commit", 1)), pytest.raises(InjectedCrash):
        step.succeed(output='"done"')
    # The process "died" before the trigger returned: the change is durable,
    # and a reload (what a restarted process does) sees it.
    assert stored_state(store.path, step.id) == ("succeeded", 1)
    assert journal_of(store.path, step.job.id)[-1][1:3] == ("running", "succeeded")


def test_an_error_raised_between_update_and_commit_rolls_everything_back(store: Store) -> None:
    step = new_step(store)
    step.start()
    before = journal_of(store.path, step.job.id)
    real = store.write._apply

    def apply_then_fail(conn: sqlite3.Connection, change: object, now: float, *deferred: object) -> None:
        real(conn, change, now, *deferred)  # type: ignore[arg-type]
        raise sqlite3.OperationalError("database or disk is full")

    with mock.patch.object(store.write, "_apply", apply_then_fail), pytest.raises(DatabaseFull, match="free space"):
        step.succeed()
    assert step.state == "running" == stored_state(store.path, step.id)[0]
    assert journal_of(store.path, step.job.id) == before


def test_a_really_full_database_raises_database_full_and_keeps_memory_in_step(store: Store) -> None:
    step = new_step(store)
    step.start()
    conn = store.db.connection()
    conn.execute("CREATE TABLE filler(x BLOB)")
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    # A limit of each connection: this thread's, and the writer walstate's own writes use.
    for c in (conn, store.db.writer()):
        c.execute(f"PRAGMA max_page_count={pages + 2}")
    with pytest.raises(sqlite3.Error):
        for _ in range(100):
            conn.execute("INSERT INTO filler VALUES (zeroblob(4000))")
    with pytest.raises(DatabaseFull, match="while writing a state change") as err:
        for i in range(200):  # each change adds a journal row: the file must run out of pages
            step.retry(error="x" * 2000) if i % 2 == 0 else step.start()
    assert store.path in str(err.value)
    assert (step.state, step.attempt) == stored_state(store.path, step.id)


def test_a_locked_database_raises_database_busy_and_changes_nothing(db_path: str) -> None:
    store = Store(db_path, busy_timeout=0.05)
    step = new_step(store)
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(DatabaseBusy, match="busy_timeout"):
            step.start()
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert step.state == "pending" and step.attempt == 0
    assert stored_state(db_path, step.id) == ("pending", 0)
    store.close()


def test_loading_a_step_restores_its_state_without_running_enter_or_exit_callbacks(store: Store) -> None:
    step = new_step(store)
    step.start()
    calls: list[str] = []
    running = STEP.machine.get_state("running")
    running.add_callback("enter", lambda event: calls.append("enter"))
    running.add_callback("exit", lambda event: calls.append("exit"))
    try:
        log = trace(store.db)
        loaded = SubStep(step.job, store.read.steps(step.job.id)[0])
        assert loaded.state == "running" and loaded.attempt == 1
        assert calls == [] and log.writes == []
        loaded.retry(error="e")
        loaded.start()  # the spy works: a real move into `running` does call it
        assert calls == ["exit", "enter"]
    finally:
        running.on_enter.clear()
        running.on_exit.clear()


def test_sub_steps_share_one_machine_instead_of_building_one_each(store: Store) -> None:
    job_id, _ = store.write.create_job("wf", None, "{}", [(f"s{i}", "p", i) for i in range(50)])
    job = LiveJob(job_id, "wf", "pending", None, store.write)
    with mock.patch.object(transitions.Machine, "__init__", side_effect=AssertionError("built a machine")):
        steps = [SubStep(job, r) for r in store.read.steps(job_id)]
        for s in steps:
            s.start()
    assert all(s.state == "running" for s in steps)


class StepModelComparison(RuleBasedStateMachine):
    """Random triggers against a reference model: memory == database == model after each."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = tempfile.TemporaryDirectory()
        self.store = Store(f"{self.dir.name}/m.db")
        self.steps = [new_step(self.store, name=f"s{i}") for i in range(2)]
        self.model = [("pending", 0), ("pending", 0)]

    @rule(i=st.integers(0, 1), trigger=st.sampled_from(list(STEP.table) + ["bogus"]))
    def fire(self, i: int, trigger: str) -> None:
        state, attempt = self.model[i]
        allowed = STEP.table.get(trigger, {})
        if state in allowed:
            dest = allowed[state]
            assert self.steps[i].fire(trigger, error="e") is True
            self.model[i] = (dest, attempt + 1 if dest == "running" else attempt)
        elif trigger in STEP.table and state in set(STEP.table[trigger].values()):
            assert self.steps[i].fire(trigger) is False
        else:
            with pytest.raises(InvalidTransition):
                self.steps[i].fire(trigger)

    @invariant()
    def memory_database_and_model_agree(self) -> None:
        for step, expected in zip(self.steps, self.model):
            assert (step.state, step.attempt) == expected == stored_state(self.store.path, step.id)
            states = [self_row[2] for self_row in journal_of(self.store.path, step.job.id)]
            assert STEP.is_legal_path(["pending", *states])

    def teardown(self) -> None:
        self.store.close()
        self.dir.cleanup()


TestStepModelComparison = StepModelComparison.TestCase
# Each example opens a fresh database file: half the profile's examples (50 by default, 1,000 deep)
# keep it to a few seconds of the five-minute suite.
TestStepModelComparison.settings = settings(settings.default, max_examples=max(10, settings.default.max_examples // 2))


def test_a_commit_that_sqlite_refuses_is_rolled_back_and_the_connection_stays_usable(store: Store) -> None:
    """A COMMIT can fail (a deferred constraint, a full disk): nothing stays half-open after it."""
    from walstate.storage.errors import WriteFailed

    step = new_step(store)
    conn = store.db.connection()

    def orphan_row() -> list[Change]:
        # Deferred: the foreign key is checked at COMMIT, which fails; the write path must roll back.
        conn.execute("PRAGMA defer_foreign_keys=ON")
        conn.execute("INSERT INTO walstate_once (job_id, step, name, result, at) VALUES (424242, 's', 'n', '1', 0)")
        return []

    with pytest.raises(WriteFailed, match=f"^{store.path}: .* while writing a state change: FOREIGN KEY"):
        store.write.commit(effect=orphan_row)
    assert not conn.in_transaction
    step.start()  # the thread's connection and the write lock are free again
    assert stored_state(store.path, step.id) == ("running", 1)


def test_a_job_change_without_release_keeps_the_claim(store: Store) -> None:
    step = new_step(store, owner="me")
    job = step.job
    store.write.commit([Change("job", job.id, job.id, None, "running", "running", 0, "me", job.epoch)])
    owner, epoch = store.db.writer().execute("SELECT owner, epoch FROM walstate_job WHERE id=?", (job.id,)).fetchone()
    assert (owner, epoch) == ("me", job.epoch)


def test_a_change_of_an_unknown_kind_is_refused_by_name(store: Store) -> None:
    step = new_step(store)
    with pytest.raises(ValueError, match="unknown change kind 'row'"):
        store.write.commit([Change("row", step.id, step.job.id, "s", "pending", "running")])
    assert stored_state(store.path, step.id) == ("pending", 0)


def test_an_illegal_move_names_the_database_file_as_every_error_does(store: Store) -> None:
    step = new_step(store)
    with pytest.raises(InvalidTransition) as err:
        step.fire("succeed")  # pending -> succeeded skips running
    assert str(err.value).startswith(f"{store.path}: sub-step ")
    with pytest.raises(InvalidTransition) as err:
        step.job.fire("succeed")  # a pending job has not started
    assert str(err.value).startswith(f"{store.path}: job ")
