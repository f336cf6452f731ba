"""Processes for the ownership tests: ``python -m tests.proc_owner ACTION DB [ARG]``.

``hold``      run one job whose first step holds for ``WALSTATE_HOLD`` seconds (a long handler; with
              ``WALSTATE_WATCH_CANCEL`` it stops early when it sees ``step.cancelled``), with
              ``WALSTATE_LEASE``; the tests run it in another pid namespace or under another host name
              (``WALSTATE_HOSTNAME``), kill it, and recover its job from outside.
``fork-kill`` / ``fork-zombie``
              an Engine created before ``fork()``: the child runs the held job, the parent SIGKILLs it
              (and reaps it, or leaves it a zombie) and calls ``recover()``.
``fork-mid-write``
              fork while a thread of the parent is inside a write transaction: the child writes its own job.
``fork-siblings N run|recover``
              an Engine created before ``fork()``: two forked siblings run (or recover) the same N jobs at once.

Every execution of a handler appends one line ``TAG PID JOB STEP IDEMPOTENCY-KEY`` to
``WALSTATE_EFFECTS`` (an outside effect the tests count). Results go to stdout as one JSON line.
"""

from __future__ import annotations

import os
import socket
import sys

if __name__ == "__main__" and os.environ.get("WALSTATE_HOSTNAME"):
    # Before walstate is imported: it reads this process's identity once, at import.
    socket.sethostname(os.environ["WALSTATE_HOSTNAME"])

import json  # noqa: E402
import signal  # noqa: E402
from walstate.testing import connect  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from pydantic import BaseModel  # noqa: E402

from walstate import Engine, StepContext, Workflow  # noqa: E402


class Ctx(BaseModel):
    held: int = 0


flow = Workflow("owned", context=Ctx, phases=["hold", "after"])
#: How long the ``held`` handler takes in this process (a forked child sets its own).
HOLD = float(os.environ.get("WALSTATE_HOLD", "0"))


def effect(step: StepContext, tag: str) -> None:
    """One outside effect: one line, appended in one write (atomic between processes)."""
    fd = os.open(os.environ["WALSTATE_EFFECTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{tag} {os.getpid()} {step.job_id} {step.step} {step.idempotency_key}\n".encode())
    finally:
        os.close(fd)


@flow.step(phase="hold", name="held")
def held(ctx: Ctx, step: StepContext) -> dict[str, Any]:
    effect(step, "start")
    if os.environ.get("WALSTATE_WATCH_CANCEL"):
        # A handler that stops when told: up to HOLD seconds, or until step.cancelled.
        if step.cancelled.wait(HOLD):
            effect(step, "cancelled")
    else:
        time.sleep(HOLD)  # the handler's own work, however long it takes
    effect(step, "end")
    return {"held": ctx.held + 1}


@flow.step(phase="after", name="after")
def after(ctx: Ctx, step: StepContext) -> None:
    effect(step, "run")


txflow = Workflow("txheld", context=Ctx, phases=["hold"])


@txflow.step(phase="hold", name="inside", transactional=True)
def inside(ctx: Ctx, step: StepContext) -> None:
    # Runs inside the transaction that records its completion: it holds the write lock meanwhile.
    effect(step, "start")
    time.sleep(0.5)


def effects(path: str) -> list[list[str]]:
    """The effect lines written so far, split into fields."""
    p = Path(path)
    return [line.split() for line in p.read_text().splitlines()] if p.exists() else []


def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g}s for {what}")
        time.sleep(0.005)


def proc_state(pid: int) -> str:
    """The state letter of a process ('Z' for a zombie), or '' when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def hold(path: str) -> dict[str, Any]:
    engine = Engine(path, workers=1, lease=float(os.environ.get("WALSTATE_LEASE", "60")))
    engine.register(flow)
    job = engine.submit("owned", Ctx(), key="held")
    try:
        state = engine.run(job).state
    except Exception as exc:  # the test reads what reached this caller
        state = type(exc).__name__
    owner = engine.owner
    engine.close()
    return {"job": job, "state": state, "owner": owner}


def fork_kill(path: str, reap: bool) -> dict[str, Any]:
    """A child forked from an Engine's process is SIGKILLed mid-step; the parent recovers its job."""
    global HOLD
    engine = Engine(path, workers=1, lease=60)
    engine.register(flow)
    job = engine.submit("owned", Ctx(), key="held")
    child = os.fork()
    if child == 0:
        try:
            HOLD = 120.0
            engine.run(job)
        finally:
            os._exit(0)
    wait_for(lambda: any(e[:2] == ["start", str(child)] for e in effects(os.environ["WALSTATE_EFFECTS"])),
             "the child to start the held step")
    conn = connect(path)
    stored_owner = conn.execute("SELECT owner FROM walstate_job WHERE id=?", (job,)).fetchone()[0]
    conn.close()
    os.kill(child, signal.SIGKILL)
    if reap:
        os.waitpid(child, 0)
    else:
        wait_for(lambda: proc_state(child) == "Z", "the killed child to become a zombie")
    child_state = proc_state(child)
    report = engine.recover()
    result = {"job": job, "child": child, "parent": os.getpid(), "parent_owner": engine.owner,
              "stored_owner": stored_owner, "child_state_at_recover": child_state, "recovered": list(report),
              "skipped": getattr(report, "skipped", {}), "state": engine.status(job).state}
    if not reap:
        os.waitpid(child, 0)
    engine.close()
    return result


