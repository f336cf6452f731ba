"""Owners that live but do not run, and clocks that step: leases decide, on a clock no step moves.

Issue 26, items 6 and 7. A process stopped with SIGSTOP keeps its pid but renews nothing: once
its lease has been expired for ``HUNG_GRACE`` seconds it loses its jobs, its later writes are
refused and its handlers see ``step.cancelled`` when it continues; an operator can fence it out
at once (``Engine.force_release``, ``walstate release``). An engine whose clock steps forward
takes no other engine's live job: leases are measured on the store's lease clock. Real
processes, real signals, both backends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import pytest

from walstate import Engine, JobOwned, LeaseLost, StepContext, UnknownJob, Workflow
from walstate.ownership import HUNG_GRACE
from walstate.testing import check_invariants

from .proc_owner import Ctx, flow
from .test_ownership_processes import (ROOT, env, first_start, hold_worker, job_row, kill_group, lines, notes, poll,
                                       proc_state, unshare)

pytestmark = [pytest.mark.slow, pytest.mark.backends]


@pytest.fixture
def effects(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> str:
    path = os.path.join(str(tmp_path), "effects.log")
    monkeypatch.setenv("WALSTATE_EFFECTS", path)
    return path


class SteppedClock:
    """An engine's wall clock that an NTP step (or a resumed VM) moves forward by ``step`` seconds."""

    def __init__(self) -> None:
        self.step = 0.0

    def __call__(self) -> float:
        return time.time() + self.step


def lease_row(db: str, job: int) -> tuple[str, str | None, int, float | None, float | None]:
    from walstate.testing import connect

    conn = connect(db, timeout=10)
    try:
        row = conn.execute("SELECT state, owner, epoch, lease_expires, renewed_at FROM walstate_job WHERE id=?",
                           (job,)).fetchone()
        return str(row[0]), row[1], int(row[2]), row[3], row[4]
    finally:
        conn.close()


# -- item 6: a stepped clock takes no live job -------------------------------------------------------

LEASE = 2.0


def test_an_engine_whose_clock_steps_forward_takes_no_live_job_judged_by_lease(db_path: str, effects: str) -> None:
    # The owner lives in another pid namespace: from here only its lease can tell whether it lives.
    prefix = unshare("--pid", "--fork", "--mount-proc")
    worker = hold_worker(prefix, db=db_path, WALSTATE_HOLD="120", WALSTATE_LEASE=str(LEASE))
    clock = SteppedClock()
    engine = Engine(db_path, workers=1, clock=clock)
    engine.register(flow)
    try:
        job, inner_pid = first_start(effects)
        _, owner, epoch, _ = job_row(db_path, job)
        clock.step = 120.0  # the engine's clock jumps two minutes ahead (60 leases)
        assert clock() > time.time() + 100
        # Three leases of recovery and of a worker with the stepped clock: the live run keeps its job.
        until = time.monotonic() + 3 * LEASE
        while time.monotonic() < until:
            report = engine.recover()
            assert job not in report, "an engine whose clock stepped 120 s ahead took a live run's job"
            assert job_row(db_path, job)[:3] == ("running", owner, epoch)
            time.sleep(0.05)  # pacing the loop, not waiting for anything
        with engine.start_worker(1):
            until = time.monotonic() + 3 * LEASE
            while time.monotonic() < until:
                assert job_row(db_path, job)[:3] == ("running", owner, epoch), \
                    "a worker whose clock stepped 120 s ahead took a live run's job"
                time.sleep(0.05)
        assert [e[0] for e in lines(effects)] == ["start"], "the live run's step was run a second time"
        assert int(lines(effects)[0][1]) == inner_pid
    finally:
        kill_group(worker)
        engine.close()


# -- item 7: a hung owner loses its jobs ---------------------------------------------------------------

HUNG_LEASE = 3.0


def stopped_worker(db_path: str, effects: str) -> tuple[subprocess.Popen[str], int]:
    """A worker on this host whose step waits (for step.cancelled, up to 120 s), SIGSTOPped once it runs."""
    worker = hold_worker([], db=db_path, WALSTATE_HOLD="120", WALSTATE_LEASE=str(HUNG_LEASE),
                         WALSTATE_WATCH_CANCEL="1")
    job, pid = first_start(effects)
    assert pid == worker.pid
    os.killpg(worker.pid, signal.SIGSTOP)
    poll(lambda: proc_state(worker.pid) == "T", "the worker to stop")
    return worker, job


