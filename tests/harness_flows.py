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
