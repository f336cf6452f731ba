"""The child of tests/test_pg_sessions.py: ``python -m tests.pg_stop_child URL JOB MARKER``.

Runs job ``JOB`` (of :data:`flow`) on the PostgreSQL database ``URL`` with a 1 s lease, and stops
itself with a real SIGSTOP inside the transaction that records its transactional step, after
walstate's compare-and-set locked the job's and the step's rows and before COMMIT (fault point
``before_commit``); ``MARKER`` gets its pid just before. It stays stopped until it is killed.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from pydantic import BaseModel

from walstate import Engine, StepContext, Workflow
from walstate.storage import faults

LEASE = 1.0


class Ctx(BaseModel):
    n: int = 0


flow = Workflow("pg_stopped", context=Ctx, phases=["only"])
_armed = threading.local()


@flow.step(phase="only", transactional=True)
def book(ctx: Ctx, step: StepContext) -> None:
    step.execute("INSERT INTO booked (job, pid) VALUES (?, ?)", (step.job_id, os.getpid()))
    _armed.on = True  # the commit that records this step, on this thread, stops the process


class StopInCommit(faults.Injector):
    """SIGSTOPs this process at the first ``before_commit`` after :func:`book` ran on the same thread."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def hit(self, name: str) -> None:
        if name == "before_commit" and getattr(_armed, "on", False):
            _armed.on = False
            with open(self.marker, "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)


def main() -> None:
    url, job, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    engine = Engine(url, workers=1, lease=LEASE)
    engine.register(flow)
    faults.install(StopInCommit(marker))
    engine.run(job)


if __name__ == "__main__":
    main()
