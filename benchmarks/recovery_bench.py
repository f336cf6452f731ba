"""Recovery cost follows work in flight, not history; rebuilding machines costs a small multiple of a SELECT.

* 1,000 interrupted jobs (one step left ``running`` by a dead process) are
  recovered from a file that also holds 10,000 finished jobs, then from one
  that holds 1,000,000: the time to find and resume them should not grow
  with the finished history.
* 10,000 sub-step rows of one job are turned into in-memory machines
  (``SubStep``) and compared with the raw ``SELECT`` of the same rows.
"""

from __future__ import annotations

import sqlite3
import time

from pydantic import BaseModel

from walstate import Engine, Workflow
from walstate.substep import LiveJob, SubStep
from walstate.storage import Store

from .common import Figure, fresh_path, measure, report

INTERRUPTED = 1000
DEAD_OWNER = "nohost-walstate-bench|999999999|0|dead"


class Empty(BaseModel):
    pass


flow = Workflow("rec", context=Empty, phases=["p"])
flow.step(phase="p", name="s")(lambda ctx, step: None)


def build(finished: int) -> str:
    path = fresh_path(f"rec{finished}")
    Store(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")  # building the fixture only
    conn.execute("BEGIN")
    now = time.time()
    total = finished + INTERRUPTED
    conn.executemany(
        "INSERT INTO walstate_job (id, workflow, state, context, initial_context, owner, lease_expires, created_at, "
        "updated_at) VALUES (?, 'rec', ?, '{}', '{}', ?, ?, ?, ?)",
        ((i, "succeeded" if i <= finished else "running", None if i <= finished else DEAD_OWNER, 0.0, now, now)
         for i in range(1, total + 1)))
    conn.executemany(
        "INSERT INTO walstate_step (job_id, name, phase, position, state, attempt, updated_at) "
        "VALUES (?, 's', 'p', 0, ?, 1, ?)",
        ((i, "succeeded" if i <= finished else "running", now) for i in range(1, total + 1)))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path


def recover_seconds(path: str) -> float:
    # Work on a copy so every repetition starts from the same interrupted state.
    src = sqlite3.connect(path)
    copy_path = path + f".{time.monotonic_ns()}.db"
    dst = sqlite3.connect(copy_path)
    src.backup(dst)
    src.close()
    dst.close()
    engine = Engine(copy_path, workers=1)
    engine.register(flow)
    t = time.perf_counter()
    resumed = engine.recover()
    elapsed = time.perf_counter() - t
    assert len(resumed) == INTERRUPTED, len(resumed)
    engine.close()
    return elapsed


def rebuild() -> tuple[tuple[float, float], tuple[float, float]]:
    store = Store(fresh_path("rebuild"))
    job_id, _ = store.write.create_job("r", None, "{}", [(f"s{i}", "p", i) for i in range(10_000)])
    job = LiveJob(job_id, "r", "running", None, store.write)
    conn = store.db.connection()

    def raw() -> float:
        t = time.perf_counter()
        conn.execute("SELECT id, job_id, name, phase, position, state, attempt, output, error, updated_at "
                     "FROM walstate_step WHERE job_id=? ORDER BY position", (job_id,)).fetchall()
        return time.perf_counter() - t

    def machines() -> float:
        t = time.perf_counter()
        steps = {r.name: SubStep(job, r) for r in store.read.steps(job_id)}
        assert len(steps) == 10_000
        return time.perf_counter() - t

    r = measure(raw, reps=7)
    m = measure(machines, reps=7)
    store.close()
    return r, m


def main() -> list[Figure]:
    small, big = build(10_000), build(1_000_000)
    t_small, ss = measure(lambda: recover_seconds(small), reps=3)
    t_big, bs = measure(lambda: recover_seconds(big), reps=3)
    (raw, rs), (machines, ms) = rebuild()
    figures = [
        Figure("recover 1,000 interrupted jobs, 10k finished in the file", t_small * 1000, ss, "ms"),
        Figure("recover 1,000 interrupted jobs, 1M finished in the file", t_big * 1000, bs, "ms",
               "10k finished", t_big / t_small, "<= 1.5x"),
        Figure("raw SELECT of 10,000 sub-step rows", raw * 1000, rs, "ms"),
        Figure("rebuild 10,000 sub-step machines", machines * 1000, ms, "ms", "raw SELECT", machines / raw,
               "<= 5x"),
    ]
    report("Recovery and rebuild", figures, "recovery.json")
    return figures


if __name__ == "__main__":
    main()
