"""Child process for the SIGKILL suite: run (or resume) a shape's job, dying at a planned fault point."""

from __future__ import annotations

import os
import sys

from walstate import Engine, JobFailed
from walstate.storage import faults

from .shapes import Effects, Shape, build


def main(path: str) -> int:
    shape = Shape.from_json(os.environ["WALSTATE_SHAPE"])
    flow = build(shape, Effects(os.environ["WALSTATE_EFFECTS"]), asynchronous=bool(os.environ.get("WALSTATE_ASYNC")))
    kill_at = os.environ.get("WALSTATE_KILL_AT")
    if kill_at:
        point, nth = kill_at.split(":")
        faults.install(faults.Injector(faults.Crash(point, int(nth)), mode="kill"))
    engine = Engine(path, workers=1)
    engine.register(flow)
    job = engine.submit("shape", flow.context(), key="crash-test")
    try:
        engine.recover()
        engine.run(job)
    except JobFailed:
        pass
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
