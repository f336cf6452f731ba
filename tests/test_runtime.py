"""The job runtime in one process: background starts, handles, the worker loop, shutdown, step timeouts.

Real-process cases (several workers, SIGTERM, SIGKILL) are in ``test_runtime_processes.py``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from pydantic import BaseModel

from walstate import (
    DefinitionError,
    Engine,
    JobCancelled,
    JobFailed,
    Retry,
    StepContext,
    UnknownJob,
    Workflow,
)

from .helpers import wait_until

pytestmark = pytest.mark.backends


class Ctx(BaseModel):
    n: int = 0


class Overlap:
    """A 50 ms handler that records how many of its calls ran at once, at most."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0

    def __call__(self, ctx: Ctx, step: StepContext) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.05)
        with self.lock:
            self.now -= 1


def simple_flow(name: str = "w", **kwargs: Any) -> Workflow[Ctx]:
    flow = Workflow(name, context=Ctx, phases=["p", "q"], **kwargs)
    flow.step(phase="p", name="one")(lambda ctx, step: {"n": ctx.n + 1})
    flow.step(phase="q", name="two")(lambda ctx, step: {"n": ctx.n * 10})
    return flow


def test_start_runs_the_job_in_the_background_and_its_handle_returns_the_final_status(db_path: str) -> None:
    flow = simple_flow()
    with Engine(db_path) as e:
        e.register(flow)
        handles = [e.start(flow, Ctx(n=i)) for i in range(5)]
        assert [h.result(timeout=10).context.n for h in handles] == [(i + 1) * 10 for i in range(5)]
        assert all(h.done() and h.status().state == "succeeded" for h in handles)
        again = e.handle(handles[0].id)
        assert again.result(timeout=1).context.n == 10
        with pytest.raises(UnknownJob):
            e.handle(999)


def test_a_handle_raises_job_failed_job_cancelled_and_timeout_error(db_path: str) -> None:
    release = threading.Event()
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def maybe(ctx: Ctx, step: StepContext) -> None:
        if ctx.n == 1:
            raise RuntimeError("boom")
        if ctx.n == 2:
            while not step.cancelled.wait(0.01) and not release.is_set():
                pass

    with Engine(db_path) as e:
        e.register(flow)
        with pytest.raises(JobFailed):
            e.start(flow, Ctx(n=1)).result(timeout=10)
        slow = e.start(flow, Ctx(n=2))
        with pytest.raises(TimeoutError):
            slow.result(timeout=0.1)
        assert slow.status().state == "running"  # a timeout does not stop the job
        e.cancel(slow.id)
        with pytest.raises(JobCancelled):
            slow.result(timeout=10)


def test_an_idle_worker_starts_a_job_submitted_in_its_process_at_once(db_path: str) -> None:
    started: list[float] = []
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="s")(lambda ctx, step: started.append(time.monotonic()))
    with Engine(db_path) as e:
        e.register(flow)
        with e.start_worker(concurrency=2, poll=5.0):  # a slow poll: only the in-process wake-up can be quick
            time.sleep(0.1)  # let the worker go idle
            submitted = time.monotonic()
            job = e.submit(flow, Ctx())
            e.handle(job).result(timeout=10)
        assert started[0] - submitted < 1.0, started[0] - submitted


def test_a_worker_runs_jobs_submitted_elsewhere_and_never_more_than_its_concurrency(db_path: str) -> None:
    step = Overlap()
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="s")(step)
    with Engine(db_path) as submitter:
        submitter.register(flow)
        jobs = [submitter.submit(flow, Ctx(n=i)) for i in range(12)]
    with Engine(db_path) as e:
        e.register(flow)
        with e.start_worker(concurrency=3):
            for job in jobs:
                assert e.handle(job).result(timeout=20).state == "succeeded"
    assert step.most == 3


def test_a_workflow_concurrency_caps_its_jobs_running_at_once(db_path: str) -> None:
    step = Overlap()
    flow = Workflow("capped", context=Ctx, phases=["p"], concurrency=2)
    flow.step(phase="p", name="s")(step)
    with Engine(db_path) as e:
        e.register(flow)
        jobs = [e.submit(flow, Ctx(n=i)) for i in range(8)]
        with e.start_worker(concurrency=6):
            for job in jobs:
                e.handle(job).result(timeout=20)
    assert step.most == 2


def test_a_running_worker_takes_over_a_job_whose_owner_died_by_itself(db_path: str) -> None:
    gate = threading.Event()
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="s")(lambda ctx, step: gate.wait(10) and None)
    dead = Engine(db_path)
    dead.register(flow)
    job = dead.submit(flow, Ctx())
    # Another engine of this process claims it, then "dies": its claim stays, its live run is gone.
    claimed = dead.store.write.claim(job, state="pending", epoch=0, owner=dead.owner, lease_expires=time.time() + 60,
                                     note="claimed")
    assert claimed is not None
    gate.set()
    with Engine(db_path) as e:
        e.register(flow)
        with e.start_worker(concurrency=1):
            assert e.handle(job).result(timeout=10).state == "succeeded"
        notes = [r.note for r in e.history(job) if r.step is None]
        assert any(n and "found dead" in n for n in notes)
    dead.close()


