"""Async handlers and the asyncio API (issue 15): the same guarantees as sync ones."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from pydantic import BaseModel

from walstate import Engine, InjectedCrash, JobCancelled, Retry, StepContext, Workflow
from walstate.aio import AsyncStepContext
from walstate.storage import faults
from walstate.testing import Crash, check_invariants, crash_plans, run_with_crashes

from walstate.testing import connect

pytestmark = pytest.mark.backends


class Ctx(BaseModel):
    n: int = 0
    total: int = 0
    charge: str = ""
    paid: str = ""


def test_an_async_handler_updates_the_context_like_a_sync_one_and_they_mix(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p", "q"])

    @flow.step(phase="p")
    async def fetch(ctx: Ctx, step: AsyncStepContext) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        return {"n": 2}

    @flow.step(phase="q")
    def double(ctx: Ctx, step: StepContext) -> dict[str, Any]:
        return {"total": ctx.n * 2}

    with Engine(db_path) as e:
        e.register(flow)
        status = e.run(e.submit(flow, Ctx()))
        assert status.state == "succeeded" and status.context.total == 4


def test_a_hundred_parallel_async_steps_run_concurrently(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    inside = [0, 0]  # steps inside their handler now, the most at once

    for i in range(100):
        @flow.step(phase="p", name=f"s{i}")
        async def nap(ctx: Ctx, step: AsyncStepContext) -> None:
            inside[0] += 1  # one event loop: no lock needed between these two lines
            inside[1] = max(inside)
            await asyncio.sleep(0.05)
            inside[0] -= 1

    with Engine(db_path, workers=4) as e:
        e.register(flow)
        assert e.run(e.submit(flow, Ctx())).state == "succeeded"
    # Counted, not timed: more than one step was inside its handler at once (as many as the
    # engine's workers at the least), whatever the machine's speed.
    assert inside[1] >= 4


def test_await_once_survives_a_crash_and_a_failed_transactional_async_attempt(db_path: str) -> None:
    calls = Counter[str]()
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p", transactional=True, retry=Retry(max_attempts=2))
    async def charge(ctx: Ctx, step: AsyncStepContext) -> dict[str, Any]:
        async def call_provider() -> str:
            calls["provider"] += 1
            return "ch_1"

        charge_id = await step.once("charge", call_provider)
        step.execute("CREATE TABLE IF NOT EXISTS ledger (charge TEXT)")
        step.execute("INSERT INTO ledger VALUES (?)", (charge_id,))
        if step.attempt == 1:
            raise RuntimeError("the first attempt fails after its writes")
        return {"charge": charge_id}

    with Engine(db_path) as e:
        e.register(flow)
        job = e.submit(flow, Ctx())
        assert e.run(job).context.charge == "ch_1"
        rows = e.store.db.raw().execute("SELECT count(*) FROM ledger").fetchone()[0]
    assert calls["provider"] == 1 and rows == 1  # once kept across the rollback; the insert exactly once


def test_await_sleep_and_wait_for_suspend_an_async_step_durably(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    async def hook(ctx: Ctx, step: AsyncStepContext) -> dict[str, Any]:
        await step.sleep(0.05)
        event = await step.wait_for("paid")
        return {"paid": event["id"]}

    with Engine(db_path) as e:
        e.register(flow)
        handle = e.start(flow, Ctx())
        e.send(handle.id, "paid", {"id": "p1"})
        assert handle.result(timeout=10).context.paid == "p1"
        assert [r.to_state for r in e.history(handle.id, "hook")].count("waiting") >= 1


def test_cancelling_the_job_cancels_its_running_async_handlers(db_path: str) -> None:
    seen: list[str] = []
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    async def long(ctx: Ctx, step: AsyncStepContext) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    with Engine(db_path) as e:
        e.register(flow)
        handle = e.start(flow, Ctx())
        deadline = time.monotonic() + 10
        while handle.status().steps["long"].state != "running":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        e.cancel(handle.id, wait=10)
        with pytest.raises(JobCancelled):
            handle.result(timeout=10)
    assert seen == ["cancelled"]


def test_an_async_step_longer_than_its_timeout_is_cancelled_and_retried(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p", timeout=0.1, retry=Retry(max_attempts=2))
    async def slow(ctx: Ctx, step: AsyncStepContext) -> dict[str, Any]:
        if step.attempt == 1:
            await asyncio.sleep(600)
        return {"n": 1}

    with Engine(db_path) as e:
        e.register(flow)
        job = e.submit(flow, Ctx())
        started = time.monotonic()
        assert e.run(job).context.n == 1
        assert time.monotonic() - started < 300  # cancelled at its timeout, not after its 600 s sleep
        notes = [r.note for r in e.history(job, "slow") if r.to_state == "retrying"]
        assert notes and "timed out" in (notes[0] or "")


def test_an_asyncio_app_starts_jobs_from_concurrent_requests_and_awaits_them(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    async def work(ctx: Ctx, step: AsyncStepContext) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        return {"total": ctx.n + 1}

    async def app() -> list[int]:
        with Engine(db_path) as e:
            e.register(flow)

            async def request(i: int) -> int:
                handle = await e.start_async(flow, Ctx(n=i))
                status = await handle.result_async(timeout=20)
                return int(status.context.total)

            # A ticker shows the loop never stalls while jobs commit.
            lags: list[float] = []

            async def ticker() -> None:
                while True:
                    t = time.monotonic()
                    await asyncio.sleep(0.005)
                    lags.append(time.monotonic() - t - 0.005)

            tick = asyncio.create_task(ticker())
            results = await asyncio.gather(*(request(i) for i in range(20)))
            tick.cancel()
            direct = await e.run_async(e.submit(flow, Ctx(n=100)))
            assert direct.context.total == 101
            print(f"loop lag max {max(lags) * 1000:.1f} ms over {len(lags)} ticks")
            return results

    assert asyncio.run(app()) == [i + 1 for i in range(20)]


def test_cancelling_the_task_that_awaits_a_job_does_not_cancel_the_job(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    async def work(ctx: Ctx, step: AsyncStepContext) -> dict[str, Any]:
        await asyncio.sleep(0.2)
        return {"total": 1}

    async def app() -> None:
        with Engine(db_path) as e:
            e.register(flow)
            handle = await e.start_async(flow, Ctx())
            waiter = asyncio.create_task(handle.result_async())
            await asyncio.sleep(0.02)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            status = await handle.result_async(timeout=10)
            assert status.state == "succeeded"

    asyncio.run(app())


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], database=None,
          max_examples=30)
@given(plan=crash_plans(max_hit=6))
def test_async_handlers_resume_exactly_once_under_any_crash_plan(tmp_path_factory: pytest.TempPathFactory,
                                                                 plan: list[Crash]) -> None:
    effects = Counter[str]()
    flow = Workflow("w", context=Ctx, phases=["p", "q"])

    @flow.step(phase="p", transactional=True)
    async def book(ctx: Ctx, step: AsyncStepContext) -> dict[str, Any]:
        step.execute("CREATE TABLE IF NOT EXISTS booked (x INT)")
        step.execute("INSERT INTO booked VALUES (1)")
        return {"n": 1}

    @flow.step(phase="p")
    async def call(ctx: Ctx, step: AsyncStepContext) -> dict[str, Any]:
        charge = await step.once("charge", lambda: effects.update(["charge"]) or "ch")
        return {"charge": charge}

    @flow.step(phase="q")
    async def total(ctx: Ctx, step: AsyncStepContext) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"total": ctx.n + 10}

    path = str(tmp_path_factory.mktemp("async") / "a.db")
    outcome = run_with_crashes(flow, Ctx(), path, plan, workers=2)
    check_invariants(path, flow, outcome.job_id)
    assert outcome.state == "succeeded"

    conn = connect(path)
    assert conn.execute("SELECT count(*) FROM booked").fetchone()[0] == 1
    conn.close()
    # once() repeats its call only when a crash fell between the call and its record.
    assert effects["charge"] <= 1 + sum(c.point == "before_once_record" for c in plan)


def test_a_crash_inside_an_async_handler_is_a_crash_not_a_failure(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    async def work(ctx: Ctx, step: AsyncStepContext) -> dict[str, Any]:
        return {"n": 1}

    with Engine(db_path) as e:
        e.register(flow)
        job = e.submit(flow, Ctx())
        with faults.Injector(faults.Crash("handler_after_effect", 1)), pytest.raises(InjectedCrash):
            e.run(job)
    with Engine(db_path) as e:
        e.register(flow)
        e.recover()
        assert e.status(job).state == "succeeded"
        assert [r.note for r in e.history(job, "work") if r.to_state == "retrying"] == ["interrupted"]
