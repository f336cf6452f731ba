"""Transient refusals are the library's to retry (issue 26, items 1, 2, 8 and 15).

Real processes hold the database's writer (SQLite's ``BEGIN IMMEDIATE``; on PostgreSQL a
transaction that locks walstate's tables) for longer than the engine's ``busy_timeout``, or
terminate its sessions, while a run commits, calls ``once()``, ``sleep()`` or ``wait_for()``,
or while an application submits: the run waits and keeps its claim, the handler runs once,
the job succeeds. A run stopped past its lease (SIGSTOP) and superseded calls no ``once()``
function and stores no record once it is continued (SIGCONT).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from walstate import DatabaseBusy, Engine, LeaseLost, StepContext, Workflow
from walstate.storage.contract import open_store
from walstate.testing import check_invariants, connect

from . import proc_writes
from .proc_writes import Ctx

pytestmark = [pytest.mark.slow, pytest.mark.backends]

ROOT = Path(__file__).resolve().parent.parent
#: The engines' busy_timeout here: far below how long the other process holds the writer.
BUSY = 0.2
HOLD = 2.0


@pytest.fixture
def effects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    path = str(tmp_path / "effects.log")
    monkeypatch.setenv("WALSTATE_EFFECTS", path)
    return path


def lines(path: str) -> list[list[str]]:
    p = Path(path)
    return [line.split() for line in p.read_text().splitlines()] if p.exists() else []


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def child(*args: str, prefix: tuple[str, ...] = (), **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*prefix, sys.executable, "-m", "tests.proc_writes", *args], cwd=ROOT, env=env(**extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out + err
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result


def poll(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g}s for {what}")
        time.sleep(0.005)


@pytest.fixture
def holder(tmp_path: Path, db_path: str) -> Iterator[Callable[[float], str]]:
    """``hold(seconds)``: another process holds the writer for that long; returns once it holds."""
    procs: list[subprocess.Popen[str]] = []

    def hold(seconds: float = HOLD) -> str:
        ready = str(tmp_path / f"held-{len(procs)}")
        procs.append(child("hold", db_path, str(seconds), ready))
        poll(lambda: os.path.exists(ready) or procs[-1].poll() is not None, "the other process to hold the writer")
        assert os.path.exists(ready), procs[-1].communicate()
        return ready

    yield hold
    for proc in procs:
        finish(proc)


def journal(db: str, job: int) -> list[tuple[str | None, str, str | None]]:
    conn = connect(db, timeout=10)
    try:
        rows = conn.execute("SELECT step, to_state, note FROM walstate_journal WHERE job_id=? ORDER BY id",
                            (job,)).fetchall()
    finally:
        conn.close()
    return [(r[0], r[1], r[2]) for r in rows]


def one_step(body: Callable[[StepContext], Any], name: str = "w", **options: Any) -> Workflow[Ctx]:
    flow = Workflow(name, context=Ctx, phases=["p"])
    flow.step(phase="p", name="s", **options)(lambda ctx, step: body(step))
    return flow


# -- item 1: a busy completion write is retried, never a re-execution ----------------------------------


def test_a_busy_completion_write_is_retried_and_its_handler_never_runs_again(
        db_path: str, effects: str, holder: Callable[[float], str], caplog: pytest.LogCaptureFixture) -> None:
    inside = threading.Event()
    held: list[str] = []

    def body(step: StepContext) -> None:
        proc_writes.effect("run", step.job_id)
        inside.set()
        poll(lambda: bool(held) and os.path.exists(held[0]), "the writer to be held")  # returns while it is held

    flow = one_step(body)
    caplog.set_level(logging.INFO, logger="walstate")
    with Engine(db_path, busy_timeout=BUSY, lease=30) as engine:
        handle = engine.start(flow, Ctx())
        assert inside.wait(60)
        held.append(holder(HOLD))
        assert handle.result(timeout=120).state == "succeeded"
    assert [e[0] for e in lines(effects)] == ["run"], "the handler ran again after its completion met a busy database"
    rows = journal(db_path, handle.id)
    assert [r for r in rows if r[1] == "running" and r[0] is None] == [(None, "running", "claimed")]
    assert not any(note and "interrupted" in note for _, _, note in rows), rows
    # The journal says the completion waited; the log says it was retried, and nothing about a takeover.
    assert any(step == "s" and state == "succeeded" and note and "busy" in note for step, state, note in rows), rows
    text = caplog.text
    assert "trying again" in text and "taken over" not in text
    check_invariants(db_path, flow, handle.id)


@pytest.mark.sqlite_only
def test_a_transactional_step_of_another_process_holding_the_file_never_makes_a_plain_step_run_twice(
        db_path: str, effects: str, tmp_path: Path) -> None:
    # The reproduction: process A's transactional step holds the write transaction for
    # longer than B's busy_timeout while B's plain step completes.
    ready = str(tmp_path / "a-holds")
    inside = threading.Event()
    a: list[subprocess.Popen[str]] = []

    def body(step: StepContext) -> None:
        proc_writes.effect("run", step.job_id)
        inside.set()
        poll(lambda: os.path.exists(ready), "process A's transactional step to hold the file")

    flow = one_step(body, name="appender")
    with Engine(db_path, busy_timeout=BUSY, lease=30) as engine:
        handle = engine.start(flow, Ctx())
        assert inside.wait(60)
        a.append(child("txhold", db_path, str(HOLD), ready))
        assert handle.result(timeout=120).state == "succeeded"
    assert finish(a[0]) == {"state": "succeeded"}
    assert [e[0] for e in lines(effects)] == ["run"]
    assert not any(note and ("interrupted" in note or "found dead" in note)
                   for _, _, note in journal(db_path, handle.id))


@pytest.mark.sqlite_only
def test_a_run_that_stops_on_a_lasting_error_gives_its_claim_back_and_is_never_taken_over_from_itself(
        db_path: str, caplog: pytest.LogCaptureFixture) -> None:
    runs: list[int] = []

    def body(step: StepContext) -> None:
        runs.append(step.attempt)
        if len(runs) == 1:  # the completion of this attempt is refused: not a transient reason
            conn = connect(db_path, timeout=10)
            conn.execute("CREATE TRIGGER refuse BEFORE UPDATE ON walstate_step WHEN NEW.state='succeeded' "
                         "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
            conn.commit()
            conn.close()

    flow = one_step(body)
    caplog.set_level(logging.INFO, logger="walstate")
    with Engine(db_path, lease=30) as engine:
        handle = engine.start(flow, Ctx())
        poll(lambda: any(note and note.startswith("released: the run stopped on WriteFailed")
                         for _, _, note in journal(db_path, handle.id)), "the run to give its claim back")
        conn = connect(db_path, timeout=10)
        conn.execute("DROP TRIGGER refuse")
        conn.commit()
        conn.close()
        assert handle.result(timeout=120).state == "succeeded"
    rows = journal(db_path, handle.id)
    assert [note for step, state, note in rows if step is None and state == "running" and note
            and note.startswith("claimed")] == ["claimed", "claimed"], rows
    assert "taken over" not in caplog.text
    assert len(runs) == 2


# -- item 2: once() is fenced ----------------------------------------------------------------------------


def unshare_pid() -> tuple[str, ...]:
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --pid is not permitted here: {probe.stderr.strip()}")
    return ("unshare", "--pid", "--fork", "--mount-proc")


def test_a_run_superseded_while_stopped_neither_calls_once_nor_stores_its_record(db_path: str, effects: str) -> None:
    # The stale run lives in another pid namespace, so only its lease speaks for it (as on another host).
    prefix = unshare_pid()
    with Engine(db_path, lease=30) as live:
        live.register(proc_writes.charging)
        job = live.submit(proc_writes.charging, Ctx())
        stale = child("stale", db_path, str(job), prefix=prefix, WALSTATE_STALE="1")
        try:
            poll(lambda: any(e[0] == "start" for e in lines(effects)), "the stale run to start its step")
            os.killpg(stale.pid, signal.SIGSTOP)
            conn = connect(db_path, timeout=10)
            try:
                poll(lambda: conn.execute("SELECT lease_expires FROM walstate_job WHERE id=?",
                                          (job,)).fetchone()[0] < live.clock() - 0.5, "the stopped run's lease to expire")
            finally:
                conn.close()
            proc_writes.PROCEED.clear()
            results: list[Any] = []
            runner = threading.Thread(target=lambda: results.append(live.run(job)))
            runner.start()
            # The live run took the job over and is in its handler, before its once().
            poll(lambda: sum(e[0] == "start" for e in lines(effects)) == 2, "the live run to start the step")
            Path(effects + ".go").touch()
            os.killpg(stale.pid, signal.SIGCONT)
            outcome = finish(stale)
            proc_writes.PROCEED.set()
            runner.join(120)
        finally:
            proc_writes.PROCEED.set()
            if stale.poll() is None:
                os.killpg(stale.pid, signal.SIGKILL)
                stale.communicate()
        assert outcome["outcome"] == "LeaseLost"
        assert results and results[0].state == "succeeded"
        # One charge, by the live run, and the live run got its own value.
        charges = [e for e in lines(effects) if e[0] == "charge"]
        assert [int(e[1]) for e in charges] == [os.getpid()], charges
        assert results[0].context.n == os.getpid()
        conn = connect(db_path, timeout=10)
        try:
            stored = conn.execute("SELECT result FROM walstate_once WHERE job_id=?", (job,)).fetchall()
        finally:
            conn.close()
        assert [json.loads(r[0]) for r in stored] == [os.getpid()]
    check_invariants(db_path, proc_writes.charging, job)


def test_once_of_a_run_that_lost_its_claim_raises_lease_lost_without_calling_its_function(db_path: str) -> None:
    calls: list[str] = []
    seen: list[BaseException] = []

    def body(step: StepContext) -> None:
        # Another run takes the job over (an operator's retry elsewhere bumps the epoch).
        conn = connect(db_path, timeout=10)
        try:
            conn.execute("UPDATE walstate_job SET epoch=epoch+1, owner='someone-else' WHERE id=?", (step.job_id,))
            conn.commit()
        finally:
            conn.close()
        try:
            step.once("charge", lambda: calls.append("called"))
        except Exception as exc:
            seen.append(exc)
            raise

    flow = one_step(body)
    with Engine(db_path) as engine:
        job = engine.submit(flow, Ctx())
        with pytest.raises(LeaseLost):
            engine.run(job)
    assert calls == []
    assert [type(e).__name__ for e in seen] == ["LeaseLost"]
    assert "once('charge')" in str(seen[0])


# -- item 8: once(), sleep() and wait_for() wait out a busy database --------------------------------------


@pytest.mark.parametrize("call", ["once", "sleep", "wait_for"])
def test_once_sleep_and_wait_for_wait_for_a_writer_held_past_busy_timeout_and_the_job_succeeds(
        db_path: str, effects: str, holder: Callable[[float], str], call: str) -> None:
    inside = threading.Event()
    held: list[str] = []

    def body(step: StepContext) -> Any:
        if not inside.is_set():
            inside.set()
            poll(lambda: bool(held), "the writer to be held")
        if call == "once":
            return step.once("x", lambda: 7)
        if call == "sleep":
            return step.sleep(0.01)
        return step.wait_for("t")

    flow = one_step(body)
    with Engine(db_path, busy_timeout=BUSY, lease=30) as engine:
        engine.register(flow)
        job = engine.submit(flow, Ctx())
        engine.send(job, "t", 1)
        engine.start_worker()
        handle = engine.handle(job)
        assert inside.wait(60)
        held.append(holder(HOLD))
        assert handle.result(timeout=120).state == "succeeded"
    assert_no_second_run(db_path, job)
    check_invariants(db_path, flow, job)


def assert_no_second_run(db: str, job: int) -> None:
    """No attempt of the job failed, was interrupted or taken over: every claim was a plain one."""
    rows = journal(db, job)
    assert not [r for r in rows if r[1] in ("retrying", "failed")], rows
    assert not [r for r in rows if r[2] and ("found dead" in r[2] or "interrupted" in r[2])], rows


@pytest.mark.postgres
@pytest.mark.parametrize("call", ["once", "sleep", "wait_for"])
def test_once_sleep_and_wait_for_survive_the_workers_sessions_being_terminated(
        db_path: str, backend: str, call: str) -> None:
    if backend != "postgres":
        pytest.skip("PostgreSQL sessions")
    inside = threading.Event()
    terminated = threading.Event()

    def body(step: StepContext) -> Any:
        if not inside.is_set():
            inside.set()
            assert terminated.wait(60)
        if call == "once":
            return step.once("x", lambda: 7)
        if call == "sleep":
            return step.sleep(0.01)
        return step.wait_for("t")

    flow = one_step(body)
    with Engine(db_path, lease=30) as engine:
        engine.register(flow)
        job = engine.submit(flow, Ctx())
        engine.send(job, "t", 1)
        engine.start_worker()
        assert inside.wait(60)
        admin = connect(db_path, timeout=10)
        try:
            killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                                   "datname=current_database() AND pid <> pg_backend_pid()").fetchall()
        finally:
            admin.close()
        assert killed
        terminated.set()
        # Read on a session of its own: this thread's was terminated too.
        conn = connect(db_path, timeout=10)
        try:
            poll(lambda: conn.execute("SELECT state FROM walstate_job WHERE id=?", (job,)).fetchone()[0]
                 not in ("pending", "running"), "the job to end", timeout=120)
            state = conn.execute("SELECT state FROM walstate_job WHERE id=?", (job,)).fetchone()[0]
        finally:
            conn.close()
        assert state == "succeeded"
    assert_no_second_run(db_path, job)
    check_invariants(db_path, flow, job)



def test_a_release_whose_session_was_terminated_is_written_again_on_a_new_one(db_path: str, backend: str) -> None:
    if backend != "postgres":
        pytest.skip("PostgreSQL sessions")
    flow = one_step(lambda step: None)
    with Engine(db_path) as engine:
        engine.register(flow)
        job, epoch = claimed_job(engine, flow)
        admin = connect(db_path, timeout=10)
        try:
            assert admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                                 "datname=current_database() AND pid <> pg_backend_pid()").fetchall()
        finally:
            admin.close()
        # Safe to repeat after a lost session: a release that landed bumped the epoch, so a second one misses.
        assert engine.store.write.release(job, engine.owner, epoch, "test")
        row = engine.store.read.job(job)
        assert row is not None and row.owner is None and row.epoch == epoch + 1

# -- item 15: other writers wait for a held writer; a long transactional step is named ---------------------


def test_submit_waits_for_a_writer_another_process_holds_instead_of_raising_database_busy(
        db_path: str, holder: Callable[[float], str]) -> None:
    flow = one_step(lambda step: None)
    with Engine(db_path, busy_timeout=BUSY) as engine:
        engine.register(flow)
        holder(HOLD)
        job = engine.submit(flow, Ctx())
        assert engine.status(job).state == "pending"



def test_a_child_forked_from_an_engine_waits_for_a_writer_another_process_holds_like_its_parent(
        db_path: str, holder: Callable[[float], str]) -> None:
    flow = one_step(lambda step: None)
    with Engine(db_path, busy_timeout=BUSY) as engine:
        engine.register(flow)
        first = engine.submit(flow, Ctx())  # the parent has written through its store before it forks
        holder(HOLD)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 2
            try:
                engine.submit(flow, Ctx())
                code = 0
            except BaseException as exc:
                print(f"forked child: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the forked child's submit did not wait out the held writer"
        assert sorted(j.id for j in engine.jobs()) == [first, first + 1]

def test_submit_raises_database_busy_saying_how_long_it_waited_once_its_patience_runs_out(
        db_path: str, holder: Callable[[float], str]) -> None:
    flow = one_step(lambda step: None)
    with Engine(db_path, busy_timeout=0.1, patience=0.3) as engine:
        engine.register(flow)
        holder(5.0)
        with pytest.raises(DatabaseBusy, match=r"creating a 'w' job.*the patience of 0.3s; raise Engine\(patience"):
            engine.submit(flow, Ctx())
        assert engine.jobs() == []




def test_a_bare_stores_write_refused_by_a_held_writer_raises_database_busy_at_once_as_the_driver_does(
        db_path: str, holder: Callable[[float], str]) -> None:
    # Only an engine waits out a busy database (its patience); a store opened on its own keeps the driver's behaviour.
    flow = one_step(lambda step: None)
    with Engine(db_path) as engine:
        engine.register(flow)
        job = engine.submit(flow, Ctx())
    store = open_store(db_path, busy_timeout=0.1)
    try:
        holder(HOLD)
        with pytest.raises(DatabaseBusy) as refused:
            store.write.request_cancel(job)
        assert "tried" not in str(refused.value), refused.value
        with pytest.raises(DatabaseBusy, match=rf"releasing job {job}"):
            store.write.force_release(job, "an operator's release")
    finally:
        store.close()


def test_a_write_waiting_for_a_held_writer_gives_up_when_its_engine_closes_saying_so(
        db_path: str, holder: Callable[[float], str], caplog: pytest.LogCaptureFixture) -> None:
    flow = one_step(lambda step: None)
    caplog.set_level(logging.WARNING, logger="walstate.storage")
    engine = Engine(db_path, busy_timeout=BUSY)
    engine.register(flow)
    outcome: list[BaseException] = []

    def submit() -> None:
        try:
            engine.submit(flow, Ctx())
        except BaseException as exc:  # the test reads what the caller got
            outcome.append(exc)

    try:
        holder(5.0)
        t = threading.Thread(target=submit)
        t.start()
        poll(lambda: any("was refused" in r.getMessage() for r in caplog.records), "the submit to wait")
    finally:
        engine.close(grace=0)
    t.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], DatabaseBusy), outcome
    assert "the engine is closing" in str(outcome[0])
    assert [r.getMessage() for r in caplog.records if "gave up" in r.getMessage()], "the give-up was not logged"

def claimed_job(engine: Engine, flow: Workflow[Ctx]) -> tuple[int, int]:
    """A job of ``flow`` claimed by ``engine``'s owner: ``(job, epoch)``."""
    job = engine.submit(flow, Ctx())
    row = engine.store.read.job(job)
    assert row is not None
    claimed = engine.store.write.claim(job, state=row.state, epoch=row.epoch, owner=engine.owner, lease_expires=1e12,
                                       note="test")
    assert claimed is not None
    return job, claimed.epoch


