"""Exactly once under concurrency, not only under crashes (issue 11), in one process.

Each test names a way the first release ran a sub-step twice, got stuck or
failed the wrong way with no crash at all. The real-process cases (fork,
zombies, other pid namespaces, the multi-process load) are in
``test_ownership_processes.py``.
"""

from __future__ import annotations

import math
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from walstate import (
    ContextInvalid,
    DefinitionError,
    Engine,
    EngineClosed,
    InvalidTransition,
    JobCancelled,
    JobFailed,
    JobOwned,
    LeaseLost,
    Retry,
    StepContext,
    StepResult,
    Workflow,
)
from walstate.ownership import HUNG_GRACE, Identity, OwnerInfo, _proc_stat, describe_owner, owner_alive
from walstate.storage.contract import open_store
from walstate.storage.leaseclock import boottime, sqlite_lease_clock
from walstate.testing import check_invariants

from .helpers import wait_until

from walstate.testing import connect

pytestmark = pytest.mark.backends


class Ctx(BaseModel):
    name: str = ""
    n: int = 0
    x: float = 0.0


def engine_for(path: str, *flows: Workflow[Any], **kwargs: Any) -> Engine:
    e = Engine(path, **kwargs)
    for flow in flows:
        e.register(flow)
    return e


class Gate:
    """A handler that signals it is running and waits to be released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self.cancelled_seen = False

    def __call__(self, ctx: Ctx, step: StepContext) -> None:
        self.calls += 1
        self.entered.set()
        while not self.release.wait(0.01):
            if step.cancelled.is_set():
                self.cancelled_seen = True
                return


def gated_flow(gate: Gate, name: str = "w", then: int = 1) -> Workflow[Ctx]:
    flow = Workflow(name, context=Ctx, phases=["p", "q"])
    flow.step(phase="p", name="slow")(gate)
    for i in range(then):
        flow.step(phase="q", name=f"after{i}")(lambda ctx, step: None)
    return flow


def background(fn: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            out.append(exc)

    t = threading.Thread(target=target)
    t.start()
    return t, out


# -- 1. one engine, two run() calls --------------------------------------------


def test_a_second_run_of_a_job_this_engine_is_running_waits_for_it_and_runs_nothing_twice(db_path: str) -> None:
    gate = Gate()
    flow = gated_flow(gate)
    with engine_for(db_path, flow) as e:
        job = e.submit("w", Ctx())
        t1, out1 = background(e.run, job)
        assert gate.entered.wait(10)
        t2, out2 = background(e.run, job)
        assert e.recover() == []  # recover() skips the job this engine runs
        time.sleep(0.05)
        assert t2.is_alive()  # waiting for the live run, not running it again
        gate.release.set()
        t1.join(10)
        t2.join(10)
        assert out1[0].state == out2[0].state == "succeeded"
        assert gate.calls == 1
        assert [r.attempt for r in e.history(job, "slow")] == [1, 1]
    check_invariants(db_path, flow, job)


def test_every_run_claims_the_job_with_a_new_epoch(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="s", retry=Retry(max_attempts=1))(lambda ctx, step: 1 / 0)
    with engine_for(db_path, flow) as e:
        job = e.submit("w", Ctx())
        epoch = lambda: e.store.read.job(job).epoch  # noqa: E731
        assert epoch() == 0
        with pytest.raises(JobFailed):
            e.run(job)
        first = epoch()
        assert first >= 2  # claimed, then released with the job's end
        e.retry(job)
        with pytest.raises(JobFailed):
            e.run(job)
        assert epoch() >= first + 3  # the retry and the second run each moved it on
        assert e.store.read.job(job).owner is None


def test_the_claim_sets_a_lease_on_the_lease_clock_not_the_engines_clock_and_the_end_releases_it(
        db_path: str) -> None:
    gate = Gate()
    flow = gated_flow(gate)
    now = [1000.0]
    with engine_for(db_path, flow, lease=30.0, clock=lambda: now[0]) as e:
        job = e.submit("w", Ctx())
        t, _ = background(e.run, job)
        assert gate.entered.wait(10)
        row = e.store.read.job(job)
        # The injected clock says 1000; leases are measured on the store's lease clock (close to Unix time).
        assert row.owner == e.owner and row.lease_expires is not None and row.renewed_at is not None
        assert row.renewed_at <= e.lease_clock() and row.lease_expires == pytest.approx(row.renewed_at + 30.0, abs=1.0)
        assert abs(row.renewed_at - time.time()) < 3600
        gate.release.set()
        t.join(10)
        row = e.store.read.job(job)
        assert row.owner is None and row.lease_expires is None



def _stored_anchor(db_path: str) -> str:
    conn = connect(db_path, timeout=10)
    try:
        return str(conn.execute("SELECT value FROM walstate_meta WHERE key='lease_clock'").fetchone()[0])
    finally:
        conn.close()


def _set_anchor(db_path: str, value: str) -> None:
    conn = connect(db_path, timeout=10)
    try:
        conn.execute("UPDATE walstate_meta SET value=? WHERE key='lease_clock'", (value,))
        conn.commit()
    finally:
        conn.close()


@pytest.mark.sqlite_only
def test_every_store_on_one_file_reads_one_lease_clock_anchored_in_the_file_for_this_boot(db_path: str) -> None:
    boot = Identity.current().boot_id
    first = open_store(db_path)
    second = open_store(db_path)
    try:
        anchor = first.lease_clock.anchor  # type: ignore[attr-defined]
        assert second.lease_clock.anchor == anchor  # type: ignore[attr-defined]
        assert _stored_anchor(db_path) == f"{boot} {anchor!r}"
        # Unix-like seconds: the boot's wall-clock time plus the time since boot, on a clock that never steps.
        assert abs(first.lease_clock() - time.time()) < 3600
        assert first.lease_clock() == pytest.approx(anchor + boottime(), abs=60)
        # A read-only open (walstate show) reads the same anchor, exactly.
        reader = open_store(db_path, readonly=True)
        try:
            assert reader.lease_clock.anchor == anchor  # type: ignore[attr-defined]
        finally:
            reader.close()
    finally:
        first.close()
        second.close()


@pytest.mark.sqlite_only
def test_a_process_that_cannot_read_its_boot_id_anchors_the_lease_clock_for_no_boot(db_path: str) -> None:
    # No boot id (a container hiding /proc/sys/kernel/random/boot_id, via a bind mount here): the anchor it
    # writes names no boot, so no later process (of this boot or another) trusts it as its own.
    open_store(db_path).close()
    code = ("import sys\n"
            "from walstate.storage.contract import open_store\n"
            "open_store(sys.argv[1]).close()\n")
    shell = f"mount --bind /dev/null /proc/sys/kernel/random/boot_id && exec {sys.executable} -c \"$0\" \"$1\""
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, code, db_path],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    if done.returncode != 0 and ("unshare" in done.stderr or "mount" in done.stderr):
        pytest.skip(f"cannot hide the boot id here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    boot, _, anchor = _stored_anchor(db_path).partition(" ")
    assert boot == "" and float(anchor) > 0


@pytest.mark.sqlite_only
def test_a_lease_clock_anchored_in_another_boot_is_replaced_by_a_write_open_and_left_by_a_read_only_one(
        db_path: str) -> None:
    boot = Identity.current().boot_id
    open_store(db_path).close()
    _set_anchor(db_path, "another-boot 5.0")
    reader = open_store(db_path, readonly=True)
    try:
        assert abs(reader.lease_clock() - time.time()) < 3600  # its own anchor, not another boot's
        assert _stored_anchor(db_path) == "another-boot 5.0"  # a read-only open writes nothing
    finally:
        reader.close()
    writer = open_store(db_path)
    try:
        anchor = writer.lease_clock.anchor  # type: ignore[attr-defined]
        assert abs(writer.lease_clock() - time.time()) < 3600
        assert _stored_anchor(db_path) == f"{boot} {anchor!r}"
    finally:
        writer.close()
    # A file with an anchor but no boot id to tell whose (a host that hides it) is anchored again too.
    _set_anchor(db_path, " 5.0")
    again = open_store(db_path)
    try:
        assert abs(again.lease_clock() - time.time()) < 3600
    finally:
        again.close()


@pytest.mark.sqlite_only
def test_a_store_opening_while_another_process_anchors_the_lease_clock_takes_that_anchor(db_path: str) -> None:
    # Two processes open a file of a new boot at once: the one that anchors second must read the first one's
    # anchor under the write lock, not write its own (their lease clocks would disagree).
    boot = Identity.current().boot_id
    open_store(db_path).close()
    _set_anchor(db_path, "another-boot 5.0")
    holder = sqlite3.connect(db_path, isolation_level=None, timeout=10)
    opener = sqlite3.connect(db_path, isolation_level=None, timeout=60, check_same_thread=False)
    begun = threading.Event()
    opener.set_trace_callback(lambda sql: begun.set() if sql.startswith("BEGIN IMMEDIATE") else None)
    got: list[Any] = []
    try:
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("UPDATE walstate_meta SET value=? WHERE key='lease_clock'", (f"{boot} 12345.5",))
        t = threading.Thread(target=lambda: got.append(sqlite_lease_clock(opener, write=True)))
        t.start()
        assert begun.wait(60), "the opener never asked for the write lock"
        holder.execute("COMMIT")
        t.join(60)
        assert got and got[0].anchor == 12345.5
        assert _stored_anchor(db_path) == f"{boot} 12345.5"
        assert not opener.in_transaction
    finally:
        holder.close()
        opener.close()

# -- liveness that cannot be fooled ------------------------------------------------


def foreign_token(boot: str = "another-boot") -> str:
    me = Identity.current()
    return f"{boot}|{me.pid_ns}|{me.host}|{me.pid}|{me.start}|nonce"


def test_an_owner_from_another_boot_or_namespace_is_judged_by_its_lease_only() -> None:
    token = foreign_token()
    assert owner_alive(token, 1, lease_expires=200.0, now=100.0)
    assert not owner_alive(token, 1, lease_expires=100.0, now=100.0)
    assert not owner_alive(token, 1, lease_expires=None, now=100.0)
    me = Identity.current()
    other_ns = f"{me.boot_id}|999999|{me.host}|{me.pid}|{me.start}|nonce"
    assert owner_alive(other_ns, 1, lease_expires=200.0, now=100.0)
    assert not owner_alive(other_ns, 1, lease_expires=99.0, now=100.0)


def test_an_owner_on_this_host_is_judged_by_its_pid_until_its_lease_is_expired_past_the_grace() -> None:
    me = Identity.current()
    # This process, but no live run of that job: dead, even with a valid lease.
    assert not owner_alive(me.token("x"), 7, lease_expires=1e12, now=0.0)
    # pid 1 of this namespace lives: alive with an expired lease, within the grace ...
    stat = _proc_stat(1)
    assert stat is not None
    init = Identity(me.boot_id, me.pid_ns, me.host, 1, stat[1])
    assert owner_alive(init.token("x"), 7, lease_expires=100.0, now=100.0 + HUNG_GRACE - 0.01)
    assert owner_alive(init.token("x"), 7, lease_expires=None, now=1e12)  # a lease never set: only the pid counts
    # ... and hung once its lease has been expired for the grace: a live pid does not save it.
    assert not owner_alive(init.token("x"), 7, lease_expires=100.0, now=100.0 + HUNG_GRACE)
    assert not owner_alive(init.token("x"), 7, lease_expires=0.0, now=1e12)
    # A pid that started at another time is a reused pid: the owner is gone.
    reused = Identity(me.boot_id, me.pid_ns, me.host, 1, "1")
    assert not owner_alive(reused.token("x"), 7, lease_expires=1e12, now=0.0)



def test_an_owner_token_is_described_as_its_host_and_pid_and_an_unreadable_one_as_neither() -> None:
    # What `walstate show` and `status` print as the holder of a job.
    token = Identity("boot", "4026531836", "web-2", 4242, "987").token("n0nce")
    assert describe_owner(token) == OwnerInfo(token, "web-2", 4242)
    no_host = Identity("boot", "ns", "", 17, "1").token("n")
    assert describe_owner(no_host) == OwnerInfo(no_host, None, 17)
    bad_pid = "boot|ns|web-2|pid|1|n"
    assert describe_owner(bad_pid) == OwnerInfo(bad_pid, "web-2", None)
    for unreadable in ("an-older-walstate-owner", "a|b|c|1|2", "a|b|c|1|2|3|4", "a b c 1 2 3"):
        assert describe_owner(unreadable) == OwnerInfo(unreadable, None, None), unreadable

# -- 4. heartbeats -------------------------------------------------------------------


def test_a_handler_longer_than_its_lease_keeps_the_lease_renewed(db_path: str) -> None:
    gate = Gate()
    flow = gated_flow(gate)
    with engine_for(db_path, flow, lease=0.3) as e:
        job = e.submit("w", Ctx())
        t, _ = background(e.run, job)
        assert gate.entered.wait(10)
        first = e.store.read.job(job).lease_expires
        assert first is not None
        seen = {first}
        deadline = time.monotonic() + 60
        # Renewed again and again until it reaches past three leases, not set once.
        while len(seen) < 5 or max(x for x in seen if x is not None) < first + 1.0:
            assert time.monotonic() < deadline, "the lease was not renewed"
            row = e.store.read.job(job)
            assert row.owner is not None and row.state == "running"  # the run keeps its claim
            seen.add(row.lease_expires)
            time.sleep(0.02)
        gate.release.set()
        t.join(10)
        assert gate.calls == 1


def test_a_run_that_lost_its_claim_stops_and_its_late_completion_is_refused(db_path: str) -> None:
    gate = Gate()
    flow = gated_flow(gate)
    with engine_for(db_path, flow, lease=0.3) as e:
        job = e.submit("w", Ctx())
        t, out = background(e.run, job)
        assert gate.entered.wait(10)
        row = e.store.read.job(job)
        # Another host takes the job over (as if our lease had expired there).
        assert e.store.write.claim(job, state="running", epoch=row.epoch, owner=foreign_token(),
                                   lease_expires=time.time() + 60, note="taken over") is not None
        t.join(10)  # the heartbeat notices; the handler sees step.cancelled and returns
        assert isinstance(out[0], LeaseLost)
        assert gate.cancelled_seen
        steps = e.store.read.steps(job)
        assert {s.name: s.state for s in steps} == {"slow": "running", "after0": "pending"}  # nothing more written
        assert e.store.read.job(job).owner == foreign_token()


def _failing_once_then_waiting(failed: threading.Event) -> Workflow[Ctx]:
    """A one-step workflow whose step fails, then waits 30 s to retry: a run with nothing left to write for now."""
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p", retry=Retry(max_attempts=3, backoff=30.0))
    def flaky(ctx: Ctx, step: StepContext) -> None:
        failed.set()
        raise RuntimeError("try again later")

    return flow


def test_a_run_that_loses_its_claim_while_its_step_waits_to_retry_stops_and_writes_nothing(db_path: str) -> None:
    failed = threading.Event()
    with engine_for(db_path, _failing_once_then_waiting(failed), lease=0.3) as e:
        job = e.submit("w", Ctx())
        t, out = background(e.run, job)
        assert failed.wait(10)
        wait_until(lambda: e.store.read.steps(job)[0].state == "retrying")
        row = e.store.read.job(job)
        assert e.store.write.claim(job, state="running", epoch=row.epoch, owner=foreign_token(),
                                   lease_expires=time.time() + 60, note="taken over") is not None
        t.join(10)  # the heartbeat notices and wakes the backoff: no write is pending to refuse, the run ends
        assert isinstance(out[0], LeaseLost)
        assert str(out[0]).endswith(f"job {job} (w): this run lost its claim on the job (another run took it over "
                                    "after its lease expired); it stopped and wrote nothing more")
        assert [s.state for s in e.store.read.steps(job)] == ["retrying"]
        assert e.store.read.job(job).owner == foreign_token()


def test_closing_the_engine_while_the_only_step_waits_to_retry_leaves_the_job_unfinished(db_path: str) -> None:
    failed = threading.Event()
    e = engine_for(db_path, _failing_once_then_waiting(failed))
    job = e.submit("w", Ctx())
    t, out = background(e.run, job)
    assert failed.wait(10)
    wait_until(lambda: e.store.read.steps(job)[0].state == "retrying")
    e.close(grace=5)
    t.join(10)
    assert isinstance(out[0], EngineClosed)  # released for another run, not failed
    with engine_for(db_path, _failing_once_then_waiting(threading.Event())) as again:
        row = again.store.read.job(job)
        assert row.state == "running" and row.owner is None
        assert [s.state for s in again.store.read.steps(job)] == ["retrying"]


def test_a_job_whose_last_step_is_transactional_gives_up_its_claim_with_its_success(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="last", transactional=True)(lambda ctx, step: None)
    with engine_for(db_path, flow) as e:
        job = e.submit("w", Ctx())
        assert e.run(job).state == "succeeded"
        row = e.store.read.job(job)
        assert row.owner is None and row.lease_expires is None
        assert e.store.read.steps(job)[0].output is None  # no output is NULL, not the JSON text 'null'


# -- 6. once() in a transactional step --------------------------------------------------


def test_once_records_survive_the_rollback_of_a_failed_transactional_attempt(db_path: str) -> None:
    calls = Counter[str]()
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p", transactional=True, retry=Retry(max_attempts=3))
    def charge(ctx: Ctx, step: StepContext) -> None:
        step.once("charge", lambda: calls.update(["charge"]) or "ch_1")
        raise RuntimeError("the database part failed after the charge")

    with engine_for(db_path, flow) as e:
        job = e.submit("w", Ctx())
        with pytest.raises(JobFailed):
            e.run(job)
        assert e.status(job).steps["charge"].attempts == 3
    assert calls["charge"] == 1


# -- 7. cancel and retry on a live job ---------------------------------------------------


def test_cancel_of_a_live_run_waits_for_it_and_retry_cannot_start_a_second_execution(db_path: str) -> None:
    gate = Gate()
    gate_ignores = Gate()
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def slow(ctx: Ctx, step: StepContext) -> None:
        gate_ignores.calls += 1
        gate_ignores.entered.set()
        gate_ignores.release.wait(10)  # ignores step.cancelled

    with engine_for(db_path, flow) as e1, engine_for(db_path, flow) as e2:
        job = e1.submit("w", Ctx())
        t, out = background(e1.run, job)
        assert gate_ignores.entered.wait(10)
        with pytest.raises(JobOwned, match="cancellation was requested"):
            e2.cancel(job, wait=0.3)
        with pytest.raises(InvalidTransition):
            e2.retry(job)  # still running: nothing to retry
        assert e2.recover() == []
        gate_ignores.release.set()
        t.join(10)
        assert isinstance(out[0], JobCancelled)  # the run honoured the request when its handler returned
        assert e2.status(job).state == "cancelled"
        e2.retry(job)
        e2.run(job)
        assert e2.status(job).state == "succeeded"
    # The handler that ignored the cancel completed (its result was kept), so the
    # retry had nothing to run again: it ran once, never concurrently.
    assert gate_ignores.calls == 1
    del gate


def test_cancel_in_the_running_engine_reaches_the_run_and_handlers_see_it(db_path: str) -> None:
    gate = Gate()
    flow = gated_flow(gate, then=2)
    with engine_for(db_path, flow) as e:
        job = e.submit("w", Ctx())
        t, out = background(e.run, job)
        assert gate.entered.wait(10)
        names = e.cancel(job)
        t.join(10)
        assert isinstance(out[0], JobCancelled)  # not a StaleState
        assert gate.cancelled_seen
        assert sorted(names) == ["after0", "after1"]
        assert {n: s.state for n, s in e.status(job).steps.items()} == {
            "slow": "succeeded", "after0": "cancelled", "after1": "cancelled"}
        assert e.store.read.job(job).owner is None


# -- 8. recovery never stops; run() validates before it claims ----------------------------


def test_recover_skips_a_job_it_cannot_run_and_goes_on_with_the_next(db_path: str) -> None:
    old = Workflow("w", context=Ctx, phases=["p"])
    old.step(phase="p", name="one")(lambda ctx, step: None)
    with engine_for(db_path, old) as e:
        stale = e.submit("w", Ctx())
    new = Workflow("w", context=Ctx, phases=["p"])
    new.step(phase="p", name="one")(lambda ctx, step: None)
    new.step(phase="p", name="two")(lambda ctx, step: None)
    with engine_for(db_path, new) as e:
        fine = e.submit("w", Ctx())
        before = e.store.read.job(stale)
        report = e.recover()
        assert list(report) == [fine]
        assert "DefinitionError" in report.skipped[stale]
        with pytest.raises(DefinitionError):
            e.run(stale)
        after = e.store.read.job(stale)
        assert (after.state, after.owner, after.epoch) == (before.state, before.owner, before.epoch) == (
            "pending", None, 0)  # validated before any claim


def test_a_stored_context_that_no_longer_validates_is_reported_not_raised_raw(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="one")(lambda ctx, step: None)
    with engine_for(db_path, flow) as e:
        bad = e.submit("w", Ctx())
        good = e.submit("w", Ctx())
    conn = connect(db_path)
    with conn:
        conn.execute("UPDATE walstate_job SET context=? WHERE id=?", ('{"n": "not a number"}', bad))
    conn.close()
    with engine_for(db_path, flow) as e:
        report = e.recover()
        assert list(report) == [good] and "ContextInvalid" in report.skipped[bad]
        with pytest.raises(ContextInvalid, match=f"job {bad}"):
            e.status(bad)


# -- 9, 10, 11. user-code errors fail the step, not the bookkeeping -------------------------


def test_a_bad_context_update_of_one_job_never_fails_other_jobs_sharing_its_group_commit(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def name_it(ctx: Ctx, step: StepContext) -> dict[str, Any]:
        # A file name from os.listdir on a non-UTF-8 name carries a surrogate escape.
        return {"name": "caf\udce9" if ctx.n == 0 else f"job{ctx.n}"}

    with engine_for(db_path, flow, workers=1) as e:
        jobs = [e.submit("w", Ctx(n=i)) for i in range(40)]
        threads = [background(e.run, j) for j in jobs]
        for t, _ in threads:
            t.join(20)
        outcomes = {j: out[0] for j, (_, out) in zip(jobs, threads)}
        assert isinstance(outcomes[jobs[0]], JobFailed)
        assert "ContextInvalid" in e.status(jobs[0]).steps["name_it"].error
        for j in jobs[1:]:
            assert e.status(j).state == "succeeded", outcomes[j]
        assert all(e.store.read.job(j).owner is None for j in jobs)


@pytest.mark.parametrize("result,error", [
    (StepResult(context={"x": math.nan}), "ContextInvalid"),
    (StepResult(context={"x": math.inf}), "ContextInvalid"),
    ([math.inf], "OutputNotJSON"),
    ({"x": -math.inf}, "OutputNotJSON"),  # a dict result is also the step's output
])
def test_nan_and_infinity_are_refused_at_the_step_and_everything_stays_readable(
        db_path: str, result: Any, error: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="bad")(lambda ctx, step: result)
    with engine_for(db_path, flow) as e:
        with pytest.raises(ContextInvalid):
            e.submit("w", Ctx(x=math.inf))
        job = e.submit("w", Ctx())
        with pytest.raises(JobFailed) as failed:
            e.run(job)
        assert error in failed.value.errors["bad"]
        assert e.status(job).context == Ctx()  # nothing was stored as null
        assert e.recover() == []


def test_a_when_predicate_that_raises_fails_the_step_under_its_retry_policy(db_path: str) -> None:
    calls = Counter[str]()

    def when(ctx: Ctx) -> bool:
        calls["when"] += 1
        raise KeyError("missing")

    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="guarded", when=when, retry=Retry(max_attempts=2))(lambda ctx, step: None)
    with engine_for(db_path, flow) as e:
        job = e.submit("w", Ctx())
        with pytest.raises(JobFailed, match="when"):
            e.run(job)
        row = e.store.read.job(job)
        assert row.state == "failed" and row.owner is None
        assert calls["when"] == 2


# -- 12. backoff ---------------------------------------------------------------------------


def test_the_retry_delay_is_capped_and_never_overflows() -> None:
    retry = Retry(max_attempts=5000, backoff=1.0, max_backoff=30.0, jitter=0.1)
    for attempt in (1, 10, 1025, 5000, 10**9):
        assert 0 <= retry.delay(attempt) <= 33.0
    assert retry.delay(1) >= 1.0 and retry.delay(1) <= 1.1


def test_a_step_waiting_in_backoff_wakes_when_a_sibling_fails_for_good(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="flaky", retry=Retry(max_attempts=3, backoff=600.0, jitter=0))(
        lambda ctx, step: 1 / 0)

    @flow.step(phase="p", name="doomed")
    def doomed(ctx: Ctx, step: StepContext) -> None:
        time.sleep(0.1)
        raise RuntimeError("for good")

    with engine_for(db_path, flow, workers=2) as e:
        job = e.submit("w", Ctx())
        started = time.monotonic()
        with pytest.raises(JobFailed):
            e.run(job)
        assert time.monotonic() - started < 300  # woken, not after the 600 s backoff
        assert e.status(job).steps["flaky"].attempts == 1


# -- 13. close() during a run --------------------------------------------------------------


def test_close_during_a_run_lets_the_step_finish_and_releases_the_job_for_another_run(db_path: str) -> None:
    gate = Gate()
    flow = gated_flow(gate)
    e1 = engine_for(db_path, flow)
    job = e1.submit("w", Ctx())
    t, out = background(e1.run, job)
    assert gate.entered.wait(10)
    closer = threading.Thread(target=e1.close)
    closer.start()
    time.sleep(0.05)
    gate.release.set()
    closer.join(10)
    t.join(10)
    assert isinstance(out[0], EngineClosed)
    with engine_for(db_path, flow) as e2:
        row = e2.store.read.job(job)
        assert row.state == "running" and row.owner is None
        assert e2.status(job).steps["slow"].state == "succeeded"
        assert "released" in (e2.history(job)[-1].note or "")
        assert e2.recover() == [job]
        assert e2.status(job).state == "succeeded"
    assert gate.calls == 1


# -- 14. nested runs and writes inside the handler's own transaction ------------------------


def test_running_a_job_inside_a_transactional_step_is_refused_at_once(db_path: str) -> None:
    child = Workflow("child", context=Ctx, phases=["p"])
    child.step(phase="p", name="c1")(lambda ctx, step: None)
    child.step(phase="p", name="c2")(lambda ctx, step: None)
    parent = Workflow("parent", context=Ctx, phases=["p"])
    holder: list[Engine] = []

    @parent.step(phase="p", transactional=True)
    def spawn(ctx: Ctx, step: StepContext) -> None:
        e = holder[0]
        e.run(e.submit("child", Ctx()))

    with engine_for(db_path, parent, child, workers=2, busy_timeout=120.0) as e:
        holder.append(e)
        job = e.submit("parent", Ctx())
        started = time.monotonic()
        with pytest.raises(JobFailed) as failed:
            e.run(job)
        assert time.monotonic() - started < 60  # refused, not after the 120 s busy timeout
        assert "UsageError" in failed.value.errors["spawn"]


def test_once_and_submit_inside_the_handlers_own_atomic_block_do_not_wait_for_the_busy_timeout(
        db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    holder: list[Engine] = []

    @flow.step(phase="p")
    def inside(ctx: Ctx, step: StepContext) -> None:
        with step.db.atomic():
            step.once("call", lambda: "ok")
            holder[0].submit("w", Ctx(n=99), key="child")

    for i in range(6):  # busy siblings committing while `inside` holds its transaction
        flow.step(phase="p", name=f"sibling{i}")(lambda ctx, step: {"n": 1})
    with engine_for(db_path, flow, workers=4, busy_timeout=120.0) as e:
        holder.append(e)
        job = e.submit("w", Ctx())
        started = time.monotonic()
        assert e.run(job).state == "succeeded"
        assert time.monotonic() - started < 60  # not after the 120 s busy timeout


# -- 15. operator retry and cancel -----------------------------------------------------------


def test_retrying_a_failed_step_gives_it_a_fresh_attempt_budget(db_path: str) -> None:
    calls = Counter[str]()

    def flaky(ctx: Ctx, step: StepContext) -> None:
        calls["flaky"] += 1
        if calls["flaky"] < 5:
            raise RuntimeError(f"failure {calls['flaky']}")

    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="flaky", retry=Retry(max_attempts=3))(flaky)
    with engine_for(db_path, flow) as e:
        job = e.submit("w", Ctx())
        with pytest.raises(JobFailed):
            e.run(job)
        assert calls["flaky"] == 3
        assert e.retry(job, "flaky") == ["flaky"]
        assert e.run(job).state == "succeeded"  # attempts 4 and 5: a new budget of 3
        assert calls["flaky"] == 5


def test_retrying_one_failed_step_when_a_sibling_failed_too_names_what_else_to_retry(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="a")(lambda ctx, step: 1 / 0)
    flow.step(phase="p", name="b")(lambda ctx, step: 1 / 0)
    with engine_for(db_path, flow, workers=2) as e:
        job = e.submit("w", Ctx())
        with pytest.raises(JobFailed):
            e.run(job)
        failed = [n for n, s in e.status(job).steps.items() if s.state == "failed"]
        if len(failed) == 2:
            with pytest.raises(InvalidTransition, match=r"\['b'\] failed too"):
                e.retry(job, "a")
        assert e.status(job).state == "failed"  # nothing written by the refusal
        assert sorted(e.retry(job)) == ["a", "b"] or len(failed) == 1


# -- 16. one run's threads -----------------------------------------------------------------------


def test_a_short_job_never_waits_for_other_jobs_long_steps(db_path: str) -> None:
    gate = Gate()
    long_flow = Workflow("long", context=Ctx, phases=["p"])
    for i in range(2):
        long_flow.step(phase="p", name=f"long{i}")(gate)
    short = Workflow("short", context=Ctx, phases=["p"])
    for i in range(3):
        short.step(phase="p", name=f"s{i}")(lambda ctx, step: None)
    with engine_for(db_path, long_flow, short, workers=2) as e:
        longs = [background(e.run, e.submit("long", Ctx(n=i))) for i in range(2)]
        wait_until(lambda: gate.calls == 4)
        t, out = background(e.run, e.submit("short", Ctx()))
        t.join(5)
        assert not t.is_alive() and out[0].state == "succeeded"  # while the long steps still hold
        gate.release.set()
        for lt, _ in longs:
            lt.join(10)
