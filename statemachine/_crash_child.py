"""A child process of the crash-test harness (``python -m walstate._crash_child ARGS_JSON``).

It imports the workflow by ``"module:attr"``, wraps its handlers to note
their attempts in the parent's ledger file, arms a SIGKILL at the planned
fault point, then submits the job (a no-op after the first child: same key)
and runs it, or only recovers. See :func:`walstate.testing.crash_test`.
"""

from __future__ import annotations

import json
import sys

from .storage.errors import JobCancelled, JobFailed
from .storage.types import TERMINAL_JOB_STATES
from .storage.faults import Crash, Injector, install

from .engine import Engine
from .testing import _Clock, _drive_waits, _Ledger, _observing, load_flow

#: A job that still waits after this many rounds of sending its messages and moving the clock
#: waits for something the harness was not given (the parent then reports it as not terminal).
ROUNDS = 100


def main(argv: list[str]) -> int:
    args = json.loads(argv[0])
    flow = load_flow(args["flow"])
    with _observing(flow, _Ledger(args["ledger"])):
        if args["kill_at"]:
            point, nth = args["kill_at"]
            install(Injector(Crash(point, int(nth)), mode="kill"))
        clock = _Clock()
        messages = args.get("messages") or {}
        engine = Engine(args["path"], workers=int(args["workers"]), sync_interval=None, clock=clock)
        try:
            engine.register(flow)
            job = engine.submit(flow, flow.context.model_validate_json(args["context"]), key="crash-test")
            for _ in range(ROUNDS):
                try:
                    engine.recover()
                    if args["action"] == "run" and engine.status(job).state not in TERMINAL_JOB_STATES:
                        engine.run(job)
                except (JobFailed, JobCancelled):
                    pass
                # A parked job: send what its steps wait for, move the clock past its sleeps, and go on
                # (as the in-process harness does), so that the last child ends it.
                if args["action"] != "run" or engine.status(job).state in TERMINAL_JOB_STATES:
                    break
                if not _drive_waits(engine, job, messages, clock):
                    break
        finally:
            engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
