"""A worker wakes a parked job at its wake-up time by itself: not because a scan or a commit found it.

Issue 26, item 14: mutants of the worker loop that drop a parked job's wake-up survived, because
the worker's periodic scan for dead owners (every 0.5 s) claims the job anyway. Here that scan
is made an hour long, nothing else commits, and only the engine's (injected) clock moves: the job
must resume once the clock reaches its wake-up time exactly, and not before. SQLite: PostgreSQL's
workers also look for work once a second whatever the clock says (the LISTEN fallback).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pydantic import BaseModel

from walstate import Engine, JobOwned, StepContext, Workflow
from walstate.runtime import Worker


class Ctx(BaseModel):
    woke: float = 0.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"waited {timeout:g}s for {what}"
        time.sleep(0.01)


def start_slow_scanning_worker(engine: Engine) -> Worker:
    """The engine's worker, with its look for dead owners once an hour (it scans once as it starts)."""
    worker = Worker(engine, 2, scan=3600.0)
    with engine._worker_lock:
        engine._worker = worker
    return worker.start()


def parked(engine: Engine, job: int) -> bool:
    row = engine.store.read.job(job)
    return row is not None and row.owner is None and row.wake_at is not None


def test_a_worker_resumes_a_parked_job_when_its_clock_reaches_the_wake_up_time_with_no_scan_and_no_commit(
        db_path: str) -> None:
    clock = Clock(1_000_000.0)
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="nap")(lambda ctx, step: {"woke": step.sleep(10)})
    with Engine(db_path, clock=clock) as e:
        e.register(flow)
        worker = start_slow_scanning_worker(e)
        try:
            job = e.submit(flow, Ctx())
            wait_until(lambda: parked(e, job), "the job to park")
            assert e.store.read.job(job).wake_at == 1_000_010.0  # type: ignore[union-attr]
            claims = worker.claimed
            # Spied on (the real read still runs): an idle worker reads the next wake-up time again
            # only when the file changed, never on every poll (it would busy-poll the database).
            reads: list[float | None] = []
            real = e.store.read.next_wake
            e.store.read.next_wake = lambda flows: reads.append(real(flows)) or reads[-1]  # type: ignore[method-assign]
            clock.now = 1_000_009.99
            time.sleep(0.3)  # many polls of the worker's loop: none may claim the job early
            assert parked(e, job) and worker.claimed == claims, "a parked job was claimed before its wake-up time"
            assert len(reads) <= 2, f"an idle worker read the next wake-up {len(reads)} times in 0.3 s with no commit"
            clock.now = 1_000_010.0  # exactly the wake-up time: due now
            wait_until(lambda: e.status(job).state == "succeeded", "the parked job to resume at its wake-up time")
            assert e.status(job).context.woke == 1_000_010.0
            assert worker.claimed == claims + 1
        finally:
            e.stop_worker()


def test_after_one_wake_up_the_worker_keeps_the_next_parked_jobs_time_and_wakes_it_too(db_path: str) -> None:
    clock = Clock(1_000_000.0)
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p", name="nap")
    def nap(ctx: Ctx, step: StepContext) -> dict[str, float]:
        return {"woke": step.sleep(10 if ctx.woke == 0 else 20)}

    with Engine(db_path, clock=clock) as e:
        e.register(flow)
        worker = start_slow_scanning_worker(e)
        try:
            first, second = e.submit(flow, Ctx()), e.submit(flow, Ctx(woke=1))
            wait_until(lambda: parked(e, first) and parked(e, second), "both jobs to park")
            clock.now = 1_000_010.0
            wait_until(lambda: e.status(first).state == "succeeded", "the first parked job to resume")
            assert parked(e, second)
            # The first job's end was the last commit; from here only the clock moves.
            clock.now = 1_000_020.0
            wait_until(lambda: e.status(second).state == "succeeded", "the second parked job to resume")
            assert e.status(second).context.woke == 1_000_020.0
        finally:
            e.stop_worker()


def test_a_job_parked_by_another_engine_wakes_this_worker_at_its_time(db_path: str) -> None:
    # The park is another connection's commit: the worker learns the new wake-up time from the file.
    clock = Clock(1_000_000.0)
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="nap")(lambda ctx, step: {"woke": step.sleep(5)})
    with Engine(db_path, clock=clock) as runner, Engine(db_path, clock=clock) as e:
        runner.register(flow)
        e.register(flow)
        worker = start_slow_scanning_worker(e)
        try:
            job = runner.submit(flow, Ctx())
            done = threading.Event()

            def run() -> None:
                try:
                    runner.run(job)
                except JobOwned:
                    pass  # the worker claimed it first
                finally:
                    done.set()

            # The worker may claim it first; either way the job parks until 1_000_005.
            threading.Thread(target=run, daemon=True).start()
            wait_until(lambda: parked(e, job), "the job to park")
            assert done.wait(30)
            clock.now = 1_000_005.0
            wait_until(lambda: e.status(job).state == "succeeded", "the job parked elsewhere to resume")
        finally:
            e.stop_worker()