def fork_siblings(path: str, n: int, mode: str) -> dict[str, Any]:
    """Two children forked from one Engine's process run (``mode="run"``) or recover the same jobs at once."""
    global HOLD
    results = os.environ["WALSTATE_EFFECTS"] + ".siblings"
    # A flag file beside the effects log (the database may be a URL, not a file).
    go = Path(os.environ["WALSTATE_EFFECTS"] + ".go")
    engine = Engine(path, workers=2, lease=60)
    engine.register(flow)
    jobs = [engine.submit("owned", Ctx(), key=f"sibling-{i}") for i in range(n)]
    children = []
    for _ in range(2):
        child = os.fork()
        if child == 0:
            status = 1
            try:
                HOLD = 0.02
                wait_for(go.exists, "the go file")
                errors = []
                if mode == "run":
                    for job in jobs:
                        try:
                            engine.run(job)
                        except Exception as exc:
                            errors.append(type(exc).__name__)
                # Then (or only) recover, until every job is finished by one sibling or the other.
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        report = engine.recover()
                    except Exception as exc:
                        errors.append(type(exc).__name__)
                    else:
                        errors.extend(reason.split(":")[0] for reason in report.skipped.values())
                    if all(engine.status(job).state == "succeeded" for job in jobs):
                        break
                line = json.dumps({"pid": os.getpid(), "owner": engine.owner, "errors": errors})
                fd = os.open(results, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                os.write(fd, (line + "\n").encode())
                os.close(fd)
                status = 0
            finally:
                os._exit(status)
        children.append(child)
    go.touch()
    codes = [os.waitstatus_to_exitcode(os.waitpid(c, 0)[1]) for c in children]
    siblings = [json.loads(line) for line in Path(results).read_text().splitlines()]
    states = {job: engine.status(job).state for job in jobs}
    result = {"jobs": jobs, "parent_owner": engine.owner, "codes": codes, "siblings": siblings, "states": states}
    engine.close()
    return result


def fork_mid_write(path: str) -> dict[str, Any]:
    """Fork while a thread of the parent is inside a write transaction; the child must still write."""
    global HOLD
    results = os.environ["WALSTATE_EFFECTS"] + ".child"
    engine = Engine(path, workers=1, lease=60)
    engine.register(flow)
    engine.register(txflow)
    job = engine.submit("txheld", Ctx(), key="tx")
    runner = threading.Thread(target=engine.run, args=(job,))
    runner.start()
    wait_for(lambda: any(e[0] == "start" and e[3] == "inside" for e in effects(os.environ["WALSTATE_EFFECTS"])),
             "the transactional step to start")
    child = os.fork()
    if child == 0:
        status = 1
        try:
            HOLD = 0.0
            own = engine.submit("owned", Ctx(), key="child")
            state = engine.run(own).state
            Path(results).write_text(json.dumps({"owner": engine.owner, "job": own, "state": state}))
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    runner.join()
    # A child that hangs is killed and reported, so that the test fails instead of hanging too.
    deadline = time.monotonic() + 30
    code: int | None = None
    while code is None and time.monotonic() < deadline:
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
        else:
            time.sleep(0.01)
    if code is None:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    child_result = json.loads(Path(results).read_text()) if Path(results).exists() else None
    result = {"job": job, "state": engine.status(job).state, "hung": code is None, "code": code,
              "child": child_result, "parent_owner": engine.owner}
    engine.close()
    return result


def main(action: str, path: str, *args: str) -> int:
    if action == "hold":
        result = hold(path)
    elif action in ("fork-kill", "fork-zombie"):
        result = fork_kill(path, reap=action == "fork-kill")
    elif action == "fork-siblings":
        result = fork_siblings(path, int(args[0]), args[1])
    elif action == "fork-mid-write":
        result = fork_mid_write(path)
    else:
        raise SystemExit(f"unknown action {action!r}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
