"""Many small jobs: walstate end to end vs the raw sqlite3 floor doing the same durable work, same run.

The shape apps run (issue 16): ``JOBS`` jobs of ``STEPS`` no-op sub-steps in
one parallel phase, each submitted and run to its end through the public
API. The floor is raw ``sqlite3`` on walstate's own schema doing the same
durable work per job, one transaction each: the job row with its step rows,
two CAS UPDATE + journal INSERT commits per sub-step (pending -> running ->
succeeded), and the job's end (CAS + journal). Figures are sub-steps/s (so a
job's fixed cost counts against it) and, for 1- and 50-step jobs, the cost per
job and per sub-step in microseconds.

The runtime rows are measured twice: as the process runs by default, and
with its threads on one CPU (:func:`one_cpu`, what ``taskset -c 0`` does to a
whole process). On a small virtual machine a thread woken on another core
costs tens of microseconds before it holds the GIL, and a runtime with 8 jobs
in flight hands the GIL between threads a few times per sub-step; on one core
the same hand-off is a plain context switch. The README (*Benchmarks*, *Many
small jobs*, round 3) says when to pin a process.

Run alone: ``python -m benchmarks.small_jobs_bench`` (``WALSTATE_SMALL_JOBS``
sets the number of jobs, default 200). It also draws
``benchmarks/results/small_jobs.png`` when matplotlib is installed.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from pydantic import BaseModel

from walstate import Engine, Workflow
from walstate.storage import Store

from .common import RESULTS, Figure, fresh_path, measure, rate, report
from .peers_bench import _DBOS, dbos_available

JOBS = int(os.environ.get("WALSTATE_SMALL_JOBS", "200"))
#: What each sub-step of a measured run cost the process: (CPU us, context switches), one per repetition.
Costs = list[tuple[float, float]]
STEPS = 10
REPS = 5


class Empty(BaseModel):
    pass


def flow(steps: int) -> Workflow[Empty]:
    f = Workflow("small", context=Empty, phases=["p"])
    for i in range(steps):
        f.step(phase="p", name=f"s{i}")(lambda ctx, step: None)
    return f


# -- the raw floor ------------------------------------------------------------------


def raw_floor(durability: str, steps: int = STEPS, jobs: int = JOBS, costs: Costs | None = None) -> float:
    """Sub-steps/s of raw sqlite3 doing each job's durable work sequentially, one transaction per commit."""
    path = fresh_path("small-raw")
    Store(path).close()  # same schema, made by walstate
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={durability.upper()}")
    journal = ("INSERT INTO walstate_journal (job_id, step, from_state, to_state, attempt, at, note) "
               "VALUES (?, ?, ?, ?, ?, ?, ?)")

    def one_job() -> None:
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        job = conn.execute("INSERT INTO walstate_job (workflow, state, context, initial_context, created_at, "
                           "updated_at) VALUES ('small', 'pending', '{}', '{}', ?, ?)", (now, now)).lastrowid
        conn.executemany("INSERT INTO walstate_step (job_id, name, phase, position, state, attempt, updated_at) "
                         "VALUES (?, ?, 'p', ?, 'pending', 0, ?)", [(job, f"s{i}", i, now) for i in range(steps)])
        conn.execute("COMMIT")
        ids = [r[0] for r in conn.execute("SELECT id FROM walstate_step WHERE job_id=? ORDER BY position", (job,))]
        for sid, name in zip(ids, (f"s{i}" for i in range(steps))):
            for src, dst in (("pending", "running"), ("running", "succeeded")):
                conn.execute("BEGIN IMMEDIATE")
                cur = conn.execute("UPDATE walstate_step SET state=?, attempt=1, updated_at=? WHERE id=? AND state=?",
                                   (dst, time.time(), sid, src))
                assert cur.rowcount == 1
                conn.execute(journal, (job, name, src, dst, 1, time.time(), None))
                conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE walstate_job SET state='succeeded', updated_at=? WHERE id=? AND state='pending'",
                     (time.time(), job))
        conn.execute(journal, (job, None, "running", "succeeded", 0, time.time(), None))
        conn.execute("COMMIT")

    result = rate(jobs * steps, lambda: [one_job() for _ in range(jobs)] and None, costs)
    conn.close()
    return result


# -- walstate -------------------------------------------------------------------------


def run_per_job(durability: str = "normal", steps: int = STEPS, jobs: int = JOBS, costs: Costs | None = None) -> float:
    """Sub-steps/s with ``submit()`` then ``run()`` per job, 1 worker thread."""
    e = Engine(fresh_path("small-run"), durability=durability, workers=1)  # type: ignore[arg-type]
    f = e.register(flow(steps))

    def go() -> None:
        for _ in range(jobs):
            e.run(e.submit(f, Empty()))

    result = rate(jobs * steps, go, costs)
    e.close()
    return result


