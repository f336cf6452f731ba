"""An application module for the CLI tests: `--app tests.cli_app:make_engine` (or `:flow`)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from pydantic import BaseModel

from walstate import Engine, JobFailed, StepContext, Workflow
from walstate.storage import faults


class Shop(BaseModel):
    name: str
    paid: bool = False
    shipped: bool = False


flow = Workflow("shop", context=Shop, phases=["pay", "ship"])


@flow.step(phase="pay")
def charge(ctx: Shop, step: StepContext) -> dict[str, Any]:
    if ctx.name == "broken" and not os.path.exists(os.environ.get("WALSTATE_CLI_FIXED", "/nonexistent")):
        raise ValueError("card declined")
    return {"paid": True}


@flow.step(phase="ship")
def ship(ctx: Shop, step: StepContext) -> dict[str, Any]:
    # A test that must see this step in flight holds it here until it has seen it (no race with the
    # machine's speed): the step returns once the named file exists.
    gate = os.environ.get("WALSTATE_CLI_SHIP_GATE")
    while gate and not os.path.exists(gate):
        time.sleep(0.01)
    return {"shipped": True}


def make_engine(path: str) -> Engine:
    engine = Engine(path, workers=2)
    engine.register(flow)
    return engine


if __name__ == "__main__":
    # python -m tests.cli_app DB NAME [KILL_AT]: run one job, optionally SIGKILLed at a fault point.
    path, name = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:
        point, nth = sys.argv[3].split(":")
        faults.install(faults.Injector(faults.Crash(point, int(nth)), mode="kill"))
    e = make_engine(path)
    try:
        e.run(e.submit("shop", Shop(name=name), key=name))
    except JobFailed:
        pass
    e.close()
