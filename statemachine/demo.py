"""``walstate demo``: the seed's restaurant registration job, killed mid-phase and resumed.

A child process runs the job; the parent SIGKILLs it in the middle of phase 2
(when some sub-steps of that phase have finished and others are running),
resumes it in a fresh process, and prints what happened to every sub-step,
read from the database: final state, attempts, how often its effect ran, and
what a design that writes only at phase boundaries would have lost at the
moment of the kill.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
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


def main(path: str) -> int:
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    print(f"walstate demo: the seed's registration job on {path}", flush=True)
    child = _spawn("run", path)
    at_kill = _kill_mid_phase_two(path, child)
    if at_kill is None:
        print("the job finished before it could be killed mid-phase 2; nothing to show (run again)")
        return 1
    print(f"SIGKILLed the worker (pid {child.pid}) in the middle of phase 'configure'; resuming in a new process")
    resumed = _spawn("resume", path)
    if resumed.wait() != 0:
        print("the resuming process failed")
        return 1
    return _print_report(path, at_kill)


def _print_report(path: str, at_kill: dict[str, tuple[str, str, int]]) -> int:
    with engine(path) as e:
        job_id = e.store.read.jobs(workflow="registration", limit=1)[0].id
        status = e.status(job_id)
        interrupted = {r.step for r in e.history(job_id) if r.note == "interrupted"}
    conn = sqlite3.connect(path)
    effects = dict(conn.execute("SELECT step, count(*) FROM demo_effects GROUP BY step").fetchall())
    menu_rows = conn.execute("SELECT count(*) FROM demo_menu").fetchone()[0]
    conn.close()
    print(f"\njob {job_id}: {status.state}\n")
    header = f"{'sub-step':<23}{'phase':<10}{'at kill':<11}{'final':<10}{'attempts':>8}{'effect ran':>11}  phase-boundary design would have lost"
    print(header)
    print("-" * len(header))
    for name, s in status.steps.items():
        phase, state_at_kill, _ = at_kill[name]
        if phase == "setup":
            lost = "context it produced (context was never persisted)"
        elif phase == "configure" and state_at_kill == "succeeded":
            lost = "its completion: would run again"
        elif phase == "configure" and state_at_kill in ("running", "retrying"):
            lost = "that it had started (its attempt)" + (", cut short by the kill" if name in interrupted else "")
        else:
            lost = "-"
        print(f"{name:<23}{phase:<10}{state_at_kill:<11}{s.state:<10}{s.attempts:>8}{effects.get(name, 0):>11}  {lost}")
    print(f"\ncontext restored from the database: {status.context.model_dump()}")
    print(f"menu rows written by the transactional step: {menu_rows} (exactly once)")
    print("'effect ran' counts attempts whose outside work completed: a failed attempt (servicesConfig's simulated")
    print("timeout) or a kill between the work and its commit runs it again; paymentConfig calls its provider")
    print("through step.once() and menuImport is transactional, so neither can run twice.")
    return 0 if status.state == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2]))
