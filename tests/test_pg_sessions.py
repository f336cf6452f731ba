"""PostgreSQL sessions that end under a run: terminated or restarted ones, and ones of a stopped process.

Issue 26 (items 1, 7, 8, 15), as the chaos runs found them on PostgreSQL:

* a session terminated (``pg_terminate_backend``, a server restart) while a transactional step's
  handler runs inside its transaction rolled that transaction back: the handler runs again in a
  new one, under the same claim and attempt, instead of the driver's error failing the step;
* a process stopped inside a transaction (SIGSTOP) keeps its locks until the server ends its
  session, which PostgreSQL never does by itself: walstate's sessions carry
  ``idle_in_transaction_session_timeout`` = the lease plus ``HUNG_GRACE``, so the stopped owner's
  locks go when its jobs are taken from it.

Real server, real terminations, real signals.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from walstate import Engine, StepContext, StepResult, Workflow

from . import pg_stop_child
from .test_ownership_processes import ROOT, env, poll, proc_state

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

psycopg = pytest.importorskip("psycopg")


def sql(url: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on a session of its own (autocommit); its rows, if it returns any."""
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, params or None)
        return list(cur.fetchall()) if cur.description else []


# -- a terminated session inside a transactional step --------------------------------------------------


class Empty(BaseModel):
    pass


terminated = Workflow("pg_terminated", context=Empty, phases=["only"])
calls = {"runs": 0, "charges": 0}
DB: dict[str, str] = {}


@terminated.step(phase="only", transactional=True)
def pay(ctx: Empty, step: StepContext) -> StepResult:
    calls["runs"] += 1
    run = calls["runs"]

    def charge() -> str:
        calls["charges"] += 1
        return f"receipt-{run}"

    receipt = step.once("charge", charge)  # an outside call: made once, whatever happens to the transaction
    step.execute("INSERT INTO paid (job, run, receipt) VALUES (?, ?, ?)", (step.job_id, run, receipt))
    if run == 1:
        pid = step.execute("SELECT pg_backend_pid()").fetchone()[0]
        # The server ends this very session (waiting up to 10 s until it has), as an operator or a failover would.
        assert sql(DB["url"], "SELECT pg_terminate_backend(%s, 10000)", (pid,)) == [(True,)]
        step.execute("INSERT INTO paid (job, run, receipt) VALUES (?, ?, 'after')", (step.job_id, run))
    return StepResult(output={"receipt": receipt})


def test_a_session_terminated_inside_a_transactional_step_runs_its_handler_again_instead_of_failing_the_step(
        pg_database: str, caplog: pytest.LogCaptureFixture) -> None:
    DB["url"] = pg_database
    calls.update(runs=0, charges=0)
    sql(pg_database, "CREATE TABLE paid (job bigint, run int, receipt text)")
    engine = Engine(pg_database, workers=1)
    engine.register(terminated)
    try:
        job = engine.submit(terminated, {})
        with caplog.at_level(logging.WARNING, logger="walstate.storage"):
            status = engine.run(job)
        assert status.state == "succeeded", status
        # Run again in a new transaction: the first run's rows were rolled back with it, the outside
        # call was not made again (its once() record was stored again), and no attempt was counted.
        assert calls == {"runs": 2, "charges": 1}
        assert sql(pg_database, "SELECT run, receipt FROM paid ORDER BY run") == [(2, "receipt-1")]
        state, attempt, error, output = sql(pg_database, "SELECT state, attempt, error, output FROM walstate_step "
                                                         "WHERE job_id=%s AND name='pay'", (job,))[0]
        assert (state, attempt, error) == ("succeeded", 1, None)
        assert "receipt-1" in output
        assert "its handler runs again in a new transaction" in caplog.text
    finally:
        engine.close()


# -- a process stopped inside a transaction ------------------------------------------------------------


