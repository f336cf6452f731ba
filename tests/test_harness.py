"""The public harness: applications crash-test their own workflows from pytest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from walstate import StepContext, Workflow
from walstate.testing import crash_test


class Order(BaseModel):
    charged: str | None = None
    emailed: bool = False


def test_crash_test_runs_plans_and_names_handlers_whose_effects_repeat(tmp_path: Path) -> None:
    flow = Workflow("order", context=Order, phases=["pay", "notify"])
    charges: list[str] = []

    @flow.step(phase="pay")
    def charge(ctx: Order, step: StepContext) -> dict[str, Any]:
        charges.append(step.idempotency_key)  # an outside call, not idempotent on its own
        return {"charged": "ch_1"}

    @flow.step(phase="notify")
    def email(ctx: Order, step: StepContext) -> dict[str, Any]:
        step.once("send", lambda: "sent")
        return {"emailed": True}

    report = crash_test(flow, Order(), tmp_path, max_examples=60)
    assert report.examples == 60 and report.crashes > 0
    # A crash between charge's call and its commit re-runs it: the report says so.
    assert report.repeated_effects.get("charge", 0) >= 2