def test_stop_worker_lets_the_step_in_flight_finish_and_releases_the_job_for_another_worker(db_path: str) -> None:
    entered, release = threading.Event(), threading.Event()
    calls: list[str] = []
    flow = Workflow("w", context=Ctx, phases=["p", "q"])

    @flow.step(phase="p")
    def first(ctx: Ctx, step: StepContext) -> None:
        calls.append("first")
        entered.set()
        release.wait(10)

    flow.step(phase="q", name="second")(lambda ctx, step: calls.append("second") and None)
    with Engine(db_path) as e:
        e.register(flow)
        handle = e.start(flow, Ctx())
        assert entered.wait(10)
        stopper = threading.Thread(target=e.stop_worker, kwargs={"drain": False, "grace": 10})
        stopper.start()
        time.sleep(0.05)
        release.set()
        stopper.join(10)
        row = e.store.read.job(handle.id)
        assert row.state == "running" and row.owner is None
        assert handle.status().steps["first"].state == "succeeded"
        assert "released" in (e.history(handle.id)[-1].note or "")
    with Engine(db_path) as other:
        other.register(flow)
        with other.start_worker(1):
            assert other.handle(handle.id).result(timeout=10).state == "succeeded"
    assert calls == ["first", "second"]


def test_a_worker_leaves_a_job_it_cannot_run_unclaimed_and_goes_on(db_path: str) -> None:
    old = Workflow("w", context=Ctx, phases=["p"])
    old.step(phase="p", name="one")(lambda ctx, step: None)
    with Engine(db_path) as e:
        e.register(old)
        stale = e.submit(old, Ctx())
    new = simple_flow()
    with Engine(db_path) as e:
        e.register(new)
        fine = e.submit(new, Ctx())
        with e.start_worker(2) as worker:
            assert e.handle(fine).result(timeout=10).state == "succeeded"
            wait_until(lambda: stale in worker.unrunnable)
        row = e.store.read.job(stale)
        assert row.state == "pending" and row.owner is None


def test_a_worker_claim_returns_each_jobs_version_and_fingerprint_so_its_run_need_not_read_the_job(
        db_path: str) -> None:
    flow = simple_flow()
    with Engine(db_path) as e:
        e.register(flow)
        job = e.submit(flow, Ctx())
        now = time.time()
        claims = e.store.write.claim_runnable(owner="elsewhere", lease_expires=now + 60, limit=5, workflows=["w"],
                                              now=now)
    assert [(c.job_id, c.version, c.fingerprint) for *_, c in claims] == [(job, flow.version, flow.fingerprint)]


def test_an_engine_has_one_worker_and_starting_it_again_sets_its_concurrency(db_path: str) -> None:
    with Engine(db_path) as e:
        e.register(simple_flow())
        with e.start_worker(1) as first:
            assert e.start_worker(3) is first and first.concurrency == 3


def test_a_step_longer_than_its_timeout_fails_as_timed_out_and_is_retried(db_path: str) -> None:
    seen: list[bool] = []
    attempts: list[int] = []
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p", timeout=0.2, retry=Retry(max_attempts=2))
    def slow(ctx: Ctx, step: StepContext) -> dict[str, int]:
        attempts.append(step.attempt)
        if step.attempt == 1:
            seen.append(step.cancelled.wait(5))  # told through step.cancelled
            return {"n": 99}  # a late completion: not recorded
        return {"n": 1}

    with Engine(db_path) as e:
        e.register(flow)
        job = e.submit(flow, Ctx())
        status = e.run(job)
        assert status.context.n == 1 and status.steps["slow"].attempts == 2
        errors = [r.note for r in e.history(job, "slow") if r.to_state == "retrying"]
        assert errors and "timed out after 0.2s" in (errors[0] or "")
    wait_until(lambda: seen == [True])
    assert attempts == [1, 2]


def test_a_step_timeout_with_a_transactional_step_is_refused_at_declaration() -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    with pytest.raises(DefinitionError, match="transactional"):
        flow.step(phase="p", transactional=True, timeout=1.0)(lambda ctx, step: None)


