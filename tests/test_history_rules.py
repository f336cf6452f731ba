"""Every rule of the history checker, each fired by a hand-made break and kept silent by its legal variant.

Each test starts from a real SQLite database (``walstate.Engine``) holding one finished job of
``rules_flow`` (key ``order-1``): step ``fetch`` calls ``once("token")`` (stored 7) and consumes the
message ``m1`` sent before the run; step ``book`` is transactional and has its one marker row. Beside it
are the chaos tables the checker reads, and the trigger a chaos run puts on ``walstate_job`` (every
deleted job row copied to ``walstate_chaos_pruned``). The ledger says what a clean run of it
acknowledged. A test then breaks one thing (a plain SQL statement on the database, or extra ledger
lines with hand-picked pids and times) and pins which rules :func:`walstate.history.check_history`
reports; where cheap, the legal variant of the same history reports nothing.

What it pins: the rule names (the chaos suite asserts them), and where each rule draws its line
(a lost claim, a prune, a rolled-back transaction, a missed schedule slot, a clock jump).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from walstate import Engine, StepContext, Workflow
from walstate.chaos import _pruned_log
from walstate.history import CREATE_EFFECTS, INSERT_EFFECT, Ledger, check_history
from walstate.schedules import Schedule

FLOW = "rules_flow"
ORDER = "order-1"
LEASE = 5.0
#: The pids the ledger lines claim: the submitter, the clean run's worker, later workers, the nemesis.
SUBMITTER, WORKER, OTHER, THIRD, NEMESIS = 4100, 4242, 5001, 5002, 4000
#: The clean run's calls in WORKER (call numbers count per process).
FETCH_CALL, BOOK_CALL = 0, 1
#: A job id the database does not know: handler calls of it are checked by the ledger rules only.
GHOST = 101


class Ctx(BaseModel):
    n: int = 0


def make_flow() -> Workflow[Ctx]:
    flow = Workflow(FLOW, context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def fetch(ctx: Ctx, step: StepContext) -> dict[str, int]:
        token: int = step.once("token", lambda: 7)
        msg: dict[str, int] = step.wait_for("go")
        return {"n": token + msg["v"]}

    @flow.step(phase="p", transactional=True)
    def book(ctx: Ctx, step: StepContext) -> dict[str, int]:
        return {"n": 1}

    return flow


@dataclass
class Run:
    """The database and the ledger directory of one test, and helpers to break them."""

    db: Path
    ledgers: Path
    job: int

    def sql(self, statement: str, params: Sequence[Any] = ()) -> None:
        conn = sqlite3.connect(self.db)
        try:
            conn.execute(statement, tuple(params))
            conn.commit()
        finally:
            conn.close()

    def write(self, kind: str, *, pid: int, t: float, role: str = "worker", **fields: Any) -> None:
        """One ledger line claiming ``pid`` and time ``t`` (the checker orders lines by ``t``)."""
        Ledger(self.ledgers, role).append(kind, pid=pid, t=t, **fields)

    def call(self, *, step: str, pid: int, call: int, enter: float, exit: float | None = None,
             outcome: str = "returned", attempt: int = 1, epoch: int = 1, job: int | None = None) -> None:
        """A handler call: its ``enter`` line, and its ``exit`` line unless ``exit`` is None (it never ended)."""
        base: dict[str, Any] = {"job": self.job if job is None else job, "step": step, "workflow": FLOW,
                                "attempt": attempt, "epoch": epoch, "call": call}
        self.write("enter", pid=pid, t=enter, **base)
        if exit is not None:
            self.write("exit", pid=pid, t=exit, **base, outcome=outcome)

    def nemesis(self, action: str, target: int, t: float, seconds: float | None = None) -> None:
        self.write("nemesis", pid=NEMESIS, t=t, role="nemesis", action=action, target=target, seconds=seconds)

    def fetch_call(self, *, pid: int = WORKER, call: int = FETCH_CALL, at: float = 2.0, epoch: int = 1,
                   fn_value: int | None = 7, once_value: int = 7, end: bool = True) -> None:
        """The lines of one call of ``fetch`` from ``at``: once()'s function (``fn_value`` None: it did not run,
        the record was read back), what once() returned, the message received, and the exit (unless not ``end``)."""
        self.call(step="fetch", pid=pid, call=call, enter=at, epoch=epoch)
        where: dict[str, Any] = {"job": self.job, "step": "fetch", "name": "token"}
        if fn_value is not None:
            self.write("once_fn", pid=pid, t=at + 0.2, **where, call=call, start=at + 0.1, value=fn_value)
        self.write("once", pid=pid, t=at + 0.3, **where, value=once_value)
        if end:
            self.write("received", pid=pid, t=at + 0.4, job=self.job, step="fetch", topic="go", value={"v": 1})
            self.write("exit", pid=pid, t=at + 0.5, job=self.job, step="fetch", workflow=FLOW, attempt=1,
                       epoch=epoch, call=call, outcome="returned")

    def check(self, *, expect: str = "succeeded", limits: Mapping[str, int] | None = None,
              transactional: Sequence[tuple[str, str]] = ((FLOW, "book"),),
              schedules: Sequence[Schedule] = ()) -> set[str]:
        report = check_history(str(self.db), self.ledgers, lease=LEASE, expect=expect, limits=limits,
                               transactional=transactional, schedules=schedules)
        return report.rules_broken()


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    """One finished job of ``rules_flow``, and a ledger of its submit, its message and its ``book`` call."""
    db, ledgers = tmp_path / "app.db", tmp_path / "ledger"
    ledgers.mkdir()
    flow = make_flow()
    with Engine(str(db)) as e:
        e.register(flow)
        job = int(e.submit(flow, Ctx(), key=ORDER))
        assert e.send(job, "go", {"v": 1}, key="m1")
        assert e.run(job).state == "succeeded"
    conn = sqlite3.connect(db)
    for statement in [CREATE_EFFECTS, *_pruned_log(postgres=False)]:
        conn.execute(statement)
    conn.execute(INSERT_EFFECT, (job, "book", 1, WORKER, BOOK_CALL))
    conn.commit()
    conn.close()
    r = Run(db, ledgers, job)
    r.write("submit", pid=SUBMITTER, t=1.0, role="submit", job=job, key=ORDER, workflow=FLOW)
    r.write("send", pid=SUBMITTER, t=1.1, role="submit", job=job, topic="go", key="m1", payload={"v": 1}, new=True)
    r.call(step="book", pid=WORKER, call=BOOK_CALL, enter=2.0, exit=2.2)
    r.write("effect", pid=WORKER, t=2.1, job=job, step="book", attempt=1)
    yield r


def prune(r: Run) -> None:
    """``engine.prune(older_than=0)``: the job goes, with its steps, journal, once() records and messages."""
    with Engine(str(r.db)) as e:
        assert e.prune(older_than=0) == 1


def slot_time(slot: str) -> float:
    return datetime.strptime(slot, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


def schedule_jobs(r: Run, slots: Sequence[str], *, name: str = "tick") -> None:
    """A job of each slot of schedule ``name`` (as the schedule makes them), made one second after its slot."""
    with Engine(str(r.db)) as e:
        flow = e.register(make_flow())
        for slot in slots:
            job = int(e.submit(flow, Ctx(), key=f"schedule:{name}:{slot}"))
            r.sql("UPDATE walstate_job SET created_at = ? WHERE id = ?", (slot_time(slot) + 1.0, job))


def every_minute(grace: float) -> Schedule:
    return Schedule("tick", make_flow(), "* * * * *", {}, grace=grace)


# The clean run.

def test_the_clean_run_breaks_no_rule(run: Run) -> None:
    run.fetch_call()
    assert run.check(limits={FLOW: 1}) == set()


def test_a_run_whose_ledger_lacks_the_handler_lines_of_a_step_breaks_no_rule(run: Run) -> None:
    # Handler lines are optional: a ledger of submits and sends alone is checked against the database.
    assert run.check() == set()


# Jobs.

def test_a_submit_acknowledged_in_the_ledger_whose_job_is_gone_breaks_acknowledged_submit_lost(run: Run) -> None:
    run.sql("DELETE FROM walstate_job WHERE id = ?", (run.job,))
    run.sql("DELETE FROM walstate_chaos_pruned")  # a lost row, not a prune: the trigger's copy goes too
    assert "acknowledged-submit-lost" in run.check()


def test_a_submit_acknowledged_for_a_key_the_job_does_not_have_breaks_acknowledged_submit_lost(run: Run) -> None:
    run.sql("UPDATE walstate_job SET key = 'order-2' WHERE id = ?", (run.job,))
    assert run.check() == {"acknowledged-submit-lost"}


def test_a_pruned_job_that_succeeded_keeps_its_acknowledged_submit_and_message(run: Run) -> None:
    run.fetch_call()
    prune(run)
    assert run.check() == set()


def test_a_pruned_job_that_had_not_succeeded_breaks_job_not_succeeded(run: Run) -> None:
    run.sql("UPDATE walstate_job SET state = 'cancelled' WHERE id = ?", (run.job,))
    prune(run)
    assert run.check() == {"job-not-succeeded"}


def test_a_job_that_ended_failed_breaks_job_not_succeeded_unless_failing_was_expected(run: Run) -> None:
    run.sql("UPDATE walstate_job SET state = 'failed', error = 'boom' WHERE id = ?", (run.job,))
    assert run.check() == {"job-not-succeeded"}
    assert run.check(expect="failed") == set()


def test_a_job_still_running_after_the_run_settled_breaks_job_stuck(run: Run) -> None:
    run.sql("UPDATE walstate_job SET state = 'running' WHERE id = ?", (run.job,))
    assert run.check() == {"job-stuck"}


def test_a_job_id_returned_for_two_keys_breaks_job_id_reused(run: Run) -> None:
    run.write("submit", pid=SUBMITTER, t=1.05, role="submit", job=run.job, key="order-2", workflow=FLOW)
    assert "job-id-reused" in run.check()


def test_a_submit_acknowledged_twice_for_one_key_and_id_is_legal(run: Run) -> None:
    # A retried submit() of the same key returns the same id.
    run.write("submit", pid=SUBMITTER, t=1.05, role="submit", job=run.job, key=ORDER, workflow=FLOW)
    assert run.check() == set()


def test_a_pruned_job_id_that_came_back_for_another_job_breaks_job_id_reused(run: Run) -> None:
    run.sql("INSERT INTO walstate_chaos_pruned VALUES (?, ?, 'order-0', 'succeeded', 1.0)", (run.job, FLOW))
    assert run.check() == {"job-id-reused"}


# Messages.

def test_a_send_acknowledged_in_the_ledger_whose_message_is_gone_breaks_acknowledged_message_lost(
        run: Run) -> None:
    run.sql("DELETE FROM walstate_message WHERE job_id = ?", (run.job,))
    assert run.check() == {"acknowledged-message-lost"}


def test_an_acknowledged_message_no_wait_consumed_breaks_message_not_consumed(run: Run) -> None:
    run.sql("UPDATE walstate_message SET consumed_by = NULL WHERE job_id = ?", (run.job,))
    assert run.check() == {"message-not-consumed"}


def test_a_message_received_by_two_waits_breaks_message_consumed_twice(run: Run) -> None:
    run.fetch_call()
    run.write("received", pid=WORKER, t=2.15, job=run.job, step="book", topic="go", value={"v": 1})
    assert run.check() == {"message-consumed-twice"}


def test_a_message_received_twice_by_the_same_wait_is_legal(run: Run) -> None:
    # A resumed handler runs again from its start: wait_for() gives it the consumed message back.
    run.fetch_call()
    run.fetch_call(call=2, at=3.0, fn_value=None)
    assert "message-consumed-twice" not in run.check()


def test_two_messages_with_equal_payloads_each_consumed_by_its_own_wait_are_legal(run: Run) -> None:
    run.fetch_call()
    run.sql("INSERT INTO walstate_message (job_id, topic, payload, key, sent_at, consumed_by) "
            "VALUES (?, 'go2', '{\"v\":1}', 'm2', 1.0, 'book:__walstate_wait_go2_1')", (run.job,))
    run.write("send", pid=SUBMITTER, t=1.2, role="submit", job=run.job, topic="go2", key="m2", payload={"v": 1},
              new=True)
    run.write("received", pid=WORKER, t=2.15, job=run.job, step="book", topic="go2", value={"v": 1})
    assert run.check() == set()


# Handler calls.

def test_a_call_at_a_lower_attempt_than_the_call_before_breaks_attempts_went_down(run: Run) -> None:
    run.call(job=GHOST, step="fetch", pid=OTHER, call=0, enter=10.0, exit=10.5, outcome="raised", attempt=2)
    run.call(job=GHOST, step="fetch", pid=OTHER, call=1, enter=11.0, exit=11.5, outcome="raised", attempt=1)
    assert "attempts-went-down" in run.check()


def test_a_failed_attempt_followed_by_the_next_attempt_is_legal(run: Run) -> None:
    run.call(job=GHOST, step="fetch", pid=OTHER, call=0, enter=10.0, exit=10.5, outcome="raised", attempt=1)
    run.call(job=GHOST, step="fetch", pid=OTHER, call=1, enter=11.0, exit=11.5, outcome="raised", attempt=2)
    assert run.check() == set()


@pytest.mark.parametrize("first_exit", [None, 12.0], ids=["never-ended", "ended-after-the-second-began"])
def test_a_second_call_while_the_first_still_held_its_claim_breaks_two_live_runs(
        run: Run, first_exit: float | None) -> None:
    run.call(job=GHOST, step="fetch", pid=OTHER, call=0, enter=10.0, exit=first_exit)
    run.call(job=GHOST, step="fetch", pid=THIRD, call=0, enter=11.0, exit=11.5)
    assert run.check() == {"two-live-runs"}


@pytest.mark.parametrize("action, seconds, legal", [("kill", None, True), ("hang", None, True),
                                                     ("stop", 2 * LEASE, True), ("stop", LEASE / 2, False)])
def test_a_second_call_is_legal_only_after_the_first_process_lost_its_claim(
        run: Run, action: str, seconds: float | None, legal: bool) -> None:
    run.call(job=GHOST, step="fetch", pid=OTHER, call=0, enter=10.0, exit=None)
    run.nemesis(action, OTHER, 10.5, seconds)
    run.call(job=GHOST, step="fetch", pid=THIRD, call=0, enter=11.0, exit=11.5)
    assert run.check() == (set() if legal else {"two-live-runs"})


def test_a_handler_called_again_after_it_returned_breaks_re_run_after_return(run: Run) -> None:
    run.call(job=GHOST, step="fetch", pid=OTHER, call=0, enter=10.0, exit=10.5)
    run.call(job=GHOST, step="fetch", pid=OTHER, call=1, enter=11.0, exit=11.5)
    assert run.check() == {"re-run-after-return"}


# once().

@pytest.mark.parametrize("killed", [False, True])
def test_a_once_function_run_again_though_its_first_caller_kept_its_claim_breaks_once_called_twice(
        run: Run, killed: bool) -> None:
    # The first call ran the function, then raised (killed: was killed) before once() wrote its record.
    base: dict[str, Any] = {"job": GHOST, "step": "fetch", "name": "token"}
    run.call(job=GHOST, step="fetch", pid=OTHER, call=0, enter=10.0, exit=None if killed else 10.5,
             outcome="raised")
    run.write("once_fn", pid=OTHER, t=10.2, **base, call=0, start=10.1, value=7)
    if killed:
        run.nemesis("kill", OTHER, 10.4)
    run.call(job=GHOST, step="fetch", pid=THIRD, call=0, enter=11.0, exit=11.5, attempt=1 if killed else 2)
    run.write("once_fn", pid=THIRD, t=11.2, **base, call=0, start=11.1, value=7)
    assert run.check() == (set() if killed else {"once-called-twice"})


@pytest.mark.parametrize("written_at", [12.2, 2.08], ids=["after-the-takeover", "before-the-takeover"])
def test_a_once_record_written_by_a_run_after_a_later_epoch_took_the_job_over_breaks_superseded_write_committed(
        run: Run, written_at: float) -> None:
    # WORKER (epoch 1) is stopped past its lease; THIRD (epoch 2) takes the job over and reads the record
    # back; WORKER resumes. Its record is legal only if it was written before the takeover.
    where: dict[str, Any] = {"job": run.job, "step": "fetch", "name": "token"}
    run.call(step="fetch", pid=WORKER, call=FETCH_CALL, enter=2.0, exit=12.5, outcome="aborted")
    run.write("once_fn", pid=WORKER, t=written_at - 0.01, **where, call=FETCH_CALL, start=2.05, value=7)
    run.write("once", pid=WORKER, t=written_at, **where, value=7)
    run.nemesis("stop", WORKER, 2.1, 10.0)
    run.call(step="fetch", pid=THIRD, call=0, enter=8.0, exit=13.5, epoch=2)
    run.write("once", pid=THIRD, t=13.0, **where, value=7)
    assert run.check() == ({"superseded-write-committed"} if written_at > 8.0 else set())


@pytest.mark.parametrize("killed", [False, True])
def test_a_live_run_given_a_once_value_other_than_the_stored_record_breaks_once_result_differs(
        run: Run, killed: bool) -> None:
    # The function returned 8 to this run, but the record says 7: legal only if the run then died, its
    # record never written (a later run's stands).
    run.fetch_call(fn_value=8, once_value=8, end=not killed)
    if killed:
        run.nemesis("kill", WORKER, 2.35)
    assert run.check() == (set() if killed else {"once-result-differs"})


# Transactional effects.

@pytest.mark.parametrize("change", ["INSERT INTO walstate_chaos_effect VALUES (?, 'book', 1, 4242, 7)",
                                    "DELETE FROM walstate_chaos_effect WHERE job_id = ?"],
                         ids=["twice", "never"])
def test_a_succeeded_transactional_step_whose_effect_is_not_stored_once_breaks_transactional_effect_not_once(
        run: Run, change: str) -> None:
    run.sql(change, (run.job,))
    assert "transactional-effect-not-once" in run.check()


def test_a_step_not_declared_transactional_is_not_held_to_one_effect(run: Run) -> None:
    run.sql("INSERT INTO walstate_chaos_effect VALUES (?, 'book', 1, 4242, 7)", (run.job,))
    assert run.check(transactional=()) == set()


# Concurrency.

def test_more_jobs_running_handlers_at_once_than_the_workflows_concurrency_breaks_concurrency_exceeded(
        run: Run) -> None:
    run.call(job=GHOST, step="fetch", pid=OTHER, call=0, enter=10.0, exit=12.0)
    run.call(job=GHOST + 1, step="fetch", pid=THIRD, call=0, enter=11.0, exit=13.0)
    assert run.check(limits={FLOW: 1}) == {"concurrency-exceeded"}
    assert run.check(limits={FLOW: 2}) == set()


@pytest.mark.parametrize("first", ["returned", "killed"])
def test_a_job_that_ended_or_lost_its_claim_before_the_next_began_leaves_the_concurrency_free(
        run: Run, first: str) -> None:
    run.call(job=GHOST, step="fetch", pid=OTHER, call=0, enter=10.0, exit=10.5 if first == "returned" else None)
    if first == "killed":
        run.nemesis("kill", OTHER, 10.5)
    run.call(job=GHOST + 1, step="fetch", pid=THIRD, call=0, enter=11.0, exit=13.0)
    assert run.check(limits={FLOW: 1}) == set()


# The journal.

@pytest.mark.parametrize("change", [
    # an illegal move: nothing leaves succeeded
    "INSERT INTO walstate_journal (job_id, step, from_state, to_state, attempt, at, note) "
    "VALUES (?, 'fetch', 'succeeded', 'running', 2, 0, NULL)",
    # a row whose from_state is not where the step was
    "UPDATE walstate_journal SET from_state = 'retrying' WHERE job_id = ? AND step = 'fetch' AND to_state = 'running'",
    # the step row disagrees with where its journal ends
    "UPDATE walstate_step SET state = 'running' WHERE job_id = ? AND name = 'fetch'",
    # the first attempt numbered 2
    "UPDATE walstate_journal SET attempt = 2 WHERE job_id = ? AND step = 'fetch' AND to_state = 'running'",
    # the step row's attempt disagrees with its journal
    "UPDATE walstate_step SET attempt = 3 WHERE job_id = ? AND name = 'fetch'",
], ids=["illegal-move", "wrong-from-state", "ends-elsewhere", "attempt-skipped", "attempt-disagrees"])
def test_a_step_journal_that_is_not_a_legal_numbered_path_breaks_journal_illegal(run: Run, change: str) -> None:
    run.sql(change, (run.job,))
    assert run.check() == {"journal-illegal"}


def test_a_retried_step_whose_attempts_count_up_has_a_legal_journal(run: Run) -> None:
    # running -> retrying -> running again at attempt 2, then succeeded: rewrite fetch's journal so.
    run.sql("DELETE FROM walstate_journal WHERE job_id = ? AND step = 'fetch'", (run.job,))
    for source, dest, attempt in [("pending", "running", 1), ("running", "retrying", 1),
                                  ("retrying", "running", 2), ("running", "succeeded", 2)]:
        run.sql("INSERT INTO walstate_journal (job_id, step, from_state, to_state, attempt, at, note) "
                "VALUES (?, 'fetch', ?, ?, ?, 0, NULL)", (run.job, source, dest, attempt))
    run.sql("UPDATE walstate_step SET attempt = 2 WHERE job_id = ? AND name = 'fetch'", (run.job,))
    assert run.check() == set()


# Schedules.

def test_a_slot_skipped_though_the_next_slots_job_came_within_grace_breaks_schedule_slot_missing(
        run: Run) -> None:
    # 10:01 has no job; 10:02's was made at 10:02:01, 61 s after 10:01: within a grace of 300 s a worker's
    # check would have made 10:01's job first.
    schedule_jobs(run, ["2026-12-07T10:00:00Z", "2026-12-07T10:02:00Z"])
    assert run.check(schedules=[every_minute(grace=300.0)]) == {"schedule-slot-missing"}


def test_a_slot_skipped_because_it_was_older_than_grace_when_checked_is_legal(run: Run) -> None:
    schedule_jobs(run, ["2026-12-07T10:00:00Z", "2026-12-07T10:02:00Z"])
    assert run.check(schedules=[every_minute(grace=30.0)]) == set()


def test_a_worker_clock_that_jumped_ahead_past_grace_makes_a_skipped_slot_legal(run: Run) -> None:
    schedule_jobs(run, ["2026-12-07T10:00:00Z", "2026-12-07T10:02:00Z"])
    run.nemesis("clock", OTHER, 5.0, 600.0)
    assert run.check(schedules=[every_minute(grace=300.0)]) == set()


def test_every_slot_with_its_job_is_legal(run: Run) -> None:
    schedule_jobs(run, ["2026-12-07T10:00:00Z", "2026-12-07T10:01:00Z", "2026-12-07T10:02:00Z"])
    assert run.check(schedules=[every_minute(grace=300.0)]) == set()


def test_a_slot_that_made_a_second_job_after_its_first_was_pruned_breaks_schedule_slot_twice(run: Run) -> None:
    schedule_jobs(run, ["2026-12-07T10:00:00Z"])
    run.sql("INSERT INTO walstate_chaos_pruned VALUES (999, ?, 'schedule:tick:2026-12-07T10:00:00Z', "
            "'succeeded', ?)", (FLOW, slot_time("2026-12-07T10:00:00Z") + 0.5))
    assert run.check(schedules=[every_minute(grace=300.0)]) == {"schedule-slot-twice"}


def test_every_rule_the_checker_can_break_is_pinned_here() -> None:
    """A rule added to history.py without a test here fails this (the rule names are its string literals)."""
    import re

    import walstate.history

    source = Path(walstate.history.__file__).read_text(encoding="utf-8")
    rules = {r for r in re.findall(r'Violation\(\s*"([a-z-]+)"', source) if not r.endswith("-")}
    rules |= {"job-not-succeeded"}  # "job-not-" + expect
    here = Path(__file__).read_text(encoding="utf-8")
    missing = sorted(rule for rule in rules if rule.replace("-", "_") not in here)
    assert not missing, missing
