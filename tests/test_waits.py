"""Durable waits (issue 13): sleep, messages, schedules, without holding a thread or a claim."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from walstate import (
    DatabaseBusy,
    Engine,
    InjectedCrash,
    JobCancelled,
    JobFinished,
    OutputNotJSON,
    StepContext,
    StepResult,
    UnknownJob,
    WaitTimeout,
    Workflow,
)
from walstate.storage import faults
from walstate.testing import check_invariants

from walstate.testing import connect
from walstate.storage.postgres import is_postgres_url

pytestmark = pytest.mark.backends

ROOT = Path(__file__).resolve().parent.parent


class Ctx(BaseModel):
    n: int = 0
    woke: float = 0.0
    paid: str = ""
    got: list[str] = []


class Clock:
    """A wall clock the test moves by hand (the engine, leases and waits all read it)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_sleep_parks_the_job_holding_no_claim_and_resumes_at_the_original_wake_up_after_a_restart(
        db_path: str) -> None:
    clock = Clock()
    calls = Counter[str]()
    flow = Workflow("w", context=Ctx, phases=["p", "q"])

    @flow.step(phase="p")
    def nap(ctx: Ctx, step: StepContext) -> dict[str, Any]:
        calls["before"] += 1                       # runs again on resume
        step.once("effect", lambda: calls.update(["effect"]) or 1)  # does not
        return {"woke": step.sleep(10)}

    flow.step(phase="q", name="after")(lambda ctx, step: None)
    with Engine(db_path, clock=clock) as e:
        e.register(flow)
        job = e.submit(flow, Ctx())
        status = e.run(job)  # returns when the job parks
        assert status.state == "running" and status.steps["nap"].state == "waiting"
        assert status.steps["after"].state == "pending"
        row = e.store.read.job(job)
        assert row.owner is None and row.wake_at == pytest.approx(clock.now + 10)
    clock.now += 3  # "killed during the sleep, restarted 3 s later"
    with Engine(db_path, clock=clock) as e:
        e.register(flow)
        assert list(e.recover()) == []  # not due yet: left alone
        clock.now += 7
        assert list(e.recover()) == [job]
        status = e.status(job)
        assert status.state == "succeeded" and status.context.woke == pytest.approx(1_000_010.0)
        assert [r.to_state for r in e.history(job, "nap")] == ["running", "waiting", "running", "succeeded"]
    assert calls == {"before": 2, "effect": 1}
    check_invariants(db_path, flow, job)


def test_a_message_sent_before_the_wait_is_kept_and_delivered_at_once(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="hook")(lambda ctx, step: {"paid": step.wait_for("paid")["id"]})
    with Engine(db_path) as e:
        e.register(flow)
        job = e.submit(flow, Ctx())
        assert e.send(job, "paid", {"id": "ch_1"}) is True
        status = e.run(job)
        assert status.state == "succeeded" and status.context.paid == "ch_1"
        assert [r.to_state for r in e.history(job, "hook")] == ["running", "succeeded"]  # never parked