def test_a_release_waits_for_a_writer_another_process_holds_past_the_patience_of_unfenced_writes(
        db_path: str, holder: Callable[[float], str], caplog: pytest.LogCaptureFixture) -> None:
    # A release is fenced by its claim: it keeps trying for as long as the claim holds, not the engine's patience.
    flow = one_step(lambda step: None)
    caplog.set_level(logging.WARNING, logger="walstate.storage")
    with Engine(db_path, busy_timeout=BUSY, patience=0.3) as engine:
        engine.register(flow)
        job, epoch = claimed_job(engine, flow)
        holder(HOLD)
        assert engine.store.write.release(job, engine.owner, epoch, "test")
        row = engine.store.read.job(job)
        assert row is not None and row.owner is None and row.epoch == epoch + 1
    warned = [r.getMessage() for r in caplog.records if r.name == "walstate.storage"]
    assert any(f"releasing job {job} was refused" in m and "the run keeps its claim" in m for m in warned), warned
    assert any(f"releasing job {job} written after" in m for m in warned), warned


def test_a_release_given_a_patience_gives_up_after_it_saying_how_long_it_waited(
        db_path: str, holder: Callable[[float], str]) -> None:
    flow = one_step(lambda step: None)
    with Engine(db_path, busy_timeout=0.1) as engine:
        engine.register(flow)
        job, epoch = claimed_job(engine, flow)
        holder(5.0)
        with pytest.raises(DatabaseBusy, match=rf"releasing job {job}.*the patience of 0.3s"):
            engine.store.write.release(job, engine.owner, epoch, "test", patience=0.3)

