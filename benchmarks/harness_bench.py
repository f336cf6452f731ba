"""The crash-test harness: 200 examples of the 8-step registration workflow in the quick profile.

Target (issue 18): under 15 s on a 2-core machine. Reported as examples/s,
with the ratio of a crash-free run of the same number of jobs (one fresh file
each, as the harness uses) to it: what crash-testing costs per job.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from hypothesis import settings
from pydantic import BaseModel

from walstate import StepContext, Workflow
from walstate.storage import Store
from walstate.testing import DATABASE_ID, crash_test, run_with_crashes

from .common import Figure, measure, report

EXAMPLES = 200


class Onboarding(BaseModel):
    tenant: str
    code_paths: list[str] = []
    user_id: str | None = None
    restaurant_id: str | None = None
    website_url: str | None = None
    payment_account: str | None = None
    menu_items: int = 0
    healthy: bool = False
    notified: bool = False


def registration() -> Workflow[Onboarding]:
    """The demo's registration workflow (statemachine/demo.py) in 8 steps, without its simulated latency."""
    flow = Workflow("registration", context=Onboarding, phases=["setup", "configure", "verify", "launch"])

    @flow.step(phase="setup")
    def codeGeneration(ctx: Onboarding, step: StepContext) -> dict[str, Any]:
        return {"code_paths": [f"sites/{ctx.tenant}/index.html"]}

    @flow.step(phase="setup")
    def createOnboardingUser(ctx: Onboarding, step: StepContext) -> dict[str, Any]:
        return {"user_id": step.once("create_user", lambda: f"user-{ctx.tenant}")}

    @flow.step(phase="configure")
    def restaurantRegistration(ctx: Onboarding, step: StepContext) -> dict[str, Any]:
        return {"restaurant_id": f"rest-{step.idempotency_key}"}

    @flow.step(phase="configure", when=lambda ctx: bool(ctx.code_paths))
    def websiteConfig(ctx: Onboarding, step: StepContext) -> dict[str, Any]:
        return {"website_url": f"https://{ctx.tenant}.example/"}

    @flow.step(phase="configure")
    def paymentConfig(ctx: Onboarding, step: StepContext) -> dict[str, Any]:
        return {"payment_account": step.once("create_account", lambda: f"acct-{ctx.tenant}")}

    @flow.step(phase="configure", after=["restaurantRegistration"], transactional=True)
    def menuImport(ctx: Onboarding, step: StepContext) -> dict[str, Any]:
        step.execute("CREATE TABLE IF NOT EXISTS menu (tenant TEXT, item TEXT)")
        for item in ("margherita", "marinara", "quattro formaggi"):
            step.execute("INSERT INTO menu VALUES (?, ?)", (ctx.tenant, item))
        return {"menu_items": 3}

    @flow.step(phase="verify")
    def healthCheck(ctx: Onboarding, step: StepContext) -> dict[str, Any]:
        return {"healthy": bool(ctx.website_url and ctx.payment_account and ctx.menu_items)}

    @flow.step(phase="launch")
    def notifyOwner(ctx: Onboarding, step: StepContext) -> dict[str, Any]:
        return {"notified": True}

    return flow


settings.register_profile("quick", max_examples=EXAMPLES, deadline=None)


def crash_tested() -> float:
    """Examples per second of crash_test (crash and race plans) in the quick profile."""
    settings.load_profile("quick")
    d = tempfile.mkdtemp(prefix="walstate-bench-harness-")
    try:
        t = time.perf_counter()
        # No "cancel" race: a cancel cut short by a crash lets the resumed run go on with later phases
        # (a runner bug the harness found, pinned by an xfail test in tests/test_harness.py).
        done = crash_test(registration(), Onboarding(tenant="t1"), d, races=("run", "recover", "retry"))
        elapsed = time.perf_counter() - t
        assert done.examples == EXAMPLES, done
        return EXAMPLES / elapsed
    finally:
        shutil.rmtree(d, ignore_errors=True)


def crash_free() -> float:
    """Jobs per second: the same workflow, one job per fresh file, no faults."""
    flow = registration()
    d = Path(tempfile.mkdtemp(prefix="walstate-bench-free-"))
    try:
        template = str(d / "template.db")
        Store(template, database_id=DATABASE_ID, sync_interval=None).close()
        t = time.perf_counter()
        for i in range(EXAMPLES):
            # A copy of one fresh file per job, as the harness makes them.
            run_with_crashes(flow, Onboarding(tenant="t1"), str(d / f"{i}.db"), template=template)
        return EXAMPLES / (time.perf_counter() - t)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> list[Figure]:
    base, base_spread = measure(crash_free, reps=3)
    rate, spread = measure(crash_tested, reps=3)
    figures = [
        Figure("crash-free jobs (8 steps, a file each)", base, base_spread, "jobs/s"),
        Figure(f"crash_test, {EXAMPLES} examples (quick profile)", rate, spread, "examples/s",
               baseline="crash-free jobs", ratio=rate / base,
               target=f"{EXAMPLES} examples < 15 s: >= {EXAMPLES / 15:.1f} examples/s"),
    ]
    report("Crash-test harness: examples per second", figures, "harness.json")
    print(f"\n{EXAMPLES} examples took {EXAMPLES / rate:.1f} s (target < 15 s)")
    return figures


if __name__ == "__main__":
    main()
