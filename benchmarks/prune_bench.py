"""Pruning a large history never blocks a running worker's commits for long.

A file is filled (raw SQL, synchronous=OFF: setting up only) with N finished
jobs, each with one step, two journal rows and a once() record (N = 1,000,000
unless ``WALSTATE_PRUNE_JOBS`` says otherwise). A worker thread with its own
connection commits state changes through walstate's write path
(``WritePath.commit``, one job flipping between pending and running) as fast as
it can; first alone (the baseline), then while ``engine.prune`` deletes every
finished job. Reported: the worker's longest commit wait and p99 during the
prune (target: longest <= 50 ms) against the same figures without the prune,
and the prune rate in jobs/s.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import statistics
import threading
import time

from walstate import Engine
from walstate.storage import Change, Store

from .common import Figure, fresh_path, report

JOBS = int(os.environ.get("WALSTATE_PRUNE_JOBS", "1000000"))
CHUNK = 100_000


def build(n: int) -> str:
    path = fresh_path("prune")
    Store(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")  # building the fixture only
    when = time.time() - 10 * 86400
    for start in range(1, n + 1, CHUNK):
        ids = range(start, min(start + CHUNK, n + 1))
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO walstate_job (id, workflow, state, context, initial_context, created_at, "
                         "updated_at) VALUES (?, 'b', 'succeeded', '{}', '{}', ?, ?)",
                         ((i, when, when + i * 1e-6) for i in ids))
        conn.executemany("INSERT INTO walstate_step (job_id, name, phase, position, state, attempt, updated_at) "
                         "VALUES (?, 's', 'p', 0, 'succeeded', 1, ?)", ((i, when) for i in ids))
        conn.executemany("INSERT INTO walstate_journal (job_id, step, from_state, to_state, attempt, at) "
                         "VALUES (?, 's', ?, ?, 1, ?)",
                         ((i, a, b, when) for i in ids for a, b in (("pending", "running"), ("running", "succeeded"))))
        conn.executemany("INSERT INTO walstate_once (job_id, step, name, result, at) VALUES (?, 's', 'k', '1', ?)",
                         ((i, when) for i in ids))
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path


class Worker(threading.Thread):
    """Commits state changes through walstate's write path until stopped; records each commit's wait."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.store = Store(path)
        self.job_id, _ = self.store.write.create_job("w", None, "{}", [("s", "p", 0)])
        self.waits: list[float] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        state, other = "pending", "running"
        try:
            while not self.stop.is_set():
                t = time.perf_counter()
                self.store.write.commit([Change("job", self.job_id, self.job_id, None, state, other)])
                self.waits.append(time.perf_counter() - t)
                state, other = other, state
        except BaseException as exc:  # reported by the caller
            self.error = exc
        finally:
            self.store.close()

    def measure(self, seconds: float | None = None, during: threading.Thread | None = None) -> list[float]:
        self.start()
        if during is not None:
            during.start()
            during.join()
        else:
            time.sleep(seconds or 0)
        self.stop.set()
        self.join()
        if self.error is not None:
            raise self.error
        return self.waits


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]


def main() -> list[Figure]:
    t = time.perf_counter()
    path = build(JOBS)
    setup = time.perf_counter() - t
    alone = Worker(path).measure(seconds=3.0)

    pruned: list[int] = []
    took: list[float] = []

    def prune() -> None:
        with Engine(path, workers=1) as engine:
            start = time.perf_counter()
            pruned.append(engine.prune(0))
            took.append(time.perf_counter() - start)

    during = Worker(path).measure(during=threading.Thread(target=prune))
    assert pruned == [JOBS], pruned
    shutil.rmtree(os.path.dirname(path))  # hundreds of MB at 1M jobs
    base_max, base_p99 = max(alone) * 1000, p99(alone) * 1000
    worst, p99_during = max(during) * 1000, p99(during) * 1000
    figures = [
        Figure("worker commit, longest wait during prune", worst, 0.0, "ms", f"alone {base_max:.1f} ms",
               worst / base_max, "<= 50 ms"),
        Figure("worker commit, p99 wait during prune", p99_during, 0.0, "ms", f"alone {base_p99:.2f} ms",
               p99_during / base_p99, ""),
        Figure("worker commits during prune", len(during) / took[0], 0.0, "commits/s",
               f"alone {len(alone) / 3.0:,.0f}/s", len(during) / took[0] / (len(alone) / 3.0), ""),
        Figure(f"prune rate ({JOBS:,} jobs, 5 rows each)", JOBS / took[0], 0.0, "jobs/s"),
    ]
    report(f"Retention: pruning {JOBS:,} finished jobs beside a committing worker (setup {setup:.0f} s)",
           figures, "prune.json")
    return figures


if __name__ == "__main__":
    main()
