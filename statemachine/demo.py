"""``walstate demo``: the seed's restaurant registration job, killed mid-phase and resumed.

A child process runs the job; the parent SIGKILLs it in the middle of phase 2
(when some sub-steps of that phase have finished and others are running),
resumes it in a fresh process, and prints what happened to every sub-step,
read from the database: final state, attempts, how often its effect ran, and
what a design that writes only at phase boundaries would have lost at the
moment of the kill.

The demo never deletes or overwrites a file it did not make: it marks its
database with a table of its own (``walstate_demo``) and replaces an existing
file at ``--db`` only when that file carries the mark.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .context import StepContext
from .engine import Engine
from .workflow import Retry, Workflow


class Onboarding(BaseModel):
    tenant: str
    code_paths: list[str] = []
    user_id: str | None = None
    restaurant_id: str | None = None
    website_url: str | None = None
    services: list[str] = []
    payment_account: str | None = None
    menu_items: int = 0
    synced: bool = False
    healthy: bool = False
    notified: bool = False


flow = Workflow("registration", context=Onboarding, phases=["setup", "configure", "verify", "launch"])


def effect(step: StepContext, work: float) -> None:
    """Simulated outside work: takes ``work`` seconds and leaves a row that counts how often it ran.

    The row is written on a connection of its own and committed at once, like
    a call to another service: it is *not* part of walstate's transaction.
    """
    time.sleep(work)
    conn = sqlite3.connect(step.db.database, timeout=10)
    with conn:
        conn.execute("CREATE TABLE IF NOT EXISTS demo_effects (step TEXT, idempotency_key TEXT, at REAL)")
        conn.execute("INSERT INTO demo_effects VALUES (?, ?, ?)", (step.step, step.idempotency_key, time.time()))
    conn.close()


@flow.step(phase="setup")
def codeGeneration(ctx: Onboarding, step: StepContext) -> dict[str, Any]:
    effect(step, 0.15)
    return {"code_paths": [f"sites/{ctx.tenant}/index.html", f"sites/{ctx.tenant}/menu.html"]}


@flow.step(phase="setup")
def createOnboardingUser(ctx: Onboarding, step: StepContext) -> dict[str, Any]:
    effect(step, 0.1)
    return {"user_id": f"user-{ctx.tenant}"}


@flow.step(phase="configure")
def restaurantRegistration(ctx: Onboarding, step: StepContext) -> dict[str, Any]:
    effect(step, 0.1)
    return {"restaurant_id": f"rest-{ctx.tenant}"}


@flow.step(phase="configure", when=lambda ctx: bool(ctx.code_paths))
def websiteConfig(ctx: Onboarding, step: StepContext) -> dict[str, Any]:
    effect(step, 0.6)
    return {"website_url": f"https://{ctx.tenant}.example/{ctx.code_paths[0].split('/')[-1]}"}


@flow.step(phase="configure", retry=Retry(max_attempts=3, backoff=0.05))
def servicesConfig(ctx: Onboarding, step: StepContext) -> dict[str, Any]:
    effect(step, 0.2)
    if step.attempt == 1:
        raise TimeoutError("services API timed out (simulated, first attempt only)")
    return {"services": ["delivery", "pickup"]}


@flow.step(phase="configure")
def paymentConfig(ctx: Onboarding, step: StepContext) -> dict[str, Any]:
    # The payment provider is called through once(): a re-run returns the stored account.
    def create_account() -> str:
        effect(step, 0.5)
        return f"acct-{ctx.tenant}-{step.job_id}"

    account = step.once("create_account", create_account)
    return {"payment_account": account}


@flow.step(phase="configure", after=["restaurantRegistration"], transactional=True)
def menuImport(ctx: Onboarding, step: StepContext) -> dict[str, Any]:
    time.sleep(0.3)
    step.db.execute_sql("CREATE TABLE IF NOT EXISTS demo_menu (tenant TEXT, item TEXT)")
    items = ["margherita", "marinara", "quattro formaggi"]
    for item in items:
        step.db.execute_sql("INSERT INTO demo_menu VALUES (?, ?)", (ctx.tenant, item))
    # Inside walstate's transaction: these rows exist exactly once, whatever crashes.
    step.db.execute_sql("INSERT INTO demo_effects VALUES (?, ?, ?)", (step.step, step.idempotency_key, time.time()))
    return {"menu_items": len(items)}


@flow.step(phase="configure", after=["restaurantRegistration"])
def syncOnboardingUser(ctx: Onboarding, step: StepContext) -> dict[str, Any]:
    effect(step, 0.4)
    return {"synced": ctx.user_id is not None}


@flow.step(phase="verify")
def healthCheck(ctx: Onboarding, step: StepContext) -> dict[str, Any]:
    effect(step, 0.05)
    return {"healthy": bool(ctx.website_url and ctx.payment_account and ctx.menu_items)}


@flow.step(phase="launch")
def notifyOwner(ctx: Onboarding, step: StepContext) -> dict[str, Any]:
    effect(step, 0.05)
    return {"notified": True}


def engine(path: str) -> Engine:
    e = Engine(path, workers=3)
    e.register(flow)
    return e


def _child(action: str, path: str) -> int:
    with engine(path) as e:
        if action == "run":
            e.run(e.submit("registration", Onboarding(tenant="trattoria"), key="trattoria"))
        else:
            e.recover()
    return 0


def _spawn(action: str, path: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "walstate.demo", action, path])


def _snapshot(path: str) -> dict[str, tuple[str, str, int]]:
    if not os.path.exists(path):
        return {}  # the child has not created it yet
    conn = sqlite3.connect(path, timeout=10)
    try:
        rows = conn.execute("SELECT name, phase, state, attempt FROM walstate_step ORDER BY position").fetchall()
    except sqlite3.OperationalError:
        rows = []  # the child is still creating the schema
    finally:
        conn.close()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def _kill_mid_phase_two(path: str, child: subprocess.Popen[bytes]) -> dict[str, tuple[str, str, int]] | None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        snap = _snapshot(path)
        phase2 = [v for v in snap.values() if v[0] == "configure"]
        if sum(v[1] == "succeeded" for v in phase2) >= 2 and any(v[1] in ("running", "retrying") for v in phase2):
            child.send_signal(signal.SIGKILL)
            child.wait()
            return snap
        time.sleep(0.005)
    return None


WIDTH = 100  # every line the demo prints fits this many columns
_MARK = "made by walstate demo"
_SQLITE_HEADER = b"SQLite format 3\x00"


class NotOurs(Exception):
    """The file at --db is not a database this demo made: it must be left alone."""


def is_demo_database(path: str) -> bool:
    """Whether ``path`` is a SQLite file carrying the demo's mark, read without changing anything.

    Only a file that starts with SQLite's header is opened, and then with
    ``immutable=1``: no lock, no journal, no -wal/-shm files created. The mark
    is committed (rollback journal) before the file becomes a WAL database, so
    it is always in the main file.
    """
    try:
        with open(path, "rb") as f:
            if f.read(len(_SQLITE_HEADER)) != _SQLITE_HEADER:
                return False
        conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?immutable=1", uri=True)
    except (OSError, sqlite3.Error):
        return False
    try:
        row = conn.execute("SELECT mark FROM walstate_demo").fetchone()
    except sqlite3.Error:
        return False
    finally:
        conn.close()
    return row is not None and row[0] == _MARK


def claim_path(path: str) -> None:
    """Make ``path`` a fresh, marked, empty demo database, or raise NotOurs and touch nothing.

    A previous demo database (and its -wal/-shm files) is replaced; anything
    else at ``path``, or a stray -wal/-shm file beside it, is refused.
    """
    exists = os.path.lexists(path)
    if exists and not (os.path.isfile(path) and not os.path.islink(path) and is_demo_database(path)):
        raise NotOurs(f"{path} exists and was not made by `walstate demo`; refusing to overwrite it "
                      "(pass --db with a new file name)")
    if not exists:
        for suffix in ("-wal", "-shm"):
            if os.path.lexists(path + suffix):
                raise NotOurs(f"{path + suffix} exists without its database; refusing to touch it "
                              "(pass --db with a new file name)")
    else:
        for suffix in ("-wal", "-shm", ""):  # all three belong to the demo database just checked
            if os.path.lexists(path + suffix):
                os.remove(path + suffix)
    try:
        # O_EXCL: if anything appeared at path meanwhile, it is not ours either.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        raise NotOurs(f"{path} appeared while the demo was starting; refusing to overwrite it") from None
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE walstate_demo (mark TEXT NOT NULL, created_at REAL NOT NULL)")
        conn.execute("INSERT INTO walstate_demo VALUES (?, ?)", (_MARK, time.time()))
    conn.close()


def main(path: str) -> int:
    try:
        claim_path(path)
    except (NotOurs, OSError) as exc:
        print(f"walstate demo: error: {exc}", file=sys.stderr)
        return 1
    print(f"walstate demo: the seed's registration job on {path}", flush=True)
    child = _spawn("run", path)
    at_kill = _kill_mid_phase_two(path, child)
    if at_kill is None:
        print("the job finished before it could be killed mid-phase 2; nothing to show (run again)", file=sys.stderr)
        return 1
    print(f"SIGKILLed the worker (pid {child.pid}) in the middle of phase 'configure'; resuming in a new process")
    resumed = _spawn("resume", path)
    if resumed.wait() != 0:
        print("walstate demo: error: the resuming process failed", file=sys.stderr)
        return 1
    return _print_report(path, at_kill)


def _wrapped(text: str, indent: str = "  ") -> None:
    print(textwrap.fill(text, WIDTH, subsequent_indent=indent, break_on_hyphens=False))


def _print_report(path: str, at_kill: dict[str, tuple[str, str, int]]) -> int:
    with engine(path) as e:
        job_id = e.store.jobs(workflow="registration", limit=1)[0].id
        status = e.status(job_id)
        history = e.history(job_id)
    interrupted = [n for n in status.steps if any(r.step == n and r.note == "interrupted" for r in history)]
    retried = [n for n in status.steps
               if any(r.step == n and r.to_state == "retrying" and r.note != "interrupted" for r in history)]
    conn = sqlite3.connect(path)
    effects = dict(conn.execute("SELECT step, count(*) FROM demo_effects GROUP BY step").fetchall())
    menu_rows = conn.execute("SELECT count(*) FROM demo_menu").fetchone()[0]
    conn.close()
    print(f"\njob {job_id}: {status.state}\n")
    # 23 + 10 + 10 + 10 + 9 + 8 + 2 + 28 = 100 columns at most.
    print(f"{'sub-step':<23}{'phase':<10}{'at kill':<10}{'final':<10}{'attempts':>9}{'effect':>8}  "
          "lost if only phases saved")
    print("-" * WIDTH)
    for name, s in status.steps.items():
        phase, state_at_kill, _ = at_kill[name]
        if phase == "setup":
            lost = "the context it produced"
        elif phase == "configure" and state_at_kill == "succeeded":
            lost = "its completion: reruns"
        elif phase == "configure" and state_at_kill in ("running", "retrying"):
            lost = "its attempt" + (" (cut short)" if name in interrupted else "")
        else:
            lost = "-"
        print(f"{name:<23}{phase:<10}{state_at_kill:<10}{s.state:<10}{s.attempts:>9}{effects.get(name, 0):>8}  {lost}")
    print("\n'attempts' counts started attempts; 'effect' counts attempts whose outside work completed.")
    print("\nIn this run:")
    finished_before = [n for n, v in at_kill.items() if v[1] in ("succeeded", "skipped")]
    rerun = [n for n in finished_before if status.steps[n].attempts != at_kill[n][2]]
    _wrapped(f"- finished before the kill, not run again after it: "
             f"{', '.join(n for n in finished_before if n not in rerun) or 'none'}")
    if rerun:
        _wrapped(f"- finished before the kill but run again (a bug): {', '.join(rerun)}")
    _wrapped(f"- cut short by the kill, journalled as interrupted and run again: {', '.join(interrupted) or 'none'}")
    _wrapped(f"- retried after a failed attempt: {', '.join(retried) or 'none'}")
    repeated = [f"{n} ({effects[n]}x)" for n in status.steps if effects.get(n, 0) > 1]
    _wrapped(f"- outside work that completed more than once: {', '.join(repeated) or 'none'}")
    _wrapped(f"- paymentConfig's provider call, made through step.once(): completed "
             f"{effects.get('paymentConfig', 0)} time(s)")
    _wrapped(f"- menu rows written by the transactional step: {menu_rows} (it imports 3 items)")
    _wrapped(f"- context restored from the database: {status.context.model_dump()}")
    return 0 if status.state == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2]))
