"""An app for the SIGTERM tests: `--app tests.busy_app:make_engine`; its step keeps the GIL busy.

A worker whose threads run Python code makes its main thread wait for the GIL
right after each wake-up, while it holds the lock of the Event it waited on:
the moment in which a signal handler that takes that lock deadlocks.
"""

from __future__ import annotations

import time

from pydantic import BaseModel

from walstate import Engine, StepContext, Workflow


class Spin(BaseModel):
    seconds: float = 3.0


flow = Workflow("spin", context=Spin, phases=["p"])


@flow.step(phase="p")
def spin(ctx: Spin, step: StepContext) -> None:
    end = time.monotonic() + ctx.seconds
    n = 0
    while time.monotonic() < end and not step.cancelled.is_set():
        n += sum(range(1000))  # pure Python: holds the GIL between switches


def make_engine(path: str) -> Engine:
    engine = Engine(path, workers=2)
    engine.register(flow)
    return engine
