"""One process of the ownership load test: ``python -m tests.proc_load DB SLOT JOBS_PER_THREAD``.

8 threads share one Engine; thread ``t`` submits the jobs keyed ``SLOT-t-i`` one after the other
(submitting is idempotent, so a restarted process redoes its list and only finds its jobs), runs each,
and calls ``recover()`` every 0.3 s. Every exception that reaches a caller (and every job a
``recover()`` skipped) is appended to ``WALSTATE_ERRORS`` as ``PID WHERE TYPE``; every outside effect
to ``WALSTATE_EFFECTS`` as ``JOB STEP PID IDEMPOTENCY-KEY``, each in one append.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from typing import Any

from pydantic import BaseModel

from walstate import Engine, StepContext, Workflow

THREADS = 8
RECOVER_EVERY = 0.3


class Ctx(BaseModel):
    n: int = 0
    tx: int = 0


flow = Workflow("load", context=Ctx, phases=["one", "two"])


def append(env: str, line: str) -> None:
    fd = os.open(os.environ[env], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def outside(step: StepContext) -> None:
    """An outside call: a little work, then one line naming the job, the step and this process."""
    time.sleep(random.uniform(0, 0.02))
    append("WALSTATE_EFFECTS", f"{step.job_id} {step.step} {os.getpid()} {step.idempotency_key}")


for name in ("p0", "p1", "p2"):
    @flow.step(phase="one", name=name)
    def parallel(ctx: Ctx, step: StepContext) -> dict[str, Any]:
        outside(step)
        return {"n": 1}


@flow.step(phase="two", name="tx", transactional=True)
def tx(ctx: Ctx, step: StepContext) -> dict[str, Any]:
    time.sleep(random.uniform(0, 0.005))
    step.execute("INSERT INTO app_rows (job_id, step, pid) VALUES (?, ?, ?)",
                        (step.job_id, step.step, os.getpid()))
    return {"tx": 1}


@flow.step(phase="two", name="q0")
def q0(ctx: Ctx, step: StepContext) -> None:
    outside(step)


def record(where: str, what: str) -> None:
    append("WALSTATE_ERRORS", f"{os.getpid()} {where} {what}")


def worker(engine: Engine, slot: int, thread: int, jobs: int) -> None:
    next_recover = time.monotonic() + RECOVER_EVERY * random.random()
    for i in range(jobs):
        try:
            job = engine.submit("load", Ctx(), key=f"{slot}-{thread}-{i}")
        except Exception as exc:
            record("submit", type(exc).__name__)
            continue
        try:
            engine.run(job)
        except Exception as exc:
            record("run", type(exc).__name__)
        if time.monotonic() >= next_recover:
            try:
                report = engine.recover()
            except Exception as exc:
                record("recover", type(exc).__name__)
            else:
                for reason in report.skipped.values():
                    record("recover-skipped", reason.split(":")[0])
            next_recover = time.monotonic() + RECOVER_EVERY


def main(path: str, slot: str, jobs: str) -> int:
    engine = Engine(path, workers=2)
    engine.register(flow)
    threads = [threading.Thread(target=worker, args=(engine, int(slot), t, int(jobs))) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