def runtime(durability: str, concurrency: int, workers: int = 1, costs: Costs | None = None) -> float:
    """Sub-steps/s with ``engine.start`` per job and ``handle.result``: ``concurrency`` jobs in flight."""
    e = Engine(fresh_path("small-rt"), durability=durability, workers=workers)  # type: ignore[arg-type]
    f = e.register(flow(STEPS))
    e.start_worker(concurrency=concurrency)

    def go() -> None:
        handles = [e.start(f, Empty()) for _ in range(JOBS)]
        for h in handles:
            h.result(timeout=300)

    result = rate(JOBS * STEPS, go, costs)
    e.close()
    return result


@contextlib.contextmanager
def one_cpu() -> Iterator[bool]:
    """Run the body's new threads on one CPU: this thread's affinity, which threads it starts inherit.

    Yields whether it could (Linux only); the affinity is restored on exit.
    """
    if not hasattr(os, "sched_setaffinity"):
        yield False
        return
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})  # pid 0: the calling thread only
    try:
        yield True
    finally:
        os.sched_setaffinity(0, allowed)


def pinned(fn: Callable[[], float]) -> Callable[[], float]:
    def run() -> float:
        with one_cpu():
            return fn()
    return run


_WALSTATE_CHILD = r'''
import sys, time
from pydantic import BaseModel
from walstate import Engine, Workflow
class C(BaseModel):
    pass
flow = Workflow("bench", context=C, phases=["p"])
for i in range({steps}):
    flow.step(phase="p", name=f"s{{i}}")(lambda ctx, step: None)
engine = Engine(sys.argv[1], workers=1)
engine.register(flow)
t = time.perf_counter()
for _ in range({jobs}):
    engine.run(engine.submit(flow, C()))
print({jobs} * {steps} / (time.perf_counter() - t))
'''


