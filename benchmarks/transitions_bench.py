"""Persisted sub-step transitions per second: walstate vs the raw sqlite3 floor, same run.

Both sides do the same work per change: a CAS ``UPDATE … WHERE id=? AND
state=?`` plus one journal INSERT in its own ``BEGIN IMMEDIATE`` transaction,
on walstate's own tables, in WAL mode. walstate adds the state machine, the
owner fencing and the error handling around it.
"""

from __future__ import annotations

import sqlite3
import time

from walstate.storage import Store
from walstate.substep import LiveJob, SubStep

from .common import Figure, fresh_path, measure, rate, report

N = 4000


def raw_floor(durability: str) -> float:
    path = fresh_path("raw")
    Store(path).close()  # same schema, made by walstate
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={durability.upper()}")
    conn.execute("INSERT INTO walstate_job (id, workflow, state, context, initial_context, created_at, updated_at) "
                 "VALUES (1, 'b', 'running', '{}', '{}', 0, 0)")
    conn.execute("INSERT INTO walstate_step (id, job_id, name, phase, position, state, attempt, updated_at) "
                 "VALUES (1, 1, 's', 'p', 0, 'retrying', 0, 0)")
    moves = [("retrying", "running"), ("running", "retrying")]

    def work() -> None:
        for i in range(N):
            src, dst = moves[i % 2]
            conn.execute("BEGIN IMMEDIATE")
            cur = conn.execute("UPDATE walstate_step SET state=?, attempt=?, updated_at=? WHERE id=? AND state=?",
                               (dst, i, time.time(), 1, src))
            assert cur.rowcount == 1
            conn.execute("INSERT INTO walstate_journal (job_id, step, from_state, to_state, attempt, at) "
                         "VALUES (?, ?, ?, ?, ?, ?)", (1, "s", src, dst, i, time.time()))
            conn.execute("COMMIT")

    result = rate(N, work)
    conn.close()
    return result


def library(durability: str) -> float:
    store = Store(fresh_path("lib"), durability=durability)  # type: ignore[arg-type]
    job_id, _ = store.write.create_job("b", None, "{}", [("s", "p", 0)])
    step = SubStep(LiveJob(job_id, "b", "running", None, store.write), store.read.steps(job_id)[0])
    step.start()

    def work() -> None:
        for _ in range(N // 2):
            step.retry(error="e")
            step.start()

    result = rate(N, work)
    store.close()
    return result


def main() -> list[Figure]:
    figures = []
    for durability in ("normal", "full"):
        floor, fs = measure(lambda: raw_floor(durability))
        lib, ls = measure(lambda: library(durability))
        target = ">= 0.6x" if durability == "normal" else ""
        figures.append(Figure(f"raw sqlite3 floor, {durability}", floor, fs, "changes/s"))
        figures.append(Figure(f"walstate transitions, 1 thread, {durability}", lib, ls, "changes/s",
                              f"raw floor, {durability}", lib / floor, target))
    report("Persisted transitions per second (one commit per change)", figures, "transitions.json")
    return figures


if __name__ == "__main__":
    main()
