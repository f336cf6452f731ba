"""Tests written for the mutants of the ownership layer that survived the rest of the suite.

``make mutmut`` mutates the write path, ownership, engine, runner and operator;
each test here kills one or more mutants that no other test noticed, and says
in its name the behaviour those mutants broke.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

import pytest
from pydantic import BaseModel

from walstate import Engine, InjectedCrash, JobCancelled, JobFailed, JobOwned, Retry, StepContext, Workflow
from walstate.aio import AsyncStepContext
from walstate.ownership import HUNG_GRACE, Claim, Heartbeat, Identity, LiveRun, owner_alive
from walstate.storage import Store, faults
from walstate.storage.reads import JobRow


class Ctx(BaseModel):
    n: int = 0


class Ctx2(BaseModel):
    n: int
    m: int


def one_step_flow() -> Workflow[Ctx]:
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def only(ctx: Ctx, step: StepContext) -> None:
        pass

    return flow


def pending_job(db_path: str) -> int:
    with Engine(db_path) as e:
        e.register(one_step_flow())
        return int(e.submit("w", Ctx()))


def row_of(store: Store, job: int) -> JobRow:
    row = store.read.job(job)
    assert row is not None
    return row


def claim(store: Store, job: int, owner: str, lease_expires: float) -> int:
    row = row_of(store, job)
    claimed = store.write.claim(job, state=row.state, epoch=row.epoch, owner=owner, lease_expires=lease_expires,
                                note="claimed by the test")
    assert claimed is not None
    return claimed.epoch


def test_a_heartbeat_renews_to_its_clock_plus_the_lease_and_tells_the_run_of_cancellation_and_loss(
        db_path: str) -> None:
    job = pending_job(db_path)
    store = Store(db_path)
    now = [1000.0]
    signals: list[str] = []
    # A lease of an hour: the heartbeat's own thread never beats during the test; it beats when told.
    hb = Heartbeat(3600.0, store.write.renew, clock=lambda: now[0], poll=store.read.cancel_requested)
    try:
        assert hb.period == 1200.0
        epoch = claim(store, job, "me", lease_expires=hb.lease_expires())
        hb.add(Claim(job, "me", epoch, signals.append))
        now[0] = 2000.0
        hb.beat()
        assert row_of(store, job).lease_expires == 5600.0  # clock + lease, never in the past
        assert signals == []
        hb.check_cancels()
        assert signals == []  # no cancellation asked for: polling says nothing

        assert store.write.request_cancel(job)
        hb.check_cancels()
        assert signals == ["cancel"]
        hb.beat()
        assert signals == ["cancel", "cancel"]

        # Another run takes the job over: the next renewal finds the claim lost, stops renewing it.
        claim(store, job, "someone else", lease_expires=9999.0)
        signals.clear()
        hb.beat()
        assert signals == ["lost"]
        assert row_of(store, job).lease_expires == 9999.0  # the lost claim renewed nothing
        hb.beat()
        hb.check_cancels()
        assert signals == ["lost"]  # forgotten: neither renewed nor polled again
    finally:
        hb.close()
        store.close()


def test_a_heartbeat_beats_by_itself_every_third_of_its_lease(db_path: str) -> None:
    job = pending_job(db_path)
    store = Store(db_path)
    now = [1000.0]
    hb = Heartbeat(0.3, store.write.renew, clock=lambda: now[0], poll=store.read.cancel_requested)
    try:
        epoch = claim(store, job, "me", lease_expires=hb.lease_expires())
        hb.add(Claim(job, "me", epoch, lambda reason: None))
        now[0] = 2000.0
        deadline = time.monotonic() + 5.0
        while row_of(store, job).lease_expires != 2000.3:
            assert time.monotonic() < deadline, "the heartbeat thread never renewed the lease"
            time.sleep(0.01)
    finally:
        hb.close()
        store.close()
    assert hb._thread is not None and not hb._thread.is_alive()  # close() stops its thread


def test_a_heartbeat_that_was_closed_before_its_first_claim_starts_no_thread(db_path: str) -> None:
    hb = Heartbeat(0.3, lambda *a: True)  # never called: it never beats
    hb.close()
    hb.add(Claim(1, "me", 1, lambda reason: None))
    assert hb._thread is None


def test_an_owner_in_this_process_is_alive_exactly_while_it_runs_that_job() -> None:
    from walstate import ownership

    token = ownership.identity().token("mine")
    assert not owner_alive(token, 7, lease_expires=1e12, now=0.0)
    with LiveRun(token, 7):
        assert owner_alive(token, 7, lease_expires=None, now=0.0)  # alive whatever its lease says
        assert not owner_alive(token, 8, lease_expires=1e12, now=0.0)  # another job of the same owner
        assert not owner_alive(ownership.identity().token("other"), 7, lease_expires=1e12, now=0.0)
    assert not owner_alive(token, 7, lease_expires=1e12, now=0.0)


def test_a_token_this_host_cannot_read_is_judged_by_its_lease_only() -> None:
    me = Identity.current()
    unreadable = [
        f"{me.boot_id}|{me.pid_ns}|{me.host}|{me.pid}|{me.start}",  # an older walstate's five parts
        f"{me.boot_id}|{me.pid_ns}|{me.host}|{me.pid}|{me.start}|nonce|extra",
        f"{me.boot_id}|{me.pid_ns}|{me.host}|not-a-pid|{me.start}|nonce",
        f"|{me.pid_ns}|{me.host}|1|{me.start}|nonce",  # no boot id
    ]
    for token in unreadable:
        assert owner_alive(token, 1, lease_expires=100.5, now=100.0), token
        assert not owner_alive(token, 1, lease_expires=99.5, now=100.0), token
        assert not owner_alive(token, 1, lease_expires=None, now=100.0), token
    assert not owner_alive(None, 1, lease_expires=1e12, now=0.0)


def test_an_owner_process_on_this_host_is_alive_until_killed_even_before_it_is_reaped() -> None:
    import signal
    import subprocess
    import sys

    from walstate.ownership import _proc_stat

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = Identity.current()
        stat = _proc_stat(child.pid)
        assert stat is not None
        token = Identity(me.boot_id, me.pid_ns, "any-host-name", child.pid, stat[1]).token("n")
        # alive: a lease expired for less than the grace does not matter (past it, the owner is hung)
        assert owner_alive(token, 1, lease_expires=100.0, now=100.0 + HUNG_GRACE / 2)
        # A token with no start time cannot tell a reused pid: the pid alone decides.
        assert owner_alive(Identity(me.boot_id, me.pid_ns, "h", child.pid, "").token("n"), 1, 100.0, 101.0)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (_proc_stat(child.pid) or ("Z",))[0] != "Z":
            assert time.monotonic() < deadline, "the child never became a zombie"
            time.sleep(0.005)
        assert not owner_alive(token, 1, lease_expires=1e12, now=0.0)  # a zombie runs nothing
    finally:
        child.kill()
        child.wait()
    assert not owner_alive(token, 1, lease_expires=1e12, now=0.0)  # reaped: gone


def test_releasing_a_claim_clears_it_bumps_the_epoch_and_journals_it_once(db_path: str) -> None:
    job = pending_job(db_path)
    store = Store(db_path)
    try:
        epoch = claim(store, job, "me", lease_expires=5000.0)
        before = len(store.read.journal(job))
        assert store.write.release(job, "me", epoch, "released: shutting down") is True
        row = row_of(store, job)
        assert (row.owner, row.lease_expires, row.epoch, row.state) == (None, None, epoch + 1, "running")
        entry = store.read.journal(job)[-1]
        assert len(store.read.journal(job)) == before + 1
        assert (entry.step, entry.from_state, entry.to_state, entry.attempt, entry.note) == (
            None, "running", "running", 0, "released: shutting down")
        # The same claim again (a stale run): nothing changes, nothing is journalled.
        assert store.write.release(job, "me", epoch, "again") is False
        assert row_of(store, job).epoch == epoch + 1
        assert len(store.read.journal(job)) == before + 1
    finally:
        store.close()


def test_a_cancellation_request_is_accepted_only_for_an_unfinished_job(db_path: str) -> None:
    job = pending_job(db_path)
    with Engine(db_path) as e:
        e.register(one_step_flow())
        assert e.store.write.request_cancel(job) is True
        assert e.store.read.cancel_requested([job]) == {job}
        other = int(e.submit("w", Ctx()))
        e.run(other)
        assert e.store.write.request_cancel(other) is False
        assert e.store.read.cancel_requested([other]) == set()


def refuse_writes(db_path: str, table: str, event: str) -> None:
    """A real trigger in the file that makes SQLite abort every ``event`` on ``table``."""
    import sqlite3

    conn = sqlite3.connect(db_path)
    try:
        conn.execute(f"CREATE TRIGGER refuse_{table}_{event.lower()} BEFORE {event} ON {table} "
                     "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
        conn.commit()
    finally:
        conn.close()


def test_every_write_sqlite_refuses_fails_with_a_message_saying_what_it_was_doing(db_path: str) -> None:
    from walstate.storage.errors import WriteFailed

    job = pending_job(db_path)
    store = Store(db_path)
    try:
        epoch = claim(store, job, "me", lease_expires=5000.0)
        refuse_writes(db_path, "walstate_once", "INSERT")
        with pytest.raises(WriteFailed, match=r"while recording once\('call'\) of step 'only': refused by the test") as once:
            store.write.record_once(job, "only", "call", "1")
        assert once.value.path == db_path
        refuse_writes(db_path, "walstate_job", "INSERT")
        with pytest.raises(WriteFailed, match=r"while creating a 'w' job: refused by the test") as create:
            store.write.create_job("w", None, "{}", [("only", "p", 0)])
        assert create.value.path == db_path
        refuse_writes(db_path, "walstate_job", "UPDATE")
        calls = [
            (lambda: store.write.renew(job, "me", epoch, 6000.0), f"renewing the lease on job {job}"),
            (lambda: store.write.release(job, "me", epoch, "bye"), f"releasing job {job}"),
            (lambda: store.write.request_cancel(job), f"requesting the cancellation of job {job}"),
            (lambda: store.write.claim(job, state="running", epoch=epoch, owner="x", lease_expires=1.0, note="n"),
             f"claiming job {job}"),
            (lambda: store.write.claim_runnable(owner="x", lease_expires=1.0, limit=1, workflows=["w"], now=0.0,
                                                dead=[(job, epoch)]), "claiming runnable jobs"),
        ]
        for call, doing in calls:
            with pytest.raises(WriteFailed, match=f"while {doing}: refused by the test") as failed:
                call()
            assert str(failed.value).startswith(f"{db_path}: ") and failed.value.path == db_path
        row = row_of(store, job)
        assert (row.owner, row.epoch, row.lease_expires) == ("me", epoch, 5000.0)  # nothing was written
    finally:
        store.close()


# -- the runtime: the worker's thread, handles, leaving a worker's with block --------------


def test_a_worker_loops_on_a_daemon_thread_named_walstate_worker(db_path: str) -> None:
    import threading

    with Engine(db_path) as e:
        e.register(one_step_flow())
        with e.start_worker(concurrency=1):
            loops = [t for t in threading.enumerate() if t.name == "walstate-worker"]
            assert len(loops) == 1
            assert loops[0].daemon  # an app that forgets stop_worker() still exits


def test_a_handle_without_a_timeout_waits_for_the_end_and_one_with_a_timeout_says_what_goes_on(
        db_path: str) -> None:
    import re
    import threading

    import pytest

    release = threading.Event()
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def only(ctx: Ctx, step: StepContext) -> None:
        release.wait(10)

    with Engine(db_path) as e:
        e.register(flow)
        handle = e.start(flow, Ctx())
        with pytest.raises(TimeoutError, match=re.escape(
                f"{db_path}: job {handle.id} has not ended within 0.05s (it is running); it goes on")):
            handle.result(timeout=0.05)
        release.set()
        assert handle.result().state == "succeeded"  # no timeout: waits as long as it takes


def test_leaving_a_workers_with_block_lets_its_jobs_in_flight_run_to_their_end(db_path: str) -> None:
    import threading

    entered, release = threading.Event(), threading.Event()
    flow = Workflow("w", context=Ctx, phases=["p", "q"])

    @flow.step(phase="p")
    def first(ctx: Ctx, step: StepContext) -> None:
        entered.set()
        release.wait(10)

    flow.step(phase="q", name="second")(lambda ctx, step: None)
    with Engine(db_path) as e:
        e.register(flow)
        job = int(e.submit(flow, Ctx()))
        with e.start_worker(concurrency=1) as worker:
            assert entered.wait(10)

            def release_once_stopping() -> None:
                while worker.running:  # the with block is being left: the loop has stopped claiming
                    time.sleep(0.005)
                release.set()

            releaser = threading.Thread(target=release_once_stopping)
            releaser.start()
        releaser.join(10)
        # Drained: the job ran its second step too instead of being released after the first.
        assert e.status(job).state == "succeeded"


def test_stopping_a_worker_waits_for_its_loop_to_end_and_a_never_started_one_stops_at_once(db_path: str) -> None:
    from walstate.runtime import Worker

    with Engine(db_path) as e:
        e.register(one_step_flow())
        worker = e.start_worker(concurrency=1)
        assert worker.running
        e.stop_worker(drain=True, grace=5)
        assert not worker.running  # stop() joined the loop: it claims nothing after stop_worker returns
        Worker(e, 1).stop(drain=True, grace=5)  # never started: no thread to join, nothing in flight


# -- the worker's loop: wake-ups, not busy loops (counted in statements, not in seconds) --------


class WorkerStatements:
    """Every SQL statement the worker's loop thread runs, traced on the (real) SQLite connections it uses.

    Connections are opened with ``connect_params`` (peewee's per thread and
    the shared writer alike), so a ``sqlite3.Connection`` subclass set there
    traces them all; only statements run on the loop thread are kept.
    """

    def __init__(self, engine: Engine) -> None:
        import sqlite3
        import threading

        statements = self.statements = []

        def keep(sql: str) -> None:
            if threading.current_thread().name == "walstate-worker":
                statements.append(sql)

        class Traced(sqlite3.Connection):
            def __init__(self, *args: object, **kwargs: object) -> None:
                super().__init__(*args, **kwargs)  # type: ignore[arg-type]
                self.set_trace_callback(keep)

        engine.store.db.connect_params["factory"] = Traced

    def polls(self) -> int:
        return sum(1 for s in list(self.statements) if s.strip().upper() == "PRAGMA DATA_VERSION")

    def others(self) -> int:
        return len(list(self.statements)) - self.polls()


def test_a_worker_polls_every_20_ms_and_scans_for_dead_owners_every_half_second_by_default(db_path: str) -> None:
    from walstate.runtime import Worker

    with Engine(db_path) as e:
        e.register(one_step_flow())
        assert (Worker(e, 1).poll, Worker(e, 1).scan) == (0.02, 0.5)  # the module docstring's figures
        with e.start_worker(concurrency=1) as worker:
            assert (worker.poll, worker.scan) == (0.02, 0.5)


def test_an_idle_worker_only_reads_the_data_version_at_each_poll_once_it_has_looked(db_path: str) -> None:
    from walstate.runtime import Worker

    from .helpers import wait_until

    with Engine(db_path) as e:
        e.register(one_step_flow())
        seen = WorkerStatements(e)
        worker = Worker(e, 1, scan=3600.0).start()  # no scan during the test: only polls
        try:
            wait_until(lambda: seen.polls() >= 5)
            looked = seen.others()  # the first round: next wake-up, dead owners, runnable jobs
            assert looked > 0
            wait_until(lambda: seen.polls() >= 30)
            assert seen.others() == looked  # nothing changed in the file: no other read, no claim
        finally:
            worker.stop(drain=True, grace=5)


def test_an_idle_worker_with_a_long_poll_reads_nothing_until_woken_or_stopped(db_path: str) -> None:
    from walstate.runtime import Worker

    from .helpers import wait_until

    with Engine(db_path) as e:
        e.register(one_step_flow())
        seen = WorkerStatements(e)
        worker = Worker(e, 1, poll=3600.0, scan=3600.0).start()
        try:
            wait_until(lambda: seen.polls() == 1 and seen.others() > 0)
            worker.wake()
            wait_until(lambda: seen.polls() == 2)
        finally:
            worker.stop(drain=True, grace=5)
        assert seen.polls() == 2  # it slept between: no busy loop


def test_an_idle_worker_claims_a_job_another_connection_commits_at_its_next_poll(db_path: str) -> None:
    from walstate.runtime import Worker

    from .helpers import wait_until

    flow = one_step_flow()
    with Engine(db_path) as e:
        e.register(flow)
        seen = WorkerStatements(e)
        worker = Worker(e, 1, scan=3600.0).start()  # no scan: only the data version can tell
        try:
            wait_until(lambda: seen.polls() >= 3)
            before = len(seen.statements)
            with Engine(db_path) as other:  # its own connection, as another process would have
                other.register(flow)
                job = int(other.submit("w", Ctx()))
                mark = len(seen.statements)  # the submit has committed
            wait_until(lambda: e.status(job).state == "succeeded", timeout=60.0)
            claim_at = next(i for i, s in enumerate(seen.statements) if i >= before
                            and s.upper().startswith("UPDATE WALSTATE_JOB SET OWNER"))
            # Claimed before the submit returned here, or at most two polls after it (never by a scan).
            polls = sum(1 for s in seen.statements[mark:claim_at] if s.strip().upper() == "PRAGMA DATA_VERSION")
            assert polls <= 2
        finally:
            # Built by hand, the worker is not the engine's: the engine's end-of-job call never reaches it,
            # so it would wait out a drain for a job that has ended. Nothing runs: stop without one.
            worker.stop(drain=False, grace=0)


def test_a_worker_refuses_a_concurrency_below_one_and_counts_the_jobs_it_claims(db_path: str) -> None:
    import pytest

    from walstate.runtime import Worker
    from walstate.storage.errors import ConfigurationError

    flow = one_step_flow()
    with Engine(db_path) as e:
        e.register(flow)
        with pytest.raises(ConfigurationError, match="concurrency must be >= 1, not 0"):
            Worker(e, 0)
        with e.start_worker(concurrency=1) as worker:
            for _ in range(2):  # one after the other: two claims of one job each
                assert e.handle(e.submit(flow, Ctx())).result(timeout=10).state == "succeeded"
            assert worker.claimed == 2


def test_a_workers_scan_takes_no_job_whose_owner_is_alive_here_or_elsewhere(db_path: str) -> None:
    import threading

    from .helpers import wait_until

    entered, release = threading.Event(), threading.Event()
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def only(ctx: Ctx, step: StepContext) -> None:
        if ctx.n == 1:
            entered.set()
            release.wait(10)

    elsewhere = pending_job(db_path)
    store = Store(db_path)
    try:
        # Another host's run (another boot id: judged by its lease, which has a long time to go).
        foreign = f"another-boot|1|another-host|1|1|nonce"
        claim(store, elsewhere, foreign, lease_expires=time.time() + 3600)
        with Engine(db_path) as here, Engine(db_path) as e:
            here.register(flow)
            e.register(flow)
            running_here = here.start(flow, Ctx(n=1))  # a live run of this process, in another engine
            assert entered.wait(10)
            mine = row_of(store, running_here.id)
            seen = WorkerStatements(e)
            with e.start_worker(concurrency=2):
                wait_until(lambda: any("job_owned_unfinished" in s for s in list(seen.statements))
                           and seen.polls() >= 3)  # its first scan for dead owners is over
                assert (row_of(store, elsewhere).owner, row_of(store, elsewhere).epoch) == (foreign, 1)
                assert (row_of(store, running_here.id).owner, row_of(store, running_here.id).epoch) == (
                    mine.owner, mine.epoch)
                release.set()
                assert running_here.result(timeout=10).state == "succeeded"
    finally:
        release.set()
        store.close()


def test_a_full_worker_looks_for_no_job_and_claims_one_as_soon_as_its_concurrency_is_raised(db_path: str) -> None:
    import threading

    from .helpers import wait_until

    entered, release = threading.Event(), threading.Event()
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def only(ctx: Ctx, step: StepContext) -> None:
        if ctx.n == 1:
            entered.set()
            release.wait(10)

    def scans() -> int:
        return sum(1 for s in list(seen.statements) if "job_owned_unfinished" in s)

    def looks() -> int:
        return sum(1 for s in list(seen.statements) if s.startswith("SELECT 1 FROM walstate_job WHERE state IN"))

    with Engine(db_path) as e:
        e.register(flow)
        seen = WorkerStatements(e)
        worker = e.start_worker(concurrency=1)
        try:
            wait_until(lambda: scans() >= 1)  # the first scan set the next one half a second away
            worker.scan = 3600.0
            wait_until(lambda: scans() >= 2)  # and that one an hour away: only wake-ups and commits count now
            first = e.start(flow, Ctx(n=1))
            assert entered.wait(10)
            second = int(e.submit(flow, Ctx(n=2)))
            mark_looks, mark_polls = looks(), seen.polls()
            wait_until(lambda: seen.polls() >= mark_polls + 3)  # it has seen the submit's commit
            assert looks() == mark_looks  # no free slot: it does not even look for a runnable job
            assert e.status(second).state == "pending"
            e.start_worker(concurrency=2)  # a wake-up with no commit: the freed slot alone must be filled
            wait_until(lambda: e.status(second).state == "succeeded", timeout=5.0)
            release.set()
            assert first.result(timeout=10).state == "succeeded"
        finally:
            release.set()
            e.stop_worker(drain=True, grace=5)


def job_of_version_one(db_path: str) -> int:
    """A job submitted for workflow ``w`` with one step ``one``, by an engine closed since: its definition may change."""
    old = Workflow("w", context=Ctx, phases=["p"])
    old.step(phase="p", name="one")(lambda ctx, step: None)
    with Engine(db_path) as e:
        e.register(old)
        return int(e.submit(old, Ctx()))


def test_a_worker_does_not_try_to_claim_again_a_job_it_found_it_cannot_run(db_path: str) -> None:
    from .helpers import wait_until

    stale = job_of_version_one(db_path)
    new = Workflow("w", context=Ctx, phases=["p", "q"])
    new.step(phase="p", name="one")(lambda ctx, step: None)
    new.step(phase="q", name="two")(lambda ctx, step: None)
    with Engine(db_path) as e:
        e.register(new)
        seen = WorkerStatements(e)
        with e.start_worker(1) as worker:
            wait_until(lambda: stale in worker.unrunnable)
            polls = seen.polls()
            wait_until(lambda: seen.polls() >= polls + 5)  # it has seen the release's commit
            # One claim transaction, the one that took the job; none after it was given back.
            assert sum(1 for s in list(seen.statements) if s.upper().startswith("BEGIN")) == 1


# -- ownership: identity, batch claims, heartbeat failures and pacing ------------------------


def test_this_process_identity_names_its_host_pid_and_start_time() -> None:
    import socket

    from walstate.ownership import _proc_stat

    me = Identity.current()
    stat = _proc_stat(os.getpid())
    assert stat is not None
    assert (me.host, me.pid, me.start) == (socket.gethostname(), os.getpid(), stat[1])
    assert me.token("n").split("|")[2:5] == [socket.gethostname(), str(os.getpid()), stat[1]]


def test_while_a_batch_claim_of_this_process_is_in_flight_its_owner_counts_as_alive() -> None:
    from walstate import ownership
    from walstate.ownership import Claiming

    token = ownership.identity().token("claiming")
    assert not owner_alive(token, 5, lease_expires=None, now=0.0)
    with Claiming(token):
        assert owner_alive(token, 5, lease_expires=None, now=0.0)  # any job: the claim has not named them yet
    assert not owner_alive(token, 5, lease_expires=None, now=0.0)


def test_a_failed_renewal_is_logged_with_its_job_and_error_and_the_other_claims_are_still_renewed(
        db_path: str, caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import sqlite3

    failing, fine = pending_job(db_path), pending_job(db_path)
    store = Store(db_path)
    hb = Heartbeat(3600.0, store.write.renew, clock=lambda: 1000.0)
    try:
        epochs = {job: claim(store, job, "me", lease_expires=10.0) for job in (failing, fine)}
        for job in (failing, fine):  # the failing one first: its error must not stop the round
            hb.add(Claim(job, "me", epochs[job], lambda reason: None))
        conn = sqlite3.connect(db_path)
        conn.execute(f"CREATE TRIGGER refuse BEFORE UPDATE ON walstate_job WHEN OLD.id = {failing} "
                     "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
        conn.commit()
        conn.close()
        with caplog.at_level(logging.WARNING, logger="walstate"):
            hb.beat()
        assert row_of(store, fine).lease_expires == 4600.0
        assert row_of(store, failing).lease_expires == 10.0
        [record] = [r for r in caplog.records if "renewal failed" in r.getMessage()]
        assert record.getMessage().startswith(f"job {failing}: lease renewal failed (")
        assert "refused by the test" in record.getMessage()
        assert record.getMessage().endswith("); retrying in 1200.0s")
        assert getattr(record, "walstate_job") == failing

        caplog.clear()
        claim(store, fine, "someone else", lease_expires=9999.0)
        with caplog.at_level(logging.WARNING, logger="walstate"):
            hb.beat()
        [lost] = [r for r in caplog.records if "claim lost" in r.getMessage()]
        assert lost.getMessage() == f"job {fine}: claim lost (epoch {epochs[fine]}); stopping its run"
        assert getattr(lost, "walstate_job") == fine
    finally:
        hb.close()
        store.close()


def test_a_heartbeat_renews_once_a_period_and_looks_for_cancellations_at_the_ticks_between() -> None:
    import threading

    from walstate.ownership import POLL_INTERVAL

    events: list[str] = []
    lock = threading.Lock()

    def renew(job_id: int, owner: str, epoch: int, lease_expires: float) -> bool:
        with lock:
            events.append("renew")
        return False

    def poll(jobs: list[int]) -> set[int]:
        with lock:
            events.append("poll")
        return set()

    assert POLL_INTERVAL == 0.25
    hb = Heartbeat(3 * 4 * POLL_INTERVAL, renew, poll=poll)  # a period of four ticks
    try:
        hb.add(Claim(1, "me", 1, lambda reason: None))
        assert hb._thread is not None and hb._thread.name == "walstate-heartbeat"
        assert hb._thread.daemon  # it never keeps the process alive
        deadline = time.monotonic() + 10
        while events.count("renew") < 2:
            assert time.monotonic() < deadline, "the heartbeat never renewed twice"
            time.sleep(0.01)
    finally:
        hb.close()
    with lock:
        first = events.index("renew")
        second = events.index("renew", first + 1)
        # Not at once, not at every tick: the ticks before each renewal only look for cancellations.
        assert first >= 2 and second - first >= 3, events


def test_closing_a_heartbeat_waits_for_a_renewal_in_progress_to_end() -> None:
    import threading

    inside = threading.Event()

    def slow_renew(job_id: int, owner: str, epoch: int, lease_expires: float) -> bool:
        inside.set()
        time.sleep(0.2)  # a slow disk: the renewal is still running when close() is called
        return False

    hb = Heartbeat(0.03, slow_renew)  # a period of 10 ms: it renews at once
    hb.add(Claim(1, "me", 1, lambda reason: None))
    assert inside.wait(10)
    hb.close()
    assert hb._thread is not None and not hb._thread.is_alive()  # close() joined it: no write after close


# -- the write path: shared batches, explained misses, errors naming the file -------------


def test_in_a_shared_batch_a_failing_request_loses_all_its_changes_and_only_it_fails(db_path: str) -> None:
    import json
    import threading

    from walstate.storage.errors import StaleState, WalstateError
    from walstate.storage.writepath import Change, ContextPatch

    from .helpers import wait_until

    store = Store(db_path)
    try:
        jobs = {}
        for name in ("lead", "two", "fine", "patched"):
            job, _ = store.write.create_job("wf", None, "{}", [("a", "p", 0), ("b", "p", 1)])
            jobs[name] = (job, claim(store, job, "me", lease_expires=5000.0), store.read.steps(job))

        def move(name: str, step: int, expected: str, **extra: object) -> Change:
            job, epoch, steps = jobs[name]
            s = steps[step]
            return Change("step", s.id, job, s.name, expected, "running", 1, "me", epoch, **extra)  # type: ignore[arg-type]

        requests = {
            "lead": [move("lead", 0, "pending")],
            # Two changes, the second misses: the first must be undone with it.
            "two": [move("two", 0, "pending"), move("two", 1, "running")],
            "fine": [move("fine", 0, "pending")],
            # One change with a context patch that misses: the patch must be undone too.
            "patched": [move("patched", 0, "running",
                             context=ContextPatch({"x": 1}, lambda merged: json.dumps(merged)))],
        }
        results: dict[str, str] = {}

        def call(name: str) -> None:
            try:
                store.write.commit(requests[name])
                results[name] = "ok"
            except WalstateError as exc:
                results[name] = type(exc).__name__

        with store.db.write_lock:  # the first leader waits here while the others queue behind it
            lead = threading.Thread(target=call, args=("lead",))
            lead.start()
            wait_until(lambda: store.write._leader)
            others = [threading.Thread(target=call, args=(n,)) for n in ("two", "fine", "patched")]
            for t in others:
                t.start()
            wait_until(lambda: len(store.write._queue) == 3)
        for t in [lead, *others]:
            t.join(10)
        assert store.write.batches == 2  # the lead alone, then the three together
        assert results == {"lead": "ok", "two": StaleState.__name__, "fine": "ok", "patched": StaleState.__name__}
        assert [s.state for s in store.read.steps(jobs["two"][0])] == ["pending", "pending"]
        assert [s.state for s in store.read.steps(jobs["fine"][0])] == ["running", "pending"]
        assert row_of(store, jobs["patched"][0]).context == "{}"
    finally:
        store.close()


def test_a_change_that_misses_says_whether_the_claim_was_lost_or_the_row_moved_on(db_path: str) -> None:
    from walstate.storage.errors import LeaseLost, StaleState
    from walstate.storage.writepath import Change

    job = pending_job(db_path)
    store = Store(db_path)
    try:
        mine = claim(store, job, "me", lease_expires=5000.0)
        step = store.read.steps(job)[0]
        with pytest.raises(StaleState) as moved:
            store.write.commit([Change("step", step.id, job, "only", "running", "succeeded", 1, "me", mine)])
        assert str(moved.value) == (
            f"{db_path}: sub-step 'only' of job {job} is 'pending', not 'running' as expected for the move to "
            "'succeeded'; another writer changed it first; reload it and decide again")
        assert (moved.value.kind, moved.value.row_id, moved.value.expected, moved.value.actual) == (
            "step", step.id, "running", "pending")
        with pytest.raises(StaleState) as missing:
            store.write.commit([Change("step", 999_999, job, "gone", "pending", "running", 1, "me", mine)])
        assert missing.value.actual is None

        theirs = claim(store, job, "other", lease_expires=6000.0)
        lost_tail = ("this run lost its claim (the job was recovered, cancelled or retried elsewhere) and must "
                     "stop writing to it")
        with pytest.raises(LeaseLost) as lost_step:
            store.write.commit([Change("step", step.id, job, "only", "pending", "running", 1, "me", mine)])
        assert str(lost_step.value) == (
            f"{db_path}: sub-step 'only' of job {job} is now held by 'other' (claim epoch {theirs}), not by 'me' "
            f"(epoch {mine}); {lost_tail}")
        with pytest.raises(LeaseLost) as lost_job:
            store.write.commit([Change("job", job, job, None, "running", "succeeded", 0, "me", mine)])
        assert str(lost_job.value) == (
            f"{db_path}: job {job} is now held by 'other' (claim epoch {theirs}), not by 'me' (epoch {mine}); "
            f"{lost_tail}")
    finally:
        store.close()


def test_a_batch_claim_keeps_each_workflow_within_its_budget_and_journals_whom_it_took_from(db_path: str) -> None:
    store = Store(db_path)
    try:
        def job(workflow: str, steps: int = 1) -> int:
            return store.write.create_job(workflow, None, "{}", [(f"s{i}", "p", i) for i in range(steps)])[0]

        dead = job("w")  # running, its owner found dead: taken over, and it was already counted as running
        dead_epoch = claim(store, dead, "dead-owner", lease_expires=0.0)
        released = job("w")  # running with no owner (given back): a claim of it adds one running job
        store.write.release(released, "x", claim(store, released, "x", lease_expires=0.0), "given back")
        blocked = job("w")  # pending: over the budget
        other = job("v", steps=0)  # no budget; cancellation asked for; no steps
        store.write.request_cancel(other)
        got = store.write.claim_runnable(owner="me", lease_expires=7000.0, limit=3, workflows=["w", "v"],
                                         now=0.0, dead=[(dead, dead_epoch)], limits={"w": 1})
        assert [(wf, state, prior, c.job_id) for wf, state, prior, c in got] == [
            ("w", "running", "dead-owner", dead), ("v", "pending", None, other)]
        assert [(c.cancel_requested, c.steps) for _, _, _, c in got] == [(False, got[0][3].steps), (True, [])]
        assert len(got[0][3].steps) == 1
        assert row_of(store, blocked).state == "pending" and row_of(store, released).owner is None
        entries = {j: store.read.journal(j)[-1] for j in (dead, other)}
        assert [(e.step, e.from_state, e.to_state, e.attempt, e.note) for e in entries.values()] == [
            (None, "running", "running", 0, "claimed from dead-owner, found dead"),
            (None, "pending", "running", 0, "claimed")]

        fresh = [job("b2") for _ in range(3)] + [job("b1")]
        got = store.write.claim_runnable(owner="me", lease_expires=7000.0, limit=5, workflows=["b2", "b1"],
                                         now=0.0, limits={"b2": 2, "b1": 1})
        assert [c.job_id for _, _, _, c in got] == [fresh[0], fresh[1], fresh[3]]
    finally:
        store.close()


def test_a_context_change_for_a_job_that_does_not_exist_is_refused_as_stale(db_path: str) -> None:
    import json

    from walstate.storage.errors import StaleState
    from walstate.storage.writepath import Change, ContextPatch

    store = Store(db_path)
    try:
        patch = ContextPatch({"x": 1}, lambda merged: json.dumps(merged))
        with pytest.raises(StaleState) as gone:
            store.write.commit([Change("job", 4242, 4242, None, "running", "succeeded", context=patch)])
        assert str(gone.value) == f"{db_path}: job 4242 does not exist"
        assert (gone.value.kind, gone.value.row_id, gone.value.expected, gone.value.actual) == ("job", 4242, "", None)
    finally:
        store.close()


# -- the runner ------------------------------------------------------------------------------


def test_a_step_after_one_that_failed_is_cancelled_naming_its_predecessors_and_so_are_its_own_dependents(
        db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="x")(lambda ctx, step: None)
    flow.step(phase="p", name="a", retry=Retry(max_attempts=1))(lambda ctx, step: 1 / 0)
    flow.step(phase="p", name="b", after=["x", "a"])(lambda ctx, step: None)
    flow.step(phase="p", name="c", after=["b"])(lambda ctx, step: None)
    with Engine(db_path, workers=1) as e:
        e.register(flow)
        job = e.submit(flow, Ctx())
        with pytest.raises(JobFailed):
            e.run(job)
        notes = {r.step: r.note for r in e.history(job) if r.to_state == "cancelled"}
    # Cancelled for their own reason, not as bystanders of the job's failure.
    assert notes == {"b": "a step it runs after did not succeed (x, a)",
                     "c": "a step it runs after did not succeed (b)"}


def test_a_handler_with_a_timeout_sees_the_context_its_exception_fails_the_attempt_and_a_timeout_is_logged(
        db_path: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="walstate")
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p", timeout=60, retry=Retry(max_attempts=1))
    def raising(ctx: Ctx, step: StepContext) -> None:
        raise ValueError(f"n is {ctx.n}")

    slow = Workflow("slow", context=Ctx, phases=["p"])

    @slow.step(phase="p", timeout=0.05, retry=Retry(max_attempts=1))
    def sleepy(ctx: Ctx, step: StepContext) -> None:
        step.cancelled.wait(10)

    with Engine(db_path, workers=1) as e:
        e.register(flow)
        e.register(slow)
        with pytest.raises(JobFailed) as failed:
            e.run(e.submit(flow, Ctx(n=7)))
        assert failed.value.errors == {"raising": "ValueError: n is 7"}
        job = e.submit(slow, Ctx())
        with pytest.raises(JobFailed) as failed:
            e.run(job)
        assert failed.value.errors == {"sleepy": "TimeoutError: step 'sleepy' attempt 1 timed out after 0.05s"}
    [record] = [r for r in caplog.records if "timed out after 0.05s; its handler" in r.getMessage()]
    assert (record.walstate_job, record.walstate_workflow, record.walstate_step,  # type: ignore[attr-defined]
            record.walstate_attempt) == (job, "slow", "sleepy", 1)  # type: ignore[attr-defined]


def test_an_async_handler_gets_context_and_step_times_out_as_declared_and_a_cancel_reaches_its_task(
        db_path: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="walstate")
    seen: list[object] = []
    started = threading.Event()
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p", retry=Retry(max_attempts=1))
    async def fetch(ctx: Ctx, step: AsyncStepContext) -> dict[str, int]:
        await asyncio.sleep(0)
        return {"n": ctx.n + step.attempt}

    slow = Workflow("slow", context=Ctx, phases=["p"])

    @slow.step(phase="p", timeout=0.05, retry=Retry(max_attempts=1))
    async def nap(ctx: Ctx, step: AsyncStepContext) -> None:
        await asyncio.sleep(5)

    held = Workflow("held", context=Ctx, phases=["p"])

    @held.step(phase="p")
    async def hold(ctx: Ctx, step: AsyncStepContext) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    with Engine(db_path, workers=1) as e:
        for f in (flow, slow, held):
            e.register(f)
        assert e.run(e.submit(flow, Ctx(n=41))).context.n == 42
        job = e.submit(slow, Ctx())
        with pytest.raises(JobFailed) as failed:
            e.run(job)
        assert failed.value.errors == {"nap": "TimeoutError: step 'nap' attempt 1 timed out after 0.05s"}
        [record] = [r for r in caplog.records if "timed out after 0.05s; its handler" in r.getMessage()]
        assert (record.walstate_job, record.walstate_workflow, record.walstate_step,  # type: ignore[attr-defined]
                record.walstate_attempt) == (job, "slow", "nap", 1)  # type: ignore[attr-defined]

        victim = e.submit(held, Ctx())
        outcome: list[BaseException] = []

        def run_it() -> None:
            try:
                e.run(victim)
            except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
                outcome.append(exc)

        runner = threading.Thread(target=run_it)
        runner.start()
        assert started.wait(10)
        e.cancel(victim, wait=10)
        runner.join(10)
        # The handler's task was cancelled at its await (the attempt fails as such) and the job ended cancelled.
        assert seen == ["cancelled"] and [type(x) for x in outcome] == [JobCancelled]
        error = e.status(victim).steps["hold"].error or ""
        assert "the async handler was cancelled" in error and "()" not in error, error


def test_after_a_cancel_parallel_steps_start_no_step_they_unlock_and_the_rest_are_cancelled_with_the_job(
        db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    with Engine(db_path, workers=2) as e:

        @flow.step(phase="p")
        def b(ctx: Ctx, step: StepContext) -> None:
            # The cancel is signalled before this returns (wait=0: it cannot wait for its own run).
            with pytest.raises(JobOwned):
                e.cancel(step.job_id, wait=0)

        flow.step(phase="p", name="c", after=["b"])(lambda ctx, step: None)
        flow.step(phase="p", name="d", after=["c"])(lambda ctx, step: None)
        e.register(flow)
        job = e.submit(flow, Ctx())
        with pytest.raises(JobCancelled):
            e.run(job)
        states = {n: s.state for n, s in e.status(job).steps.items()}
        notes = {r.step: r.note for r in e.history(job) if r.to_state == "cancelled"}
    assert states == {"b": "succeeded", "c": "cancelled", "d": "cancelled"}
    assert notes == {"c": "the job was cancelled", "d": "the job was cancelled", None: "cancelled by an operator"}


def test_a_write_failing_as_a_parallel_loop_cancels_the_dependents_of_a_failed_step_stops_the_run_with_it(
        db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="a", retry=Retry(max_attempts=1))(lambda ctx, step: 1 / 0)
    flow.step(phase="p", name="b", after=["a"])(lambda ctx, step: None)
    with Engine(db_path, workers=2) as e:
        e.register(flow)
        first = e.submit(flow, Ctx())
        with faults.Injector() as counting, pytest.raises(JobFailed):
            e.run(first)
        # The commits: claim, a starts, a fails, b is cancelled, the job fails.
        cancel_b = counting.hits["before_commit"] - 1
        job = e.submit(flow, Ctx())
        with faults.Injector(faults.Crash("before_commit", cancel_b)), pytest.raises(InjectedCrash):
            e.run(job)
        assert e.status(job).steps["b"].state == "pending"


# -- the engine: worker runs, shutdown -------------------------------------------------------


def fields_of(record: logging.LogRecord) -> tuple[object, ...]:
    return tuple(getattr(record, f) for f in ("walstate_job", "walstate_workflow", "walstate_step", "walstate_attempt"))


def test_a_worker_releases_a_job_it_cannot_run_saying_why_in_the_journal_and_the_log(
        db_path: str, caplog: pytest.LogCaptureFixture) -> None:
    from .helpers import wait_until

    caplog.set_level(logging.WARNING, logger="walstate")
    stale = job_of_version_one(db_path)
    new = Workflow("w", context=Ctx, phases=["p", "q"])
    new.step(phase="p", name="one")(lambda ctx, step: None)
    new.step(phase="q", name="two")(lambda ctx, step: None)
    with Engine(db_path) as e:
        e.register(new)
        with e.start_worker(1) as worker:
            wait_until(lambda: stale in worker.unrunnable)
            reason = worker.unrunnable[stale]
            kind, _, message = reason.partition(": ")
            assert kind == "DefinitionError" and message
            wait_until(lambda: e.store.read.job(stale).owner is None)  # type: ignore[union-attr]
        assert e.history(stale)[-1].note == f"released: cannot run here ({message})"
    [record] = [r for r in caplog.records if "cannot run on this engine" in r.getMessage()]
    assert fields_of(record) == (stale, "w", None, None) and record.getMessage().endswith(reason)


def test_a_run_released_when_the_shutdown_grace_runs_out_is_journalled_and_logged_as_such(
        db_path: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="walstate")
    entered = threading.Event()
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def long(ctx: Ctx, step: StepContext) -> None:
        entered.set()
        step.cancelled.wait(10)

    with Engine(db_path) as e:
        e.register(flow)
        handle = e.start(flow, Ctx())
        assert entered.wait(10)
        e.stop_worker(drain=False, grace=0.05)
        assert "released: shut down before its steps in flight finished" in [r.note for r in e.history(handle.id)]
    [record] = [r for r in caplog.records if "released: shut down" in r.getMessage()]
    assert fields_of(record) == (handle.id, "w", None, None) and record.levelno == logging.WARNING
    assert record.getMessage() == (f"job {handle.id} (w) released: shut down before its steps in flight finished "
                                   "(the grace ran out); the next run retries them")


def test_a_worker_gives_back_a_job_to_be_migrated_as_pending_then_runs_it_logged_as_started(
        db_path: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="walstate")
    v1 = Workflow("w", context=Ctx, phases=["p"], version=1)
    v1.step(phase="p", name="one")(lambda ctx, step: None)
    with Engine(db_path) as e:
        e.register(v1)
        job = e.submit(v1, Ctx(n=5))
    v2 = Workflow("w", context=Ctx2, phases=["p"], version=2)
    v2.step(phase="p", name="one")(lambda ctx, step: None)
    v2.migrate(1, lambda old: {**old, "m": 1})  # the old context does not validate as it is: it must be migrated
    with Engine(db_path) as e:
        e.register(v2)
        with e.start_worker(1):
            assert e.handle(job).result(timeout=10).context == Ctx2(n=5, m=1)
        moves = [(r.to_state, r.note) for r in e.history(job) if r.step is None]
    # Claimed, given back as it was (pending) to be migrated, migrated, claimed again, run.
    assert moves[1] == ("pending", "released: to be migrated")
    [started] = [r for r in caplog.records if r.getMessage() == f"job {job} (w) started"]
    assert fields_of(started) == (job, "w", None, None)


def test_a_worker_run_that_loses_its_claim_logs_that_it_left_the_job_alone_and_why(
        db_path: str, caplog: pytest.LogCaptureFixture) -> None:
    from .helpers import wait_until

    caplog.set_level(logging.WARNING, logger="walstate")
    flow = Workflow("w", context=Ctx, phases=["p"])
    thief = Store(db_path)

    @flow.step(phase="p")
    def robbed(ctx: Ctx, step: StepContext) -> None:
        claim(thief, step.job_id, "thief", lease_expires=time.time() + 3600)  # another run takes the job

    try:
        with Engine(db_path) as e:
            e.register(flow)
            job = int(e.submit(flow, Ctx()))
            with e.start_worker(1):
                wait_until(lambda: any("left alone" in r.getMessage() for r in caplog.records))
        [record] = [r for r in caplog.records if "left alone" in r.getMessage()]
        assert fields_of(record) == (job, "w", None, None)
        assert record.getMessage().startswith(f"job {job} (w) left alone: ") and "lost its claim" in record.getMessage()
    finally:
        thief.close()


def test_a_worker_runs_handler_cannot_run_its_own_job_and_is_told_so_at_once(db_path: str) -> None:
    from walstate import UsageError

    told: list[str] = []
    flow = Workflow("w", context=Ctx, phases=["p"])
    with Engine(db_path) as e:

        @flow.step(phase="p")
        def nested(ctx: Ctx, step: StepContext) -> None:
            try:
                e.run(step.job_id)
            except UsageError as exc:
                told.append(str(exc))

        e.register(flow)
        with e.start_worker(1):
            assert e.start(flow, Ctx()).result(timeout=10).state == "succeeded"
    assert len(told) == 1 and "would wait forever" in told[0]


def test_a_worker_claims_under_a_lease_from_the_lease_clock_and_takes_a_parked_job_once_its_clock_says_it_is_due(
        db_path: str) -> None:
    from .helpers import wait_until

    now = [1000.0]
    holding, release = threading.Event(), threading.Event()
    flow = Workflow("w", context=Ctx, phases=["a", "b"])

    @flow.step(phase="a")
    def nap(ctx: Ctx, step: StepContext) -> None:
        step.sleep(10)

    @flow.step(phase="b")
    def hold(ctx: Ctx, step: StepContext) -> None:
        holding.set()
        release.wait(10)

    with Engine(db_path, clock=lambda: now[0], lease=60) as e:
        e.register(flow)
        with e.start_worker(1):
            job = int(e.submit(flow, Ctx()))
            wait_until(lambda: row_of(e.store, job).owner is None and row_of(e.store, job).wake_at == 1010.0)
            now[0] = 1011.0  # only the clock moves: no commit wakes the worker
            assert holding.wait(10)
            # The lease is measured on the store's lease clock, not on the injected one.
            assert row_of(e.store, job).lease_expires == pytest.approx(e.lease_clock() + 60, abs=5)
            release.set()
            assert e.handle(job).result(timeout=10).state == "succeeded"


def test_a_worker_logs_each_claim_and_names_the_dead_owner_it_took_a_job_from(
        db_path: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="walstate")
    me = Identity.current()
    gone = f"|{me.pid_ns}|{me.host}|1|{me.start}|nonce"  # no boot id: judged by its lease, long expired
    orphan = pending_job(db_path)
    store = Store(db_path)
    try:
        claim(store, orphan, gone, lease_expires=1.0)
    finally:
        store.close()
    with Engine(db_path) as e:
        e.register(one_step_flow())
        fresh = int(e.submit("w", Ctx()))
        with e.start_worker(1):
            assert e.handle(orphan).result(timeout=10).state == "succeeded"
            assert e.handle(fresh).result(timeout=10).state == "succeeded"
    claims = {r.getMessage(): fields_of(r) for r in caplog.records if " claimed" in r.getMessage()
              or "taken over" in r.getMessage()}
    assert claims == {
        f"job {fresh} (w) claimed": (fresh, "w", None, None),
        f"job {orphan} (w) taken over from {gone}, which is no longer running it": (orphan, "w", None, None),
    }


def test_steps_that_one_predecessor_unlocks_run_in_parallel(db_path: str) -> None:
    barrier = threading.Barrier(2, timeout=5)
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="a")(lambda ctx, step: None)
    for name in ("b", "c"):
        # Each waits for the other: only parallel execution lets both pass.
        flow.step(phase="p", name=name, after=["a"])(lambda ctx, step: barrier.wait() and None)
    with Engine(db_path, workers=2) as e:
        e.register(flow)
        status = e.run(e.submit(flow, Ctx()))
    assert {s.state for s in status.steps.values()} == {"succeeded"}


def test_an_interrupted_attempt_is_journalled_and_one_interrupted_too_often_fails_saying_so(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="fragile", retry=Retry(max_interruptions=1))(lambda ctx, step: None)
    first = Engine(db_path, workers=1)
    first.register(flow)
    job = first.submit(flow, Ctx())
    for _ in range(2):  # the process running the step dies in it, twice
        with faults.Injector(faults.Crash("handler_before_effect", 1)), pytest.raises(InjectedCrash):
            first.run(job)
        first.close()
        first = Engine(db_path, workers=1)
        first.register(flow)
    with first as e, pytest.raises(JobFailed) as failed:
        e.run(job)
    assert failed.value.errors == {
        "fragile": "attempt 2 was interrupted (the process running it died); interrupted 2 times, giving up"}


# -- the engine: recovery ----------------------------------------------------------------------


def test_recovery_passes_over_jobs_live_runs_hold_silently_and_resumes_the_others(
        db_path: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="walstate")
    entered = {name: threading.Event() for name in ("mine", "sibling")}
    release = threading.Event()
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def hold(ctx: Ctx, step: StepContext) -> None:
        if ctx.n in (1, 2):
            entered["mine" if ctx.n == 1 else "sibling"].set()
            release.wait(10)

    me = Identity.current()
    elsewhere = f"|{me.pid_ns}|{me.host}|1|{me.start}|nonce"  # another host's: judged by its lease
    with Engine(db_path) as e, Engine(db_path) as sibling:
        e.register(flow)
        sibling.register(flow)
        mine, theirs = int(e.submit(flow, Ctx(n=1))), int(e.submit(flow, Ctx(n=2)))
        remote, pending = int(e.submit(flow, Ctx(n=3))), int(e.submit(flow, Ctx(n=4)))
        claim(e.store, remote, elsewhere, lease_expires=time.time() + 3600)
        runs = [threading.Thread(target=e.run, args=(mine,)), threading.Thread(target=sibling.run, args=(theirs,))]
        for t in runs:
            t.start()
        try:
            assert entered["mine"].wait(10) and entered["sibling"].wait(10)
            assert e.recover() == [pending]
        finally:
            release.set()
            for t in runs:
                t.join(10)
    # Held by this engine, by another engine of this process, by another host under its lease: passed over unlogged.
    assert [r.getMessage() for r in caplog.records if "left alone" in r.getMessage()] == []


def test_recovery_leaves_a_parked_job_alone_until_its_wake_up_time_then_resumes_it(db_path: str) -> None:
    now = [1000.0]
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def nap(ctx: Ctx, step: StepContext) -> None:
        if ctx.n == 0:
            step.sleep(10)

    with Engine(db_path, clock=lambda: now[0]) as e:
        e.register(flow)
        job = e.submit(flow, Ctx())
        assert e.run(job).state == "running"  # parked until 1010
        journal = len(e.history(job))
        later = e.submit(flow, Ctx(n=1))
        now[0] = 1009.0
        assert e.recover() == [later] and len(e.history(job)) == journal  # not even claimed; the next one is run
        now[0] = 1010.0
        assert e.recover() == [job] and e.status(job).state == "succeeded"


def test_recovery_reports_and_logs_a_job_whose_definition_changed_and_leaves_it_as_it_is(
        db_path: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="walstate")
    stale = job_of_version_one(db_path)
    new = Workflow("w", context=Ctx, phases=["p"])
    new.step(phase="p", name="two")(lambda ctx, step: None)
    with Engine(db_path) as e:
        e.register(new)
        report = e.recover()
        assert report == [] and report.skipped[stale].startswith("DefinitionError: ")
        assert row_of(e.store, stale).owner is None and e.status(stale).state == "pending"
    [record] = [r for r in caplog.records if "left alone" in r.getMessage()]
    assert fields_of(record) == (stale, "w", None, None) and record.getMessage().endswith(report.skipped[stale])


def test_recovery_reports_and_logs_a_refused_migration_and_goes_on_with_the_next_job(
        db_path: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="walstate")
    v1 = Workflow("w", context=Ctx, phases=["p"], version=1)
    v1.step(phase="p", name="one")(lambda ctx, step: None)
    with Engine(db_path) as e:
        e.register(v1)
        refused, fine = int(e.submit(v1, Ctx(n=0))), int(e.submit(v1, Ctx(n=1)))
    v2 = Workflow("w", context=Ctx, phases=["p"], version=2)
    v2.step(phase="p", name="one")(lambda ctx, step: None)
    v2.migrate(1, lambda old: old if old["n"] else 1 / 0)
    with Engine(db_path) as e:
        e.register(v2)
        report = e.recover()
        assert report == [fine] and list(report.skipped) == [refused]
        assert report.skipped[refused].startswith("MigrationRefused: ") and "ZeroDivisionError" in report.skipped[refused]
    [record] = [r for r in caplog.records if "left alone" in r.getMessage()]
    assert fields_of(record) == (refused, "w", None, None) and record.getMessage().endswith(report.skipped[refused])
