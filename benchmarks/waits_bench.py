"""Durable waits: wake-up lateness of timers and messages, and the idle cost of many waiting jobs.

Figures:

* timer lateness p50/p99: jobs that ``step.sleep(1.0)`` under one worker
  (concurrency 4): how late each handler resumed after its wake-up time;
* message lateness p50/p99: jobs waiting in ``step.wait_for``, each sent a
  message: from ``engine.send`` to the handler resuming;
* the idle cost of ``WALSTATE_WAITING_JOBS`` (default 10,000) jobs parked in
  ``wait_for``: the worker process's CPU over ``WALSTATE_IDLE_SECONDS`` (default
  5 s) and its resident memory, against the same worker with no waiting job
  measured in the same run.

Run alone: ``python -m benchmarks.waits_bench``.
"""

from __future__ import annotations

import os
import resource
import threading
import time

from pydantic import BaseModel

from walstate import Engine, StepContext, StepResult, Workflow

from .common import Figure, fresh_path, report

TIMERS = int(os.environ.get("WALSTATE_TIMER_JOBS", "200"))
MESSAGES = int(os.environ.get("WALSTATE_MESSAGE_JOBS", "100"))
WAITING = int(os.environ.get("WALSTATE_WAITING_JOBS", "10000"))
IDLE_SECONDS = float(os.environ.get("WALSTATE_IDLE_SECONDS", "5"))


class Ctx(BaseModel):
    n: int = 0


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def timer_lateness() -> list[float]:
    late: list[float] = []
    lock = threading.Lock()
    flow = Workflow("timers", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def nap(ctx: Ctx, step: StepContext) -> None:
        wake_at = step.sleep(1.0)
        with lock:
            late.append(time.time() - wake_at)

    with Engine(fresh_path("waits-timers")) as e:
        e.register(flow)
        with e.start_worker(concurrency=4):
            jobs = [e.submit(flow, Ctx(n=i)) for i in range(TIMERS)]
            for job in jobs:
                e.handle(job).result(timeout=120)
    return late


def message_lateness() -> list[float]:
    late: list[float] = []
    lock = threading.Lock()
    flow = Workflow("hooks", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def hook(ctx: Ctx, step: StepContext) -> StepResult:
        sent = step.wait_for("paid")
        with lock:
            late.append(time.time() - float(sent))
        return StepResult(output=None)

    with Engine(fresh_path("waits-messages")) as e:
        e.register(flow)
        with e.start_worker(concurrency=4):
            jobs = [e.submit(flow, Ctx(n=i)) for i in range(MESSAGES)]
            deadline = time.monotonic() + 120
            while any(e.store.read.job(j).owner is not None or e.store.read.job(j).wake_at is None for j in jobs):
                if time.monotonic() > deadline:
                    raise RuntimeError("jobs did not park")
                time.sleep(0.05)
            for job in jobs:
                time.sleep(0.005)
                e.send(job, "paid", time.time())
            for job in jobs:
                e.handle(job).result(timeout=120)
    return late


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def idle_cost(waiting: int) -> tuple[float, int]:
    """(CPU share of one core, RSS growth in KB) of a worker over the idle window, with ``waiting`` parked jobs."""
    flow = Workflow("parked", context=Ctx, phases=["p"])
    flow.step(phase="p", name="hook")(lambda ctx, step: StepResult(output=step.wait_for("never")))
    db = fresh_path(f"waits-idle-{waiting}")
    with Engine(db) as e:
        e.register(flow)
        for i in range(waiting):
            job = e.submit(flow, Ctx(n=i))
            e.run(job)  # parks at once: the job holds no thread and no claim
        base_rss = rss_kb()
        with e.start_worker(concurrency=4):
            time.sleep(1.0)  # let the worker settle
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.monotonic()
            time.sleep(IDLE_SECONDS)
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            elapsed = time.monotonic() - t0
            grown = rss_kb() - base_rss
    used = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return used / elapsed, grown


def main() -> list[Figure]:
    figures = []
    timers = timer_lateness()
    figures.append(Figure(f"timer lateness p50 ({TIMERS} jobs sleeping 1 s, concurrency 4)", pct(timers, 0.5) * 1000,
                          0.0, "ms"))
    figures.append(Figure("timer lateness p99", pct(timers, 0.99) * 1000, 0.0, "ms"))
    messages = message_lateness()
    figures.append(Figure(f"message lateness p50 ({MESSAGES} parked jobs, send to resume)",
                          pct(messages, 0.5) * 1000, 0.0, "ms"))
    figures.append(Figure("message lateness p99", pct(messages, 0.99) * 1000, 0.0, "ms"))
    idle_none, _ = idle_cost(0)
    idle_many, rss = idle_cost(WAITING)
    figures.append(Figure(f"idle worker CPU, no waiting job ({IDLE_SECONDS:g}s)", idle_none * 100, 0.0,
                          "% of a core"))
    figures.append(Figure(f"idle worker CPU, {WAITING:,} jobs waiting", idle_many * 100, 0.0, "% of a core",
                          "no waiting job", idle_many / idle_none if idle_none else None))
    figures.append(Figure(f"worker memory growth while {WAITING:,} jobs wait", rss, 0.0, "KB"))
    report("Durable waits", figures, "waits.json")
    return figures


if __name__ == "__main__":
    main()
