"""Event-loop lag while jobs run under ``durability="full"``: the asyncio API never blocks the loop.

An asyncio app starts ``WALSTATE_ASYNC_JOBS`` jobs (10 async steps each) with
``engine.start_async`` and awaits them with ``handle.result_async`` while a
ticker coroutine measures how late each 1 ms ``asyncio.sleep`` wakes: any
commit, claim or fsync run on the loop would show as lag. Baseline: the same
ticker with no job running, in the same run.

Run alone: ``python -m benchmarks.async_bench``.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from pydantic import BaseModel

from walstate import Engine, Workflow
from walstate.aio import AsyncStepContext

from .common import Figure, fresh_path, report

JOBS = int(os.environ.get("WALSTATE_ASYNC_JOBS", "50"))


class Ctx(BaseModel):
    n: int = 0


def flow() -> Workflow[Ctx]:
    f = Workflow("async", context=Ctx, phases=["p"])
    for i in range(10):
        @f.step(phase="p", name=f"s{i}")
        async def step(ctx: Ctx, s: AsyncStepContext) -> None:
            await asyncio.sleep(0)
    return f


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def lags_while(work: Any) -> list[float]:
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - t - 0.001)

    tick = asyncio.create_task(ticker())
    await work()
    stop.set()
    await tick
    return lags


def measure() -> tuple[list[float], list[float]]:
    async def app() -> tuple[list[float], list[float]]:
        idle = await lags_while(lambda: asyncio.sleep(1.0))
        with Engine(fresh_path("async-lag"), durability="full") as e:
            f = e.register(flow())

            async def run_jobs() -> None:
                handles = await asyncio.gather(*(e.start_async(f, Ctx(n=i)) for i in range(JOBS)))
                await asyncio.gather(*(h.result_async(timeout=300) for h in handles))

            busy = await lags_while(run_jobs)
        return idle, busy

    return asyncio.run(app())


def main() -> list[Figure]:
    idle, busy = measure()
    figures = []
    for name, values in (("idle", idle), (f"{JOBS} jobs running, full", busy)):
        for q, label in ((0.5, "p50"), (0.99, "p99"), (1.0, "max")):
            figures.append(Figure(f"event-loop lag {label}, {name}", pct(values, q) * 1000, 0.0, "ms",
                                  target="<= 5 ms" if "jobs" in name else ""))
    report("Event-loop lag of the asyncio API", figures, "async.json")
    return figures


if __name__ == "__main__":
    main()
