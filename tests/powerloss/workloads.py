"""Workloads for the power-loss harness, run in a child process under the shim.

Each workload writes to ``<dir>/jobs.db`` and, after each thing it has been
told is committed, writes one *acknowledgement* line to the ack file: a JSON
list naming a fact the database must hold from then on (which job, which
step, which state and attempt, which position in the job's journal). The
shim logs these writes in order with the file system calls, so the checker
knows exactly what had been acknowledged at every cut point.

walstate workloads use only the public API (``from walstate import ...``).
The ``raw-*`` workloads use ``sqlite3`` directly: they are the negative
controls (``synchronous=OFF``, an acknowledgement sent before COMMIT).

    python -m tests.powerloss.workloads NAME DIR ACKFILE DURABILITY SYNC_INTERVAL JOBS PACE

``PACE`` seconds pass between jobs (0: none), so that a run spans several
sync intervals the way a real application's commits spread over time.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import time
from typing import Any

from pydantic import BaseModel

from walstate import Engine, StepContext, Workflow

DB_NAME = "jobs.db"


class Acks:
    """Acknowledgements as JSON lines, one ``write`` each (the shim logs each as one event)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def __call__(self, *fact: Any) -> None:
        os.write(self.fd, json.dumps(list(fact)).encode() + b"\n")


class Counter(BaseModel):
    n: int = 0
    done: list[str] = []


_ack: Acks | None = None


def _ack_running(step: StepContext) -> None:
    # The handler runs only after its move to `running` was committed.
    assert _ack is not None
    _ack("step", step.job_id, step.step, "running", step.attempt)


# chain: three phases in a row, the middle one transactional (its row commits with its completion).
chain = Workflow("chain", context=Counter, phases=["a", "b", "c"])


@chain.step(phase="a")
def first(ctx: Counter, step: StepContext) -> dict[str, Any]:
    _ack_running(step)
    return {"n": ctx.n + 1}


@chain.step(phase="b", transactional=True)
def middle(ctx: Counter, step: StepContext) -> dict[str, Any]:
    _ack_running(step)
    step.db.execute_sql("CREATE TABLE IF NOT EXISTS effects (job INTEGER, step TEXT, UNIQUE (job, step))")
    step.db.execute_sql("INSERT INTO effects (job, step) VALUES (?, ?)", (step.job_id, step.step))
    return {"n": ctx.n + 1}


@chain.step(phase="c")
def last(ctx: Counter, step: StepContext) -> dict[str, Any]:
    _ack_running(step)
    return {"n": ctx.n + 1}


# fan: six parallel sub-steps then one, run by several threads at once (the group-commit path).
fan = Workflow("fan", context=Counter, phases=["wide", "join"])


def _fan_step(name: str) -> None:
    def handler(ctx: Counter, step: StepContext) -> dict[str, Any]:
        _ack_running(step)
        return {}
    handler.__name__ = name
    fan.step(phase="wide")(handler)


for _i in range(6):
    _fan_step(f"w{_i}")


@fan.step(phase="join")
def join(ctx: Counter, step: StepContext) -> dict[str, Any]:
    _ack_running(step)
    return {"n": 6}


FLOWS = {"chain": chain, "fan": fan}


_pace = 0.0


def _run_job(engine: Engine, flow: Workflow[Any], key: str) -> None:
    assert _ack is not None
    if _pace:
        time.sleep(_pace)  # the application's think time between jobs, not a wait for something
    job_id = engine.submit(flow.name, Counter(), key=key)
    _ack("job", job_id)
    engine.run(job_id)
    # run() returned: every change of the job is committed. Acknowledge each
    # journal row by its position in the job's journal, step, state and attempt.
    for n, rec in enumerate(engine.history(job_id), 1):
        _ack("journal", job_id, n, rec.step, rec.to_state, rec.attempt)
    if flow is chain:
        _ack("effect", job_id, "middle")


def run_walstate(name: str, path: str, durability: str, sync_interval: float | None, jobs: int) -> None:
    if name == "chain":
        with Engine(path, durability=durability, workers=1, sync_interval=sync_interval) as engine:  # type: ignore[arg-type]
            engine.register(chain)
            for i in range(jobs):
                _run_job(engine, chain, f"c{i}")
    elif name == "threads":
        with Engine(path, durability=durability, workers=4, sync_interval=sync_interval) as engine:  # type: ignore[arg-type]
            engine.register(fan)
            engine.register(chain)

            def worker(t: int) -> None:
                for i in range(jobs):
                    _run_job(engine, fan if (i + t) % 2 else chain, f"t{t}-{i}")

            threads = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
    else:
        raise SystemExit(f"unknown workload {name!r}")


def run_raw(name: str, path: str, jobs: int) -> None:
    """Negative controls on plain sqlite3: ``raw-off`` (synchronous=OFF) and ``raw-early`` (ack before COMMIT)."""
    assert _ack is not None
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute("PRAGMA synchronous=" + ("OFF" if name == "raw-off" else "FULL"))
    conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)")
    for i in range(1, jobs + 1):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (id, v) VALUES (?, ?)", (i, "x" * 200))
        if name == "raw-early":
            _ack("row", i)  # the bug this control plants: acknowledged before COMMIT
        conn.execute("COMMIT")
        if name != "raw-early":
            _ack("row", i)
    conn.close()


def main(argv: list[str]) -> None:
    global _ack, _pace
    name, directory, ackfile, durability, interval, jobs, pace = argv
    _ack = Acks(ackfile)
    _pace = float(pace)
    path = os.path.join(directory, DB_NAME)
    if name.startswith("raw-"):
        run_raw(name, path, int(jobs))
    else:
        run_walstate(name, path, durability, None if interval == "none" else float(interval), int(jobs))


if __name__ == "__main__":
    main(sys.argv[1:])
