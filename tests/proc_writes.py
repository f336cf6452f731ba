"""Processes for the busy-write tests: ``python -m tests.proc_writes ACTION TARGET ...``.

``hold TARGET SECONDS READY``
    hold the database's writer for SECONDS, then roll back: on SQLite a ``BEGIN IMMEDIATE``
    (the file's one write lock); on PostgreSQL a transaction that locks walstate's tables
    ``IN EXCLUSIVE MODE`` (reads go on, every write waits). READY is created once it holds.
``txhold TARGET SECONDS READY``
    run one job whose one step is ``transactional=True`` and holds its transaction (the file's
    writer, on SQLite) for SECONDS; READY is created from inside the handler.
``stale TARGET JOB``
    run job JOB of :data:`charging` with ``lease=1``, its handler waiting for the file
    ``$WALSTATE_EFFECTS.go`` before its ``once()`` (the test SIGSTOPs this process meanwhile).

Outside effects are lines appended to ``$WALSTATE_EFFECTS`` (``TAG PID JOB``). The last line of
stdout is a JSON result.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from walstate import Engine, StepContext, Workflow
from walstate.storage.postgres import is_postgres_url


class Ctx(BaseModel):
    n: int = 0


def effect(tag: str, job: int) -> None:
    """One outside effect: one line, appended in one write (atomic between processes)."""
    fd = os.open(os.environ["WALSTATE_EFFECTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{tag} {os.getpid()} {job}\n".encode())
    finally:
        os.close(fd)


def wait_file(path: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g}s for {path}")
        time.sleep(0.005)


TABLES = "walstate_job, walstate_step, walstate_journal, walstate_once, walstate_message"


def hold(target: str, seconds: float, ready: str) -> dict[str, Any]:
    if is_postgres_url(target):
        import psycopg

        conn: Any = psycopg.connect(target, autocommit=True)
        conn.execute("BEGIN")
        conn.execute(f"LOCK TABLE {TABLES} IN EXCLUSIVE MODE")  # constant names, no data
    else:
        import sqlite3

        conn = sqlite3.connect(target, isolation_level=None, timeout=60)
        conn.execute("BEGIN IMMEDIATE")
    Path(ready).touch()
    time.sleep(seconds)
    conn.execute("ROLLBACK")
    conn.close()
    return {"held": seconds}


txflow = Workflow("txhold", context=Ctx, phases=["p"])
HOLD = {"seconds": 0.0, "ready": ""}


@txflow.step(phase="p", name="inside", transactional=True)
def inside(ctx: Ctx, step: StepContext) -> None:
    step.execute("SELECT 1")
    Path(HOLD["ready"]).touch()
    time.sleep(HOLD["seconds"])  # inside the transaction that records this step's completion


def txhold(target: str, seconds: float, ready: str) -> dict[str, Any]:
    HOLD.update(seconds=seconds, ready=ready)
    with Engine(target, busy_timeout=60) as engine:
        engine.register(txflow)
        state = engine.run(engine.submit(txflow, Ctx())).state
    return {"state": state}


charging = Workflow("charging", context=Ctx, phases=["p"])
#: Set in the tests' own process: its live run waits for it before its once().
PROCEED = threading.Event()


@charging.step(phase="p", name="charge")
def charge(ctx: Ctx, step: StepContext) -> dict[str, Any]:
    effect("start", step.job_id)
    if os.environ.get("WALSTATE_STALE") == "1":
        wait_file(os.environ["WALSTATE_EFFECTS"] + ".go")
    else:
        assert PROCEED.wait(120)

    def call() -> int:
        effect("charge", step.job_id)
        return os.getpid()

    return {"n": step.once("charge", call)}


def stale(target: str, job: int) -> dict[str, Any]:
    with Engine(target, lease=1.0) as engine:
        engine.register(charging)
        try:
            outcome = engine.run(job).state
        except Exception as exc:  # the test reads what reached this caller
            outcome = type(exc).__name__
    return {"outcome": outcome, "pid": os.getpid()}


def main(argv: list[str]) -> None:
    action, target = argv[0], argv[1]
    if action == "hold":
        result = hold(target, float(argv[2]), argv[3])
    elif action == "txhold":
        result = txhold(target, float(argv[2]), argv[3])
    elif action == "stale":
        result = stale(target, int(argv[2]))
    else:
        raise SystemExit(f"unknown action {action!r}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
