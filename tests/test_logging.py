"""walstate logs its job lifecycle through `walstate.*` loggers, with fields, and keeps `transitions` quiet."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from walstate import Engine, InjectedCrash, JobFailed, Retry, StepContext, Workflow
from walstate.log import FIELDS, quiet_transitions
from walstate.storage import faults


class Ctx(BaseModel):
    n: int = 0


def _flow() -> Workflow[Ctx]:
    flow = Workflow("logged", context=Ctx, phases=["one", "two"])

    @flow.step(phase="one", retry=Retry(max_attempts=2))
    def flaky(ctx: Ctx, step: StepContext) -> dict[str, int]:
        if step.attempt == 1:
            raise TimeoutError("first attempt times out")
        return {"n": 1}

    @flow.step(phase="two")
    def second(ctx: Ctx, step: StepContext) -> None:
        return None

    return flow


def _records(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    """walstate's lifecycle records (not the per-transition DEBUG ones) whose message holds ``message``."""
    return [r for r in caplog.records if r.name in ("walstate.engine", "walstate.runner") and message in r.getMessage()]


def _fields(record: logging.LogRecord) -> tuple[object, ...]:
    return tuple(getattr(record, f) for f in FIELDS)


def test_the_job_lifecycle_is_logged_with_job_workflow_step_and_attempt_fields(
        db_path: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="walstate")
    with Engine(db_path, workers=1) as engine:
        job = engine.submit(_flow(), Ctx())
        engine.run(job)
    (claimed,) = _records(caplog, "claimed")
    (started,) = _records(caplog, "started")
    (finished,) = _records(caplog, "finished")
    for record in (claimed, started, finished):
        assert (record.name, record.levelno) == ("walstate.engine", logging.INFO)
        assert _fields(record) == (job, "logged", None, None)
    (retry,) = _records(caplog, "retrying")
    assert (retry.name, retry.levelno) == ("walstate.runner", logging.WARNING)
    assert _fields(retry) == (job, "logged", "flaky", 1)
    assert "TimeoutError" in retry.getMessage()
    moves = [(r.walstate_step, r.walstate_attempt, r.getMessage().split(": ", 1)[1])
             for r in caplog.records if r.name == "walstate.fsm"]
    # The job's own start is its claim (logged by the engine as claimed/started).
    assert moves == [
        ("flaky", 1, "pending -> running (start)"),
        ("flaky", 1, "running -> retrying (retry)"),
        ("flaky", 2, "retrying -> running (start)"),
        ("flaky", 2, "running -> succeeded (succeed)"),
        ("second", 1, "pending -> running (start)"),
        ("second", 1, "running -> succeeded (succeed)"),
        (None, None, "running -> succeeded (succeed)"),
    ]
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "walstate.fsm")


def test_a_failed_job_and_a_resumed_job_are_logged(db_path: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="walstate")
    flow = Workflow("doomed", context=Ctx, phases=["one"])
    flow.step(phase="one")(lambda ctx, step: 1 / 0)
    with Engine(db_path, workers=1) as engine:
        job = engine.submit(flow, Ctx())
        with pytest.raises(JobFailed):
            engine.run(job)
    (failed,) = _records(caplog, ") failed: ")
    assert failed.levelno == logging.INFO and _fields(failed) == (job, "doomed", None, None)
    (step_failed,) = _records(caplog, "failed for good")
    assert step_failed.levelno == logging.WARNING and _fields(step_failed) == (job, "doomed", "<lambda>", 1)

    caplog.clear()
    resumable = _flow()
    first = Engine(db_path, workers=1)
    job = first.submit(resumable, Ctx())
    with faults.Injector(faults.Crash("handler_before_effect", 1)), pytest.raises(InjectedCrash):
        first.run(job)
    first.close()  # the crashed "process" is gone
    with Engine(db_path, workers=1) as second:
        second.register(resumable)
        assert second.recover() == [job]
    (takeover,) = _records(caplog, "taken over")
    assert takeover.levelno == logging.WARNING and _fields(takeover) == (job, "logged", None, None)
    (interrupted,) = _records(caplog, "was interrupted")
    assert interrupted.levelno == logging.WARNING and _fields(interrupted) == (job, "logged", "flaky", 1)
    (resumed,) = _records(caplog, "resumed")
    assert resumed.levelno == logging.INFO and "0 of 2" in resumed.getMessage()