def continued(worker: subprocess.Popen[str]) -> dict[str, object]:
    """SIGCONT the worker and return what its run reported (it exits once its run stopped)."""
    os.killpg(worker.pid, signal.SIGCONT)
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, out + err
    result: dict[str, object] = json.loads(out.splitlines()[-1])
    return result


def test_a_stopped_owner_on_this_host_loses_its_job_once_its_lease_is_expired_past_the_grace(
        db_path: str, effects: str) -> None:
    recoverer = Engine(db_path, workers=1)
    recoverer.register(flow)
    worker, job = stopped_worker(db_path, effects)
    try:
        _, owner, epoch, expires, renewed = lease_row(db_path, job)
        assert owner is not None and expires is not None and renewed is not None
        refused = 0
        deadline = time.monotonic() + 120
        while True:
            report = recoverer.recover()
            now = recoverer.lease_clock()
            if job in report:
                break
            if now < expires + HUNG_GRACE:
                refused += 1
            assert time.monotonic() < deadline, "the job of a stopped owner was never taken (its pid lives)"
            time.sleep(0.05)
        # Not before its lease had been expired for the grace: a live pid holds its job until then.
        assert now >= expires + HUNG_GRACE, f"taken {expires + HUNG_GRACE - now:.2f}s before the grace was over"
        assert refused > 0
        assert recoverer.status(job).state == "succeeded"
        # The stopped run continues: its heartbeat finds the claim lost, its handler sees step.cancelled,
        # and its completion write is refused (the step is not run again, nor recorded twice).
        result = continued(worker)
        assert result["state"] == "LeaseLost", result
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGCONT)
            kill_group(worker)
        recoverer.close()
    tags = [(e[0], int(e[1])) for e in lines(effects) if e[3] == "held"]
    assert ("cancelled", worker.pid) in tags, tags
    assert [t for t in tags if t[0] == "start"] == [("start", worker.pid), ("start", os.getpid())]
    assert f"claimed from {owner}" in " ".join(n or "" for n in journal_notes(db_path, job))
    assert "interrupted" in notes(db_path, job, "held")
    assert succeeded_moves(db_path, job, "held") == 1  # the stale run's completion was refused
    check_invariants(db_path, flow, job)


def test_cancel_of_a_stopped_owners_job_waits_only_until_its_lease_is_expired_past_the_grace_then_cancels_it(
        db_path: str, effects: str) -> None:
    # The report: cancel timed out for good on a hung owner's job. A live pid's claim is asked to
    # cancel (JobOwned while the owner may still be running it); once its lease has been expired for the
    # grace the owner is hung, and cancel cancels the job itself, fencing the stopped run out.
    operator = Engine(db_path, workers=1)
    operator.register(flow)
    worker, job = stopped_worker(db_path, effects)
    try:
        _, owner, epoch, expires, _ = lease_row(db_path, job)
        assert expires is not None
        owned = 0
        deadline = time.monotonic() + 120
        while True:
            try:
                cancelled = operator.cancel(job, wait=0.1)
                break
            except JobOwned:
                owned += 1
            assert time.monotonic() < deadline, "cancel never got past a stopped owner"
        assert operator.lease_clock() >= expires + HUNG_GRACE
        assert sorted(cancelled) == ["after", "held"]
        state, now_owner, now_epoch, _, _ = lease_row(db_path, job)
        assert (state, now_owner) == ("cancelled", None) and now_epoch > epoch
        # The stopped run continues: its writes are refused, the job stays cancelled.
        result = continued(worker)
        assert result["state"] == "LeaseLost", result
        assert lease_row(db_path, job)[0] == "cancelled"
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGCONT)
            kill_group(worker)
        operator.close()
    assert owned > 0, "the live owner's claim was cancelled over without asking it first"
    assert succeeded_moves(db_path, job, "held") == 0


def succeeded_moves(db: str, job: int, step: str) -> int:
    from walstate.testing import connect

    conn = connect(db, timeout=10)
    try:
        return int(conn.execute("SELECT count(*) FROM walstate_journal WHERE job_id=? AND step=? AND "
                                "to_state='succeeded'", (job, step)).fetchone()[0])
    finally:
        conn.close()


def journal_notes(db: str, job: int) -> list[str | None]:
    from walstate.testing import connect

    conn = connect(db, timeout=10)
    try:
        return [n for (n,) in conn.execute("SELECT note FROM walstate_journal WHERE job_id=? AND step IS NULL "
                                           "ORDER BY id", (job,))]
    finally:
        conn.close()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "walstate", *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=120)