@pytest.mark.sqlite_only
def test_a_transactional_step_holding_the_writer_past_hold_warning_is_named_in_a_warning(
        db_path: str, caplog: pytest.LogCaptureFixture) -> None:
    flow = one_step(lambda step: time.sleep(0.2), name="slow", transactional=True)
    caplog.set_level(logging.WARNING, logger="walstate.storage")
    with Engine(db_path, hold_warning=0.05) as engine:
        job = engine.submit(flow, Ctx())
        assert engine.run(job).state == "succeeded"
    warned = [r.getMessage() for r in caplog.records if r.name == "walstate.storage"]
    assert any(f"step 's' of job {job} held the database's only writer" in m and "hold_warning=0.05s" in m
               for m in warned), warned


@pytest.mark.sqlite_only
def test_a_short_transactional_step_logs_no_hold_warning(db_path: str, caplog: pytest.LogCaptureFixture) -> None:
    flow = one_step(lambda step: None, name="quick", transactional=True)
    caplog.set_level(logging.WARNING, logger="walstate.storage")
    with Engine(db_path, hold_warning=30.0) as engine:
        assert engine.run(engine.submit(flow, Ctx())).state == "succeeded"
    assert [r for r in caplog.records if r.name == "walstate.storage"] == []


def test_engine_refuses_a_patience_or_hold_warning_that_is_not_a_number_of_seconds(db_path: str) -> None:
    from walstate import ConfigurationError

    for bad in ({"patience": -1.0}, {"patience": float("nan")}, {"patience": float("inf")},
                {"hold_warning": float("nan")}, {"hold_warning": -0.5}):
        with pytest.raises(ConfigurationError, match=next(iter(bad))):
            Engine(db_path, **bad)  # type: ignore[arg-type]