ROOT = Path(__file__).resolve().parent.parent
_CRASH_WORDS = ("died", "crash", "dead", "left alone", "lost its claim", "Traceback")


def _worker_until(db: str, env: dict[str, str], ready: Callable[[], bool]) -> list[str]:
    """Run `walstate worker DB --app tests.slow_app:make_held --grace 0.2` until ``ready()``, SIGTERM it; its stderr."""
    worker = subprocess.Popen([sys.executable, "-m", "walstate", "worker", db, "--app", "tests.slow_app:make_held",
                               "--grace", "0.2", "--log-level", "info"], cwd=ROOT, env={**os.environ, **env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready():
            assert worker.poll() is None and time.monotonic() < deadline, worker.communicate()
            time.sleep(0.02)
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=60)
    finally:
        worker.kill() if worker.poll() is None else None
    assert worker.returncode == 0, err
    return err.splitlines()


def test_a_worker_sigtermed_with_a_step_in_flight_logs_a_release_not_a_crash_and_so_does_the_next_run(
        tmp_path: Path) -> None:
    from tests.slow_app import Ctx as HeldCtx, make_held

    db = str(tmp_path / "jobs.db")
    engine = make_held(db)
    job = engine.submit("held", HeldCtx())
    engine.close()
    entered, gate = tmp_path / "entered", tmp_path / "gate"
    env = {"PYTHONPATH": str(ROOT), "WALSTATE_HELD_ENTERED": str(entered), "WALSTATE_HELD_GATE": str(gate)}
    # The grace (0.2 s) runs out with the step in flight: the job is released, its late result refused.
    first = _worker_until(db, env, entered.exists)
    assert not [l for l in first if any(w in l for w in _CRASH_WORDS)], first
    assert [l.split(" walstate.", 1)[1] for l in first if " WARNING " in l or " ERROR " in l] == [
        f"engine WARNING job {job} (held) released: shut down before its steps in flight finished (the grace ran "
        "out); the next run retries them"], first

    def succeeded() -> bool:
        with sqlite3.connect(db) as conn:
            state = conn.execute("SELECT state FROM walstate_job WHERE id=?", (job,)).fetchone()[0]
        conn.close()
        return bool(state == "succeeded")

    gate.touch()
    second = _worker_until(db, env, succeeded)
    assert not [l for l in second if any(w in l for w in _CRASH_WORDS) or " WARNING " in l], second
    assert any(f"runner INFO job {job} (held) step hold attempt 1 was cut short (released: shut down before its "
               "steps in flight finished); retrying it" in l for l in second), second
    with Engine(db) as e:
        [retry] = [r for r in e.history(job) if r.step == "hold" and r.to_state == "retrying"]
    assert retry.note == "interrupted"  # still counted as an interrupted attempt (max_interruptions)


def test_with_the_root_logger_at_info_a_job_logs_no_transitions_records(
        db_path: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)  # the root logger, as logging.basicConfig(level=INFO) would
    with Engine(db_path) as engine:
        engine.run(engine.submit(_flow(), Ctx()))
    assert [r for r in caplog.records if r.name.startswith("transitions")] == []
    assert _records(caplog, "finished")


@pytest.fixture
def transitions_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("transitions")
    level = logger.level
    yield logger
    logger.setLevel(level)


def test_an_app_that_set_the_transitions_level_itself_keeps_it(transitions_logger: logging.Logger) -> None:
    transitions_logger.setLevel(logging.DEBUG)
    quiet_transitions()
    assert transitions_logger.level == logging.DEBUG
    transitions_logger.setLevel(logging.NOTSET)
    quiet_transitions()
    assert transitions_logger.level == logging.WARNING


def test_the_walstate_logger_has_a_null_handler_so_nothing_prints_unconfigured() -> None:
    import walstate.log  # noqa: F401  (the engine loads it; make sure it is loaded here)

    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("walstate").handlers)