def test_a_worker_runs_each_job_on_its_own_version_and_migrates_one_a_newer_version_declares(db_path: str) -> None:
    ran: list[str] = []
    v1 = Workflow("w", context=Ctx, phases=["p"], version=1)
    v1.step(phase="p", name="one")(lambda ctx, step: ran.append("v1") and None)
    with Engine(db_path) as e:
        e.register(v1)
        old = e.submit(v1, Ctx())
        stale = e.submit(v1, Ctx())
    v2 = Workflow("w", context=Ctx, phases=["p"], version=2)
    v2.step(phase="p", name="one")(lambda ctx, step: ran.append("v2-one") and None)
    v2.step(phase="p", name="two")(lambda ctx, step: ran.append("v2-two") and None)
    with Engine(db_path) as e:
        e.register(v1)
        e.register(v2)
        with e.start_worker(2):
            assert e.handle(old).result(timeout=10).state == "succeeded"
            assert e.handle(stale).result(timeout=10).state == "succeeded"
    assert ran.count("v1") == 2 and "v2-two" not in ran  # both ran on the version they were made with
    v3 = Workflow("w", context=Ctx, phases=["p"], version=3)
    v3.step(phase="p", name="one")(lambda ctx, step: ran.append("v3-one") and None)
    v3.step(phase="p", name="three")(lambda ctx, step: ran.append("v3-three") and None)
    v3.migrate(1, lambda old_ctx: old_ctx)
    with Engine(db_path) as e:
        e.register(v1)
        pending = e.submit(v1, Ctx(n=5))
    with Engine(db_path) as e:
        e.register(v3)  # v1 is not registered here, but v3 declares a migration from it
        with e.start_worker(1):
            status = e.handle(pending).result(timeout=10)
        assert status.state == "succeeded" and set(status.steps) == {"one", "three"}
    assert "v3-three" in ran


def test_run_of_a_job_this_engines_worker_is_claiming_waits_for_it_instead_of_raising(db_path: str) -> None:
    # Found by the asyncio app test: a run() racing the worker's batch claim of the same
    # job saw its own engine as the live owner and raised JobOwned.
    flow = simple_flow()
    with Engine(db_path) as e:
        e.register(flow)
        with e.start_worker(concurrency=4, poll=0.001):
            for i in range(40):
                job = e.submit(flow, Ctx(n=i))  # wakes the worker: it and run() race for the job
                assert e.run(job).state == "succeeded"


def test_a_step_still_running_when_the_grace_runs_out_is_released_and_retried_elsewhere(db_path: str) -> None:
    # Found by a new user: `walstate worker --grace 1` exited with the job still owned by the
    # dead worker (another host would have waited for the lease to expire).
    entered, told = threading.Event(), threading.Event()
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def long(ctx: Ctx, step: StepContext) -> dict[str, int]:
        entered.set()
        if step.attempt == 1:
            if step.cancelled.wait(10):
                told.set()
            time.sleep(0.2)  # returns after the release: its completion must be refused
        return {"n": step.attempt}

    with Engine(db_path) as e:
        e.register(flow)
        handle = e.start(flow, Ctx())
        assert entered.wait(10)
        e.stop_worker(drain=False, grace=0.2)
        assert told.wait(5)
        row = e.store.read.job(handle.id)
        assert row.owner is None and row.state == "running"
        assert "shut down before its steps in flight finished" in (e.history(handle.id)[-1].note or "")
        time.sleep(0.4)  # the cut-short handler has returned by now
        assert e.store.read.steps(handle.id)[0].state == "running"  # its late completion was refused
    with Engine(db_path) as other:
        other.register(flow)
        with other.start_worker(1):
            assert other.handle(handle.id).result(timeout=10).context.n == 2
        assert [r.note for r in other.history(handle.id, "long") if r.to_state == "retrying"] == ["interrupted"]


@pytest.mark.parametrize("point", ["before_begin", "after_update", "after_journal", "before_commit", "after_commit"])
def test_a_crash_at_any_point_of_a_worker_claim_leaves_the_job_claimed_wholly_or_not_at_all(
        db_path: str, point: str) -> None:
    from walstate import InjectedCrash
    from walstate.runtime import Worker
    from walstate.storage import faults
    from walstate.testing import check_invariants

    flow = simple_flow()
    e = Engine(db_path)
    e.register(flow)
    job = e.submit(flow, Ctx(n=1))
    with faults.Injector(faults.Crash(point, 1)), pytest.raises(InjectedCrash):
        e._claim_batch(2, [], Worker(e, 2))  # the worker's one atomic claim
    row = e.store.read.job(job)
    claims = [r for r in e.history(job) if r.step is None]
    if point == "after_commit":
        assert (row.state, row.owner, row.epoch) == ("running", e.owner, 1) and len(claims) == 1
    else:
        assert (row.state, row.owner, row.epoch) == ("pending", None, 0) and claims == []
    e.close()
    with Engine(db_path) as again:  # "after the crash": the claimer's process is gone
        again.register(flow)
        assert list(again.recover()) == [job]
        assert again.status(job).context.n == 20
    check_invariants(db_path, flow, job)