def test_each_message_goes_to_exactly_one_wait_in_sending_order_and_a_repeated_key_is_stored_once(
        db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def collect(ctx: Ctx, step: StepContext) -> dict[str, Any]:
        return {"got": [step.wait_for("item"), step.wait_for("item"), step.wait_for("item")]}

    with Engine(db_path) as e:
        e.register(flow)
        job = e.submit(flow, Ctx())
        assert e.run(job).steps["collect"].state == "waiting"
        assert e.send(job, "item", "a", key="k-a") is True
        assert e.send(job, "item", "a", key="k-a") is False  # a retried webhook: stored once
        e.send(job, "item", "b")
        assert e.run(job).steps["collect"].state == "waiting"  # two consumed, a third awaited
        e.send(job, "item", "c")
        assert e.run(job).context.got == ["a", "b", "c"]
        consumed = e.store.db.raw().execute(
            "SELECT count(*), count(DISTINCT consumed_by) FROM walstate_message WHERE job_id=?", (job,)).fetchone()
        assert consumed == (3, 3)


def test_a_message_is_delivered_exactly_once_across_crashes_around_its_consumption(
        new_db: Callable[[str], str]) -> None:
    deliveries = Counter[str]()
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def hook(ctx: Ctx, step: StepContext) -> dict[str, Any]:
        paid = step.wait_for("paid")
        step.once("ship", lambda: deliveries.update([paid]) or True)
        return {"paid": paid}

    for point in ("before_consume", "after_consume"):
        path = new_db(point)
        with Engine(path) as e:
            e.register(flow)
            job = e.submit(flow, Ctx())
            e.send(job, "paid", f"ch-{point}")
            with faults.Injector(faults.Crash(point, 1)), pytest.raises(InjectedCrash):
                e.run(job)
        with Engine(path) as e:
            e.register(flow)
            e.recover()
            assert e.status(job).context.paid == f"ch-{point}"
        check_invariants(path, flow, job)
    assert deliveries == {"ch-before_consume": 1, "ch-after_consume": 1}


def test_a_wait_that_times_out_raises_wait_timeout_in_the_handler(db_path: str) -> None:
    clock = Clock()
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def hook(ctx: Ctx, step: StepContext) -> dict[str, Any]:
        try:
            return {"paid": step.wait_for("paid", timeout=60)}
        except WaitTimeout as exc:
            return {"paid": f"timed out on {exc.topic}"}

    with Engine(db_path, clock=clock) as e:
        e.register(flow)
        job = e.submit(flow, Ctx())
        assert e.run(job).steps["hook"].state == "waiting"
        assert e.store.read.job(job).wake_at == pytest.approx(clock.now + 60)
        clock.now += 61
        assert e.run(job).context.paid == "timed out on paid"


def test_send_refuses_unknown_and_finished_jobs_and_payloads_that_are_not_json(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="s")(lambda ctx, step: None)
    with Engine(db_path) as e:
        e.register(flow)
        job = e.submit(flow, Ctx())
        with pytest.raises(OutputNotJSON):
            e.send(job, "t", object())
        with pytest.raises(UnknownJob, match="no job 999 to send 't' to"):
            e.send(999, "t", 1)
        e.run(job)
        with pytest.raises(JobFinished, match="succeeded"):
            e.send(job, "t", 1)


def test_a_payload_with_a_lone_surrogate_is_refused_at_the_send_and_never_reaches_the_step(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def hook(ctx: Ctx, step: StepContext) -> dict[str, Any]:
        return {"paid": step.wait_for("paid")["id"]}

    with Engine(db_path) as e:
        e.register(flow)
        job = e.submit(flow, Ctx())
        for payload in ({"id": "ch_\ud800"}, ["\udfff"], "x\ud83d"):
            with pytest.raises(OutputNotJSON, match=r"the payload of send\(1, 'paid'\) holds a lone surrogate"):
                e.send(job, "paid", payload, key="k")
        # Nothing was stored (not even the key): a valid message with that key is new, and the step gets it.
        assert e.send(job, "paid", {"id": "ch_\u00e9\U0001f600"}, key="k") is True
        assert e.run(job).context.paid == "ch_\u00e9\U0001f600"
    done = subprocess.run([sys.executable, "-m", "walstate", "send", db_path, "1", "paid", '{"id": "\\ud800"}'],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode != 0 and "lone surrogate" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_send_returns_true_for_a_message_stored_after_its_wait_timed_out_and_the_message_stays_unread(
        db_path: str) -> None:
    clock = Clock()
    flow = Workflow("w", context=Ctx, phases=["p", "q"])

    @flow.step(phase="p")
    def hook(ctx: Ctx, step: StepContext) -> dict[str, Any]:
        try:
            return {"paid": step.wait_for("paid", timeout=60)["id"]}
        except WaitTimeout:
            return {"paid": "timed out"}

    @flow.step(phase="q")
    def later(ctx: Ctx, step: StepContext) -> dict[str, Any]:
        return {"n": 1 if step.wait_for("go") else 0}

    with Engine(db_path, clock=clock) as e:
        e.register(flow)
        job = e.submit(flow, Ctx())
        assert e.run(job).steps["hook"].state == "waiting"
        clock.now += 61
        assert e.run(job).steps["later"].state == "waiting"
        # True: new and committed, for the job's next wait on the topic; the timed-out wait never reads it.
        assert e.send(job, "paid", {"id": "late"}, key="late") is True
        assert e.send(job, "paid", {"id": "late"}, key="late") is False
        assert e.send(job, "go", True) is True
        status = e.run(job)
        assert status.state == "succeeded" and status.context.paid == "timed out" and status.context.n == 1


def test_a_webhook_retried_after_its_message_ended_the_job_is_a_duplicate_not_an_error(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def hook(ctx: Ctx, step: StepContext) -> dict[str, Any]:
        return {"paid": step.wait_for("paid")}

    with Engine(db_path) as e:
        e.register(flow)
        job = e.submit(flow, Ctx())
        e.run(job)
        assert e.send(job, "paid", "ch_1", key="evt_1") is True
        assert e.run(job).state == "succeeded"
        assert e.send(job, "paid", "ch_1", key="evt_1") is False  # the provider's retry: nothing stored
        with pytest.raises(JobFinished, match="succeeded"):
            e.send(job, "paid", "ch_2", key="evt_2")  # a new message to an ended job is still refused
        assert e.store.db.raw().execute("SELECT count(*) FROM walstate_message WHERE job_id=?", (job,)).fetchone()[0] == 1


@pytest.mark.sqlite_only
def test_send_to_a_file_another_writer_holds_is_a_typed_error_naming_what_it_was_sending(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="s")(lambda ctx, step: None)
    with Engine(db_path, busy_timeout=0.05, patience=0.2) as e:  # a send waits out its patience first
        e.register(flow)
        job = e.submit(flow, Ctx())
        other = sqlite3.connect(db_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process's writer, holding the write lock
        try:
            with pytest.raises(DatabaseBusy, match=rf"{re.escape(db_path)}.*sending 'paid' to job {job}"):
                e.send(job, "paid", 1)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert e.send(job, "paid", 1) is True  # nothing half-written: it goes through once the lock is free


def test_a_parked_job_can_be_cancelled(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="hook")(lambda ctx, step: step.wait_for("never"))
    with Engine(db_path) as e:
        e.register(flow)
        job = e.submit(flow, Ctx())
        e.run(job)
        assert e.cancel(job) == ["hook"]
        with pytest.raises(JobCancelled):
            e.run(job)


def test_a_thousand_sleeping_jobs_hold_no_threads_and_all_wake_close_to_their_time(db_path: str) -> None:
    jobs_n = 1000
    woke: dict[int, float] = {}
    lock = threading.Lock()
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def nap(ctx: Ctx, step: StepContext) -> None:
        wake_at = step.sleep(1.5)
        with lock:
            woke[ctx.n] = time.time() - wake_at

    with Engine(db_path) as e:
        e.register(flow)
        with e.start_worker(concurrency=4):
            jobs = [e.submit(flow, Ctx(n=i)) for i in range(jobs_n)]
            deadline = time.monotonic() + 60
            done = 0  # jobs[:done] have succeeded: each job is read until it has, not every job every time
            while done < jobs_n:
                if e.store.read.job(jobs[done]).state == "succeeded":
                    done += 1
                    continue
                assert time.monotonic() < deadline, "sleeping jobs did not all finish"
                # Waiting jobs hold no thread: the process runs far fewer threads than jobs.
                assert threading.active_count() < 40
                time.sleep(0.1)
    late = sorted(woke.values())
    assert len(late) == jobs_n and late[0] >= 0
    print(f"lateness p50 {late[jobs_n // 2] * 1000:.0f} ms, max {late[-1] * 1000:.0f} ms")
    assert late[-1] < 15.0  # all woke; the benchmark reports the real lateness figures


def test_show_says_what_a_waiting_step_waits_for(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="hook")(lambda ctx, step: StepResult(output=step.wait_for("paid", timeout=300)))
    with Engine(db_path) as e:
        e.register(flow)
        job = e.submit(flow, Ctx())
        e.run(job)
    walstate = str(Path(sys.executable).parent / "walstate")
    shown = json.loads(subprocess.run([walstate, "show", db_path, str(job), "--json"], capture_output=True,
                                      text=True, check=True).stdout)
    step = shown["phases"][0]["steps"][0]
    assert step["state"] == "waiting" and step["waits_for"]["topic"] == "paid" and step["waits_for"]["wake_at"]
    text = subprocess.run([walstate, "show", db_path, str(job)], capture_output=True, text=True, check=True).stdout
    assert "waits for a message on 'paid' or until" in text
    watched = subprocess.run([walstate, "watch", db_path, str(job), "--json", "--timeout", "0.2"],
                             capture_output=True, text=True)
    assert json.loads(watched.stdout.splitlines()[0])["waiting"]["hook"]["topic"] == "paid"
    sent = subprocess.run([walstate, "send", db_path, str(job), "paid", '{"id": 7}'], capture_output=True, text=True)
    assert sent.returncode == 0, sent.stderr
    with Engine(db_path) as e:
        e.register(flow)
        assert e.store.read.job(job).wake_at is None  # the message made it runnable at once
        assert e.run(job).state == "succeeded"


# -- schedules ------------------------------------------------------------------------


def test_a_schedule_makes_one_job_per_slot_across_engines_and_runs_only_the_latest_missed_slot(
        db_path: str) -> None:
    clock = Clock(1_800_000_000.0)  # a minute boundary
    flow = Workflow("tick", context=Ctx, phases=["p"])
    flow.step(phase="p", name="s")(lambda ctx, step: None)
    engines = [Engine(db_path, clock=clock) for _ in range(2)]
    try:
        for e in engines:
            e.schedule(flow, cron="*/5 * * * *", context=Ctx())
        for _ in range(3):  # both engines check the same slot, several times
            for e in engines:
                e._submit_due()
        clock.now += 3600  # an hour of downtime: 12 missed slots
        for e in engines:
            e._submit_due()
        keys = [r.key for r in engines[0].store.read.jobs(workflow="tick")]
        assert sorted(keys) == ["schedule:tick:2027-01-15T08:00:00Z", "schedule:tick:2027-01-15T09:00:00Z"]
    finally:
        for e in engines:
            e.close()


SCHEDULED = """
import sys
sys.path.insert(0, {root!r})
from tests.test_waits import tick_flow, Ctx
from walstate import Engine
e = Engine({db!r})
e.schedule(tick_flow(), cron="* * * * * *", context=Ctx())
e.serve(2)
"""


def tick_flow() -> Workflow[Ctx]:
    flow = Workflow("tick", context=Ctx, phases=["p"])
    flow.step(phase="p", name="s")(lambda ctx, step: None)
    return flow


def test_two_worker_processes_with_one_schedule_make_exactly_one_job_per_slot(db_path: str) -> None:
    Engine(db_path).close()
    code = SCHEDULED.format(root=str(ROOT), db=db_path)
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    try:

        deadline = time.monotonic() + 30
        while True:
            conn = connect(db_path)
            keys = [r[0] for r in conn.execute("SELECT key FROM walstate_job WHERE workflow='tick'")]
            conn.close()
            if len(keys) >= 4:
                break
            assert time.monotonic() < deadline, keys
            time.sleep(0.2)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    assert len(keys) == len(set(keys))  # one job per slot, though both processes ran the schedule
    assert is_postgres_url(db_path) or os.path.exists(db_path)


def keys_of(db_path: str, workflow: str = "tick") -> list[str]:
    conn = connect(db_path)
    keys = [str(r[0]) for r in conn.execute("SELECT key FROM walstate_job WHERE workflow=? ORDER BY id", (workflow,))]
    conn.close()
    return keys


def test_restarts_and_prunes_never_make_a_second_job_for_a_slot(db_path: str) -> None:
    # The latest slot lived in memory only: every worker start submitted it again, and only the
    # job key (which prune deletes) kept it from running twice (a daily report sent per restart).
    clock = Clock(1_800_000_000.0)  # a minute boundary
    made: list[str] = []
    for restart in range(4):
        with Engine(db_path, clock=clock) as e:
            e.schedule(tick_flow(), cron="*/5 * * * *", context=Ctx())
            e._submit_due()
            e._submit_due()
            for row in e.store.read.jobs(workflow="tick"):
                made.append(str(row.key))
                e.run(row.id)
            e.prune(0)
            assert e.store.read.jobs(workflow="tick") == []  # every job is gone, its key with it
        if restart == 2:
            clock.now += 300  # the next slot: it gets its job, once
    assert made == ["schedule:tick:2027-01-15T08:00:00Z", "schedule:tick:2027-01-15T08:05:00Z"]


def test_a_check_that_comes_late_submits_every_slot_since_the_last_one_not_only_the_latest(db_path: str) -> None:
    clock = Clock(1_800_000_000.0)
    with Engine(db_path, clock=clock) as e:
        e.schedule(tick_flow(), cron="* * * * * *", context=Ctx())
        e._submit_due()
        clock.now += 5.5  # a worker busy committing for 5.5 s: five slots came meanwhile
        e._submit_due()
        assert keys_of(db_path) == [f"schedule:tick:2027-01-15T08:00:0{s}Z" for s in range(6)]


def test_slots_older_than_the_grace_are_missed_latest_runs_the_newest_of_them_and_skip_none(db_path: str) -> None:
    clock = Clock(1_800_000_000.0)
    with Engine(db_path, clock=clock) as e:
        e.schedule(tick_flow(), cron="*/5 * * * *", context=Ctx())
        other = Workflow("tock", context=Ctx, phases=["p"])
        other.step(phase="p", name="s")(lambda ctx, step: None)
        e.schedule(other, cron="*/5 * * * *", context=Ctx(), missed="skip", grace=30)
        e._submit_due()
        clock.now += 3600 + 10  # an hour of downtime; the 09:00 slot is 10 s old, within both graces
        e._submit_due()
        clock.now += 300 + 50  # 09:05 is 50 s old: on time for tick (60 s), missed for tock (30 s)
        e._submit_due()
        clock.now += 3 * 3600  # three hours more: tick runs the newest missed slot, tock nothing
        e._submit_due()
        e._submit_due()
    assert keys_of(db_path) == [f"schedule:tick:2027-01-15T{t}:00Z" for t in ("08:00", "09:00", "09:05", "12:05")]
    assert keys_of(db_path, "tock") == [f"schedule:tock:2027-01-15T{t}:00Z" for t in ("08:00", "09:00")]


def test_the_latest_slot_is_a_whole_second_when_the_check_comes_inside_the_slots_own_second() -> None:
    # latest_slot returned the check's own time when it fell in the first second of a minute:
    # 08:00:00.6 keyed the slot 08:00:00 but stored it as 08:00:01 (see the next test).
    from walstate.schedules import Schedule

    minute = 1_800_000_000.0
    for cron in ("* * * * * *", "*/5 * * * *", "0 8 * * *"):
        sched = Schedule("s", tick_flow(), cron, Ctx())
        for fraction in (0.0, 0.3, 0.6, 0.999):
            assert sched.latest_slot(minute + fraction) == minute, (cron, fraction)
    every_second = Schedule("s", tick_flow(), "* * * * * *", Ctx())
    assert every_second.latest_slot(minute + 7.5) == minute + 7


def test_a_check_inside_a_slots_second_after_its_job_was_pruned_makes_no_second_job_and_skips_no_slot(
        db_path: str) -> None:
    # Found by CI: a worker checking at 16:55:00.6 made the 16:55:00 job; a check at 16:55:00.8
    # found no on-time slot and ran "the latest missed" one, 16:55:00.8, whose key is 16:55:00
    # again (a second job once the first was pruned) and whose progress rounded to 16:55:01
    # (that slot skipped).
    clock = Clock(1_800_000_000.6)
    made: dict[int, str] = {}
    with Engine(db_path, clock=clock) as e:
        e.schedule(tick_flow(), cron="* * * * * *", context=Ctx(), grace=3600)
        for step in (0.0, 0.2, 0.15, 0.5, 0.3, 0.2, 0.45):
            clock.now += step
            e._submit_due()
            for job in e.store.read.jobs(workflow="tick"):
                made[job.id] = str(job.key)
                e.cancel(job.id)
            e.prune(0, states=("cancelled",))
    assert clock.now == pytest.approx(1_800_000_002.4)
    assert sorted(made.values()) == [f"schedule:tick:2027-01-15T08:00:0{s}Z" for s in range(3)]


def test_a_slot_with_float_residue_is_stored_as_its_whole_second_and_is_not_made_again(db_path: str) -> None:
    # A slot computed from a shifted clock (PostgreSQL's server-clock correction) carried residue:
    # 07:59:59.99999 stored made 08:00:00 a later slot, and made the slot's job again.
    flow = tick_flow()
    minute = 1_800_000_000.0
    with Engine(db_path) as e:
        e.register(flow)
        args = (flow.name, "schedule:tick:x", "{}", flow.ranked_steps(), flow.version, flow.fingerprint)
        first = e.store.write.create_scheduled("tick", minute - 1e-5, *args)
        assert first is not None and e.store.read.schedule_slot("tick") == minute
        e.cancel(first)
        e.prune(0, states=("cancelled",))
        assert e.store.write.create_scheduled("tick", minute, *args) is None
        assert e.store.write.create_scheduled("tick", minute + 1e-5, *args) is None
        assert e.store.read.jobs(workflow="tick") == []
        assert e.store.write.pass_slot("tick", minute + 1 - 1e-5) and e.store.read.schedule_slot("tick") == minute + 1


SCHEDULED_GRACE = """
import sys
sys.path.insert(0, {root!r})
from tests.test_waits import tick_flow, Ctx
from walstate import Engine
e = Engine({db!r})
e.schedule(tick_flow(), cron="* * * * * *", context=Ctx(), grace=3600)
e.serve(2)
"""


@pytest.mark.slow
def test_a_worker_stopped_killed_restarted_and_pruned_makes_exactly_one_job_per_slot_with_none_skipped(
        db_path: str) -> None:
    import signal

    Engine(db_path).close()
    code = SCHEDULED_GRACE.format(root=str(ROOT), db=db_path)
    made: dict[int, str] = {}  # every job ever made (by id), across prunes

    def wait_for_more(than: int) -> None:
        deadline = time.monotonic() + 60
        while True:
            conn = connect(db_path)
            made.update({int(i): str(k) for i, k in conn.execute("SELECT id, key FROM walstate_job WHERE workflow='tick'")})
            conn.close()
            if len(made) > than:
                return
            assert time.monotonic() < deadline, made
            time.sleep(0.2)

    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", code])
        try:
            wait_for_more(len(made) + 1)
            proc.send_signal(signal.SIGSTOP)  # a worker that cannot check for 2 s: its slots still come
            time.sleep(2)
            proc.send_signal(signal.SIGCONT)
            wait_for_more(len(made) + 2)
        finally:
            proc.kill()
            proc.wait(30)
        wait_for_more(0)
        with Engine(db_path) as e:
            e.prune(0, states=("succeeded", "cancelled", "failed"))  # the next start must not make them again
    keys = list(made.values())
    assert len(keys) == len(set(keys)), sorted(keys)  # no slot made twice, though pruned and restarted
    slots = sorted(dt.datetime.strptime(k[len("schedule:tick:"):], "%Y-%m-%dT%H:%M:%SZ")
                   for k in keys)
    assert [(b - a).total_seconds() for a, b in zip(slots, slots[1:])] == [1.0] * (len(slots) - 1)  # none skipped


def test_a_wait_in_a_later_phase_gets_a_message_sent_after_the_job_parked(db_path: str) -> None:
    # Found by a new user: a run woken for a wait of phase 2 stopped after phase 1 (a step
    # of phase 2 was waiting) and parked again at once, thousands of times a second.
    flow = Workflow("w", context=Ctx, phases=["first", "second"])
    flow.step(phase="first", name="prepare")(lambda ctx, step: {"n": 1})
    flow.step(phase="second", name="charge")(lambda ctx, step: {"paid": step.wait_for("paid")})
    with Engine(db_path) as e:
        e.register(flow)
        handle = e.start(flow, Ctx())
        deadline = time.monotonic() + 10
        while e.store.read.job(handle.id).wake_at is None:  # parked, waiting for "paid"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        e.send(handle.id, "paid", "ch_9")
        assert handle.result(timeout=10).context.paid == "ch_9"
        claims = [r for r in e.history(handle.id) if r.step is None and r.note == "claimed"]
        assert len(claims) <= 3  # claimed, parked, claimed again: no claim-park loop
