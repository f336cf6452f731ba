"""The app and the processes of the runtime tests (``tests/test_runtime_processes.py``).

As an app: ``walstate worker DB --app tests.proc_runtime:make_engine`` runs a worker with every
workflow below registered. As a script, ``python -m tests.proc_runtime ACTION DB [ARGS]``:

``submit DB SLOT N``  submit the ``load`` jobs keyed ``SLOT-0`` .. ``SLOT-(N-1)`` (no run), recording
                      every exception that reaches this caller to ``WALSTATE_ERRORS`` as
                      ``PID submit TYPE``.
``run DB``            submit one ``slow`` job and run it with ``engine.run`` in this process (the
                      tests SIGKILL it mid-step).

Every handler execution appends one line ``TAG PID JOB STEP TIME`` to ``WALSTATE_EFFECTS`` (an
outside effect the tests count), in one ``write`` (atomic between processes); the ``capped``
workflow writes its enter and exit times to a file per process in ``WALSTATE_TIMES`` instead.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from typing import Any

from pydantic import BaseModel

from walstate import Engine, StepContext, Workflow


class Ctx(BaseModel):
    n: int = 0
    tx: int = 0


def append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def effect(step: StepContext, tag: str) -> None:
    append(os.environ["WALSTATE_EFFECTS"], f"{tag} {os.getpid()} {step.job_id} {step.step} {time.time():.6f}")


# -- load: three parallel outside calls, then a transactional row and one more outside call ------

load = Workflow("load", context=Ctx, phases=["one", "two"])
LOAD_CALLS = ("p0", "p1", "p2", "q0")  # the steps with an outside call; "tx" inserts a row instead

for _name in ("p0", "p1", "p2"):
    @load.step(phase="one", name=_name)
    def parallel(ctx: Ctx, step: StepContext) -> dict[str, Any]:
        time.sleep(random.uniform(0, 0.02))  # the call's own latency
        effect(step, "call")
        return {"n": 1}


@load.step(phase="two", name="tx", transactional=True)
def tx(ctx: Ctx, step: StepContext) -> dict[str, Any]:
    step.execute("INSERT INTO app_rows (job_id, pid) VALUES (?, ?)", (step.job_id, os.getpid()))
    return {"tx": 1}


@load.step(phase="two", name="q0")
def q0(ctx: Ctx, step: StepContext) -> None:
    time.sleep(random.uniform(0, 0.02))
    effect(step, "call")


# -- slow: a long first step, then another -----------------------------------------------------

slow = Workflow("slow", context=Ctx, phases=["hold", "after"])


@slow.step(phase="hold", name="held")
def held(ctx: Ctx, step: StepContext) -> dict[str, Any]:
    effect(step, "start")
    time.sleep(float(os.environ.get("WALSTATE_HOLD", "0")))  # the handler's own work
    effect(step, "end")
    return {"n": ctx.n + 1}


@slow.step(phase="after", name="after")
def after(ctx: Ctx, step: StepContext) -> None:
    effect(step, "run")


# -- capped: at most two jobs of it at once, across processes -----------------------------------

capped = Workflow("capped", context=Ctx, phases=["only"], concurrency=2)


@capped.step(phase="only", name="work")
def work(ctx: Ctx, step: StepContext) -> None:
    times = os.path.join(os.environ["WALSTATE_TIMES"], f"{os.getpid()}.log")
    append(times, f"enter {time.time():.6f} {step.job_id}")
    time.sleep(float(os.environ.get("WALSTATE_CAPPED_SECONDS", "0.2")))
    append(times, f"exit {time.time():.6f} {step.job_id}")


# -- ping: records when it starts (wake-up latency) ---------------------------------------------

ping = Workflow("ping", context=Ctx, phases=["only"])


@ping.step(phase="only", name="started")
def started(ctx: Ctx, step: StepContext) -> None:
    effect(step, "started")


def make_engine(path: str) -> Engine:
    """The app's engine on ``path``, with every workflow of this module registered.

    Like an app, it sends walstate's warnings to stderr, where the tests look for what the
    worker loop met (a ``DatabaseBusy`` there is retried, never told to a caller, but still counted).
    """
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    # WALSTATE_LEASE: the multi-host load test's short lease, so that a killed "host"'s jobs
    # (judged by lease alone from another pid namespace) are taken over within seconds.
    # WALSTATE_CLOCK_SKEW: an app whose Engine is given a clock that many seconds off (a simulated host).
    skew = float(os.environ.get("WALSTATE_CLOCK_SKEW", "0"))
    clock = (lambda: time.time() + skew) if skew else time.time
    engine = Engine(path, workers=3, lease=float(os.environ.get("WALSTATE_LEASE", "60")), clock=clock)
    for flow in (load, slow, capped, ping):
        engine.register(flow)
    return engine


def submit(path: str, slot: str, n: str) -> int:
    engine = make_engine(path)
    for i in range(int(n)):
        try:
            engine.submit(load, Ctx(), key=f"{slot}-{i}")
        except Exception as exc:
            append(os.environ["WALSTATE_ERRORS"], f"{os.getpid()} submit {type(exc).__name__}")
        time.sleep(random.uniform(0, 0.01))  # pacing: submissions spread over the run, not waiting for anything
    engine.close()
    return 0


def run(path: str) -> int:
    engine = make_engine(path)
    engine.run(engine.submit(slow, Ctx(), key="run"))
    engine.close()
    return 0


if __name__ == "__main__":
    action, *rest = sys.argv[1:]
    sys.exit(submit(*rest) if action == "submit" else run(*rest))
