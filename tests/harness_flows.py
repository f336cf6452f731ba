"""Workflows the harness tests crash in child processes: importable by module, as processes=True requires."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from walstate import StepContext, Workflow


class Memo(BaseModel):
    total: int = 0


#: What `compute` leaves for `use`: in this process's memory only (the bug under test).
_cache: dict[str, int] = {}

memory_flow = Workflow("memory", context=Memo, phases=["compute", "use"])


@memory_flow.step(phase="compute")
def compute(ctx: Memo, step: StepContext) -> None:
    _cache["value"] = 41


@memory_flow.step(phase="use")
def use(ctx: Memo, step: StepContext) -> dict[str, Any]:
    return {"total": _cache.get("value", 0) + 1}


stored_flow = Workflow("stored", context=Memo, phases=["compute", "use"])


@stored_flow.step(phase="compute")
def compute_stored(ctx: Memo, step: StepContext) -> dict[str, Any]:
    return {"total": 41}


@stored_flow.step(phase="use")
def use_stored(ctx: Memo, step: StepContext) -> dict[str, Any]:
    return {"total": ctx.total + 1}


class Paid(BaseModel):
    charge: str = ""


#: Correct waiting workflows: one step whose only line is a wait.
paid_flow = Workflow("paid", context=Paid, phases=["wait"])


@paid_flow.step(phase="wait")
def wait_paid(ctx: Paid, step: StepContext) -> dict[str, Any]:
    return {"charge": step.wait_for("paid")["id"]}


nap_flow = Workflow("nap", context=Paid, phases=["nap"])


@nap_flow.step(phase="nap")
def nap(ctx: Paid, step: StepContext) -> None:
    step.sleep(30)


#: The bug under test: after its wait, a row written outside the step's transaction (a crash repeats it).
paid_insert_flow = Workflow("paid_insert", context=Paid, phases=["wait"])


@paid_insert_flow.step(phase="wait")
def wait_then_insert(ctx: Paid, step: StepContext) -> None:
    payment = step.wait_for("paid")
    step.execute("CREATE TABLE IF NOT EXISTS payments (charge TEXT)")
    step.execute("INSERT INTO payments VALUES (?)", (payment["id"],))