def test_a_worker_stopped_inside_a_commit_loses_its_row_locks_and_its_job_to_another_worker(
        pg_database: str, tmp_path: Path) -> None:
    sql(pg_database, "CREATE TABLE booked (job bigint, pid int)")
    engine = Engine(pg_database, workers=1, lease=pg_stop_child.LEASE)
    engine.register(pg_stop_child.flow)
    marker = tmp_path / "stopped"
    job = engine.submit(pg_stop_child.flow, {})
    child = subprocess.Popen([sys.executable, "-m", "tests.pg_stop_child", pg_database, str(job), str(marker)],
                             cwd=ROOT, env=env(), start_new_session=True)
    try:
        poll(lambda: marker.exists() and proc_state(child.pid) == "T", "the child to stop inside its commit", 120)
        # The stopped process's session sits idle in its transaction, holding the job's row locks.
        held = sql(pg_database, "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                                "WHERE a.state = 'idle in transaction' AND a.application_name = 'walstate' "
                                "AND l.locktype IN ('tuple', 'transactionid') AND l.granted")
        assert held[0][0] >= 1, held
        later = engine.submit(pg_stop_child.flow, {})
        engine.start_worker()
        # Taken over once the lease has been expired for HUNG_GRACE; the server ended the stopped
        # transaction by then, so no claim skips the job's locked row for good.
        deadline = time.monotonic() + 120
        while engine.status(job).state != "succeeded" or engine.status(later).state != "succeeded":
            assert time.monotonic() < deadline, (engine.status(job).state, engine.status(later).state,
                                                 sql(pg_database, "SELECT pid, state, xact_start FROM "
                                                                  "pg_stat_activity WHERE datname=current_database()"))
            time.sleep(0.1)
        # The stopped run's booking was rolled back with its transaction: one booking per job.
        assert sorted(sql(pg_database, "SELECT job, pid FROM booked")) == [(job, os.getpid()), (later, os.getpid())]
    finally:
        engine.close()
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)


# -- a server restart under a plain step's completion --------------------------------------------------


@pytest.fixture(scope="module")
def own_server() -> Any:
    """A PostgreSQL server of this module's own, which a test may stop and start again."""
    from . import pgserver

    if pgserver.find_bindir() is None:
        pytest.skip("no PostgreSQL server binaries")
    server = pgserver.start()
    try:
        yield server
    finally:
        server.stop()


restarted = Workflow("pg_restarted", context=Empty, phases=["only"])
SERVER: dict[str, Any] = {}


@restarted.step(phase="only")
def note(ctx: Empty, step: StepContext) -> None:
    from .chaos_app import PgServer

    calls["runs"] += 1
    if calls["runs"] == 1:
        # An immediate stop ends every session (the engine's idle ones included); the server is
        # back a moment later, while the completion of this step is being written.
        control = PgServer(SERVER["server"])
        control.stop_immediate()
        restart = threading.Thread(target=lambda: (time.sleep(0.5), control.start()), daemon=True)
        SERVER["restart"] = restart
        restart.start()


def test_a_server_restart_under_a_plain_steps_completion_is_waited_out_not_a_second_call(own_server: Any) -> None:
    import urllib.parse
    import uuid

    name = f"restart_{uuid.uuid4().hex[:12]}"
    sql(own_server.url, f'CREATE DATABASE "{name}"')  # a name made here, not input
    url = urllib.parse.urlsplit(own_server.url)._replace(path=f"/{name}").geturl()
    SERVER["server"] = own_server
    calls.update(runs=0, charges=0)
    engine = Engine(url, workers=1)
    engine.register(restarted)
    try:
        job = engine.submit(restarted, {})
        assert engine.run(job).state == "succeeded"
        assert calls["runs"] == 1  # its handler returned once: the completion was written, not the step run again
        assert sql(url, "SELECT count(*) FROM walstate_journal WHERE job_id=%s AND note LIKE '%%interrupted%%'",
                   (job,)) == [(0,)]
    finally:
        # The restart thread may still be waiting for pg_isready when the job is done: it must end
        # here, not after the module's server is stopped (its error would land in a later test).
        restart = SERVER.pop("restart", None)
        if restart is not None:
            restart.join(timeout=120)
        engine.close()
