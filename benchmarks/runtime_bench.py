"""The job runtime: background starts vs a run() loop, wake-up latency, idle cost, several worker processes.

Figures (ratios against a baseline measured in the same run):

* jobs/s through ``engine.start`` (the runtime, several jobs in flight) vs the
  same jobs through ``engine.run`` in a loop;
* submit-to-start latency, p50 and p99: a job submitted in the worker's own
  process, and one submitted by another process (the worker sees it through
  ``PRAGMA data_version``);
* the CPU an idle worker uses over ``WALSTATE_IDLE_SECONDS`` (default 10 s),
  as a share of one core;
* jobs/s with 4 worker processes vs 1 on one file.

Run alone: ``python -m benchmarks.runtime_bench``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel

from walstate import Engine, StepContext, Workflow

from .common import Figure, fresh_path, measure, rate, report

JOBS = int(os.environ.get("WALSTATE_RUNTIME_JOBS", "200"))
STEPS = 10
IDLE_SECONDS = float(os.environ.get("WALSTATE_IDLE_SECONDS", "10"))


class Ctx(BaseModel):
    n: int = 0
    submitted: float = 0.0


def small_flow() -> Workflow[Ctx]:
    flow = Workflow("bench", context=Ctx, phases=["p"])
    for i in range(STEPS):
        flow.step(phase="p", name=f"s{i}")(lambda ctx, step: None)
    return flow


def stamp_flow(out: str) -> Workflow[Ctx]:
    """One step that appends (submitted, started) to ``out``: the submit-to-start latency."""
    flow = Workflow("stamp", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def stamp(ctx: Ctx, step: StepContext) -> None:
        with open(out, "a") as f:
            f.write(f"{ctx.submitted} {time.time()}\n")

    return flow


def run_loop() -> float:
    e = Engine(fresh_path("runtime-run"), workers=4)
    flow = e.register(small_flow())

    def go() -> None:
        for i in range(JOBS):
            e.run(e.submit(flow, Ctx(n=i)))

    result = rate(JOBS * STEPS, go)
    e.close()
    return result


def start_many() -> float:
    e = Engine(fresh_path("runtime-start"), workers=4)
    flow = e.register(small_flow())
    e.start_worker(concurrency=8)

    def go() -> None:
        handles = [e.start(flow, Ctx(n=i)) for i in range(JOBS)]
        for h in handles:
            h.result(timeout=120)

    result = rate(JOBS * STEPS, go)
    e.close()
    return result


def latencies(path: str) -> list[float]:
    rows = [line.split() for line in Path(path).read_text().splitlines()]
    return sorted(float(b) - float(a) for a, b in rows)


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def latency_in_process(samples: int = 40) -> list[float]:
    db = fresh_path("runtime-lat")
    out = db + ".stamps"
    e = Engine(db)
    flow = e.register(stamp_flow(out))
    with e.start_worker(concurrency=2):
        for _ in range(samples):
            time.sleep(0.02)  # let the worker go idle again
            job = e.submit(flow, Ctx(submitted=time.time()))
            e.handle(job).result(timeout=10)
    e.close()
    return latencies(out)


WORKER = """
import sys, time
sys.path.insert(0, {root!r})
from walstate import Engine
from benchmarks.runtime_bench import {factory}
import os
e = Engine({db!r})
e.register({factory}({arg!r}))
e.store.read.data_version()  # the file is open: this worker is ready
open({db!r} + ".ready." + str(os.getpid()), "w").close()
e.serve({concurrency})
"""


def spawn_worker(db: str, factory: str, arg: str, concurrency: int = 4) -> subprocess.Popen[bytes]:
    """A worker process; returns once it has opened the file (start-up is not measured)."""
    root = str(Path(__file__).resolve().parent.parent)
    code = WORKER.format(root=root, factory=factory, db=db, arg=arg, concurrency=concurrency)
    proc = subprocess.Popen([sys.executable, "-c", code])
    ready = Path(f"{db}.ready.{proc.pid}")
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"benchmark worker {proc.pid} did not start")
        time.sleep(0.01)
    return proc


def small_flow_factory(_: str) -> Workflow[Ctx]:
    return small_flow()


def latency_cross_process(samples: int = 40) -> list[float]:
    db = fresh_path("runtime-xlat")
    out = db + ".stamps"
    e = Engine(db)
    flow = e.register(stamp_flow(out))
    worker = spawn_worker(db, "stamp_flow", out, 2)
    try:
        for _ in range(samples):
            time.sleep(0.05)
            job = e.submit(flow, Ctx(submitted=time.time()))
            e.handle(job).result(timeout=30)
    finally:
        worker.terminate()
        worker.wait(30)
        e.close()
    return latencies(out)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu_share() -> float:
    db = fresh_path("runtime-idle")
    Engine(db).close()
    worker = spawn_worker(db, "small_flow_factory", "", 4)
    try:
        time.sleep(1.5)  # imports and start-up are not idle time
        before, t = cpu_seconds(worker.pid), time.monotonic()
        time.sleep(IDLE_SECONDS)
        return (cpu_seconds(worker.pid) - before) / (time.monotonic() - t)
    finally:
        worker.terminate()
        worker.wait(30)


def processes(count: int) -> float:
    db = fresh_path(f"runtime-procs{count}")
    e = Engine(db)
    flow = e.register(small_flow())
    workers = [spawn_worker(db, "small_flow_factory", "", 4) for _ in range(count)]
    try:
        started = time.perf_counter()
        jobs = [e.submit(flow, Ctx(n=i)) for i in range(JOBS)]
        for job in jobs:
            e.handle(job).result(timeout=300)
        return JOBS * STEPS / (time.perf_counter() - started)
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(30)
        e.close()


def main() -> list[Figure]:
    figures = []
    loop, ls = measure(run_loop, reps=3)
    started, ss = measure(start_many, reps=3)
    figures.append(Figure(f"{JOBS} jobs x {STEPS} steps, run() in a loop", loop, ls, "sub-steps/s"))
    figures.append(Figure(f"{JOBS} jobs x {STEPS} steps, engine.start (worker, 8 in flight)", started, ss,
                          "sub-steps/s", "run() in a loop", started / loop))
    inproc = latency_in_process()
    cross = latency_cross_process()
    for name, values, target in (("in process", inproc, "<= 50 ms"), ("across processes", cross, "~100 ms")):
        p50, p99 = pct(values, 0.5) * 1000, pct(values, 0.99) * 1000
        spread = (max(values) - min(values)) / statistics.median(values) if values else 0.0
        figures.append(Figure(f"submit-to-start latency p50, {name}", p50, spread, "ms", target=target))
        figures.append(Figure(f"submit-to-start latency p99, {name}", p99, spread, "ms", target=target))
    idle = idle_cpu_share()
    figures.append(Figure(f"idle worker CPU over {IDLE_SECONDS:g}s", idle * 100, 0.0, "% of a core", target="< 1%"))
    one = processes(1)
    four = processes(4)
    figures.append(Figure("1 worker process (concurrency 4)", one, 0.0, "sub-steps/s"))
    figures.append(Figure("4 worker processes (concurrency 4 each)", four, 0.0, "sub-steps/s",
                          "1 worker process", four / one))
    report("The job runtime", figures, "runtime.json")
    return figures


if __name__ == "__main__":
    main()
