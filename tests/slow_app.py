"""Apps for `walstate worker --app`: one slow to load (``make_engine``), one whose step holds (``make_held``).

``WALSTATE_SLOW_APP=import`` (or ``factory``): that part touches the file named by
``WALSTATE_SLOW_APP_READY`` and then waits until the process is stopped.
"""

from __future__ import annotations

import os
import time

from pydantic import BaseModel

from walstate import Engine, StepContext, Workflow


def _hang() -> None:
    open(os.environ["WALSTATE_SLOW_APP_READY"], "w").close()
    while True:
        time.sleep(0.05)


if os.environ.get("WALSTATE_SLOW_APP") == "import":
    _hang()


def make_engine(path: str) -> Engine:
    if os.environ.get("WALSTATE_SLOW_APP") == "factory":
        _hang()
    return Engine(path)


class Ctx(BaseModel):
    n: int = 0


#: One step that holds until ``WALSTATE_HELD_GATE`` exists, or until its run is stopped (``step.cancelled``).
held = Workflow("held", context=Ctx, phases=["p"])


@held.step(phase="p")
def hold(ctx: Ctx, step: StepContext) -> None:
    open(os.environ["WALSTATE_HELD_ENTERED"], "a").close()
    gate = os.environ.get("WALSTATE_HELD_GATE", "")
    while not (gate and os.path.exists(gate)):
        if step.cancelled.wait(0.02):
            raise RuntimeError("stopped before it was done")


def make_held(path: str) -> Engine:
    engine = Engine(path)
    engine.register(held)
    return engine