def test_walstate_release_fences_out_a_stopped_owner_at_once_and_show_names_its_host_pid_and_last_renewal(
        db_path: str, effects: str) -> None:
    recoverer = Engine(db_path, workers=1)
    recoverer.register(flow)
    worker, job = stopped_worker(db_path, effects)
    try:
        _, owner, epoch, expires, renewed = lease_row(db_path, job)
        assert owner is not None and renewed is not None
        shown = cli("show", db_path, str(job))
        assert shown.returncode == 0, shown.stderr
        assert f"held by host {os.uname().nodename} pid {worker.pid}, lease renewed " in shown.stdout, shown.stdout
        as_json = json.loads(cli("show", db_path, str(job), "--json").stdout)
        assert as_json["held_by"]["pid"] == worker.pid and as_json["held_by"]["lease_renewed_at"] == renewed
        status = recoverer.status(job)
        assert status.owner is not None and (status.owner.host, status.owner.pid) == (os.uname().nodename, worker.pid)
        assert status.owner.renewed_at == renewed and status.owner.lease_expires == expires
        assert job not in recoverer.recover()  # its pid lives and its lease is young: it keeps the job

        released = cli("release", db_path, str(job))
        assert released.returncode == 0, released.stderr
        assert f"job {job} released from host {os.uname().nodename} pid {worker.pid} (epoch {epoch})" in released.stdout
        assert lease_row(db_path, job)[1:3] == (None, epoch + 1)
        # Runnable at once, long before the lease (let alone the grace) is over.
        assert recoverer.lease_clock() < expires + HUNG_GRACE
        assert list(recoverer.recover()) == [job]
        assert recoverer.status(job).state == "succeeded" and recoverer.status(job).owner is None
        again = cli("release", db_path, str(job))
        assert again.returncode == 0 and "nobody holds it" in again.stdout
        result = continued(worker)
        assert result["state"] == "LeaseLost", result
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGCONT)
            kill_group(worker)
        recoverer.close()
    assert any(n and n.startswith(f"released by an operator (walstate release) (taken from {owner}, epoch {epoch})")
               for n in journal_notes(db_path, job))
    assert ("cancelled", worker.pid) in [(e[0], int(e[1])) for e in lines(effects)]
    check_invariants(db_path, flow, job)


def test_force_release_takes_a_claim_from_a_live_run_whose_handler_then_sees_cancelled_and_writes_nothing(
        db_path: str) -> None:
    entered, seen = threading.Event(), threading.Event()
    runs: list[int] = []
    w = Workflow("w", context=Ctx, phases=["p"])

    @w.step(phase="p", name="waits")
    def waits(ctx: Ctx, step: StepContext) -> dict[str, int]:
        runs.append(step.attempt)
        if len(runs) == 1:  # the first run waits until it is told to stop
            entered.set()
            if step.cancelled.wait(60):
                seen.set()
        return {"held": len(runs)}

    holder = Engine(db_path, workers=1, lease=0.3)
    holder.register(w)
    other = Engine(db_path, workers=1)
    other.register(w)
    outcome: list[BaseException | object] = []
    job = holder.submit(w, Ctx())
    t = threading.Thread(target=lambda: outcome.append(_run(holder, job)))
    t.start()
    try:
        assert entered.wait(30)
        epoch = other.store.read.job(job).epoch  # type: ignore[union-attr]
        assert other.force_release(job) == holder.owner
        # Journalled as the operator's act, naming whom the claim was taken from; the job stays running.
        assert journal_notes(db_path, job)[-1] == f"released by an operator (taken from {holder.owner}, epoch {epoch})"
        assert seen.wait(30), "the fenced-out run's handler never saw step.cancelled"
        t.join(30)
        assert isinstance(outcome[0], LeaseLost), outcome
        row = other.store.read.job(job)
        assert row is not None and row.owner is None and row.epoch == epoch + 1
        assert other.status(job).steps["waits"].state == "running"  # the fenced run wrote nothing
        assert other.force_release(job) is None  # nobody holds it now
        assert list(other.recover()) == [job]
        status = other.status(job)
        assert status.state == "succeeded" and status.context.held == 2 and status.owner is None
        notes = journal_notes(db_path, job)
        assert other.force_release(job) is None  # a finished job is left as it is, and nothing is journalled
        assert other.status(job).state == "succeeded" and journal_notes(db_path, job) == notes
        with pytest.raises(UnknownJob, match="no job 1000000"):
            other.force_release(10**6)
    finally:
        seen.set()
        t.join(30)
        holder.close()
        other.close()


def _run(engine: Engine, job: int) -> BaseException | object:
    try:
        return engine.run(job)
    except BaseException as exc:  # the test reads what the caller got
        return exc
