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
from .storage.faults import Crash, Injector, install

from .engine import Engine
from .testing import _Ledger, _observing, load_flow


def main(argv: list[str]) -> int:
    args = json.loads(argv[0])
    flow = load_flow(args["flow"])
    with _observing(flow, _Ledger(args["ledger"])):
        if args["kill_at"]:
            point, nth = args["kill_at"]
            install(Injector(Crash(point, int(nth)), mode="kill"))
        engine = Engine(args["path"], workers=int(args["workers"]), sync_interval=None)
        try:
            engine.register(flow)
            job = engine.submit(flow, flow.context.model_validate_json(args["context"]), key="crash-test")
            try:
                engine.recover()
                if args["action"] == "run":
                    engine.run(job)
            except (JobFailed, JobCancelled):
                pass
        finally:
            engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