def _child(code: str, jobs: int) -> float:
    src = code.format(jobs=jobs, steps=STEPS, threads=1)
    out = subprocess.run([sys.executable, "-c", src, fresh_path("small-peer")], capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "child failed")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> list[Figure]:
    figures: list[Figure] = []
    floor_costs: Costs = []
    run_costs: Costs = []
    rt_costs: Costs = []
    rtp_costs: Costs = []
    floor, fs = measure(lambda: raw_floor("normal", costs=floor_costs), reps=REPS)
    figures.append(Figure(f"raw floor, {STEPS}-step jobs, normal", floor, fs, "sub-steps/s"))
    lib, ls = measure(lambda: run_per_job("normal", costs=run_costs), reps=REPS)
    figures.append(Figure("walstate run() per job, 1 worker, normal", lib, ls, "sub-steps/s", "raw floor, normal",
                          lib / floor, ">= 0.6x"))
    rt, rts = measure(lambda: runtime("normal", concurrency=8, costs=rt_costs), reps=REPS)
    figures.append(Figure("walstate runtime, 8 jobs in flight, normal", rt, rts, "sub-steps/s", "raw floor, normal",
                          rt / floor, ">= 0.8x"))
    rtp, rtps = measure(pinned(lambda: runtime("normal", concurrency=8, costs=rtp_costs)), reps=REPS)
    figures.append(Figure("walstate runtime, 8 jobs in flight, normal, on one CPU", rtp, rtps, "sub-steps/s",
                          "raw floor, normal", rtp / floor, ">= 0.8x"))
    figures += cost_figures([("raw floor", floor_costs), ("run() per job", run_costs),
                             ("runtime, 8 jobs in flight", rt_costs),
                             ("runtime, 8 jobs in flight, on one CPU", rtp_costs)])
    ffloor, ffs = measure(lambda: raw_floor("full", jobs=max(20, JOBS // 4)), reps=3)
    figures.append(Figure(f"raw floor, {STEPS}-step jobs, full (sequential)", ffloor, ffs, "sub-steps/s"))
    # "8 workers": the runtime's 8 job slots (group commit across jobs), each job on 1 thread; and
    # the same with 8 threads per job too (group commit across jobs and across one job's steps).
    full, fus = measure(lambda: runtime("full", concurrency=8), reps=3)
    figures.append(Figure("walstate runtime, 8 jobs in flight, full", full, fus, "sub-steps/s", "raw floor, full",
                          full / ffloor, ">= 2x"))
    fullp, fups = measure(pinned(lambda: runtime("full", concurrency=8)), reps=3)
    figures.append(Figure("walstate runtime, 8 jobs in flight, full, on one CPU", fullp, fups, "sub-steps/s",
                          "raw floor, full", fullp / ffloor, ">= 2x"))
    full8, fu8s = measure(lambda: runtime("full", concurrency=8, workers=8), reps=3)
    figures.append(Figure("walstate runtime, 8 jobs x 8 threads each, full", full8, fu8s, "sub-steps/s",
                          "raw floor, full", full8 / ffloor))
    # Fixed cost per job and cost per sub-step, from 1- and 50-step jobs (run() per job, normal).
    one, ones = measure(lambda: run_per_job("normal", steps=1), reps=REPS)
    fifty, fiftys = measure(lambda: run_per_job("normal", steps=50, jobs=max(10, JOBS // 5)), reps=REPS)
    raw1, raw1s = measure(lambda: raw_floor("normal", steps=1), reps=REPS)
    raw50, raw50s = measure(lambda: raw_floor("normal", steps=50, jobs=max(10, JOBS // 5)), reps=REPS)
    figures.append(Figure("walstate 1-step jobs: per job", 1e6 / one, ones, "us", "raw floor, 1-step jobs",
                          one / raw1))
    figures.append(Figure("raw floor 1-step jobs: per job", 1e6 / raw1, raw1s, "us"))
    figures.append(Figure("walstate 50-step jobs: per sub-step", 1e6 / fifty, fiftys, "us", "raw floor, 50-step jobs",
                          fifty / raw50))
    figures.append(Figure("raw floor 50-step jobs: per sub-step", 1e6 / raw50, raw50s, "us"))
    if dbos_available():
        peer_jobs = max(20, JOBS // 5)
        ws, wss = measure(lambda: _child(_WALSTATE_CHILD, peer_jobs), reps=3)
        db, dbs = measure(lambda: _child(_DBOS, peer_jobs), reps=3)
        figures.append(Figure(f"DBOS, {STEPS}-step workflows, one after another", db, dbs, "steps/s"))
        figures.append(Figure(f"walstate, {STEPS}-step jobs, run() per job (own process)", ws, wss, "sub-steps/s",
                              "DBOS, same shape", ws / db, ">= 20x"))
    else:
        print("\nDBOS Transact is not installed (pip install -e '.[bench]'): the DBOS figure is skipped")
    report(f"Many small jobs ({JOBS} jobs x {STEPS} no-op sub-steps, one parallel phase) vs the raw floor",
           figures, "small_jobs.json")
    png = chart(figures)
    if png:
        print(f"chart in {png}")
    return figures


def cost_figures(rows: list[tuple[str, Costs]]) -> list[Figure]:
    """What a sub-step cost the whole process (``normal``): CPU time and context switches, against the floor's.

    These say why a figure is what it is: a runtime that costs more CPU per
    sub-step than ``run()`` while the process uses about one core is paying for
    its threads (GIL hand-offs, wake-ups), not waiting on the disk.
    """
    figures = []
    floor_cpu = statistics.median(c for c, _ in rows[0][1])
    for i, (name, costs) in enumerate(rows):
        cpu = [c for c, _ in costs]
        switches = [s for _, s in costs]
        mid = statistics.median(cpu)
        figures.append(Figure(f"CPU per sub-step: {name}", mid, (max(cpu) - min(cpu)) / mid, "us",
                              "" if i == 0 else f"CPU per sub-step: {rows[0][0]}", None if i == 0 else mid / floor_cpu))
        sw = statistics.median(switches)
        figures.append(Figure(f"context switches per sub-step: {name}", sw,
                              (max(switches) - min(switches)) / sw if sw else 0.0, ""))
    return figures


def chart(figures: list[Figure]) -> str | None:
    """Sub-steps/s of each 10-step-job figure with its spread, beside the floor it is compared with."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [f for f in figures if f.unit in ("sub-steps/s", "steps/s")]
    fig, ax = plt.subplots(figsize=(11, 0.42 * len(rows) + 1.4))
    colors = ["#999" if f.baseline == "" else "#68a" if not f.target else "#c64" if _below(f) else "#3a7"
              for f in rows]
    ax.barh([f.name for f in rows], [f.value for f in rows], xerr=[f.value * f.spread / 2 for f in rows],
            color=colors, capsize=2)
    for i, f in enumerate(rows):
        if f.ratio is not None:
            ax.text(f.value * (1 + f.spread / 2), i, f"  {f.ratio:.2f}x {f.target}", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"sub-steps/s, {STEPS}-step jobs (grey: floors and peers; green/red: target met or not; "
                  "blue: no target)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.subplots_adjust(left=max(fig.subplotpars.left, 0.28))  # room for the longest name
    path = RESULTS / "small_jobs.png"
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _below(f: Figure) -> bool:
    if f.ratio is None or not f.target.startswith(">= "):
        return False
    return f.ratio < float(f.target[3:].rstrip("x"))


if __name__ == "__main__":
    main()
