"""Hypothesis-generated workflow shapes for the crash suites, and a builder turning one into a Workflow."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from hypothesis import strategies as st
from pydantic import BaseModel, create_model

from walstate import Retry, StepContext, Workflow
from walstate.aio import AsyncStepContext


@dataclass(frozen=True)
class StepShape:
    name: str
    phase: int
    after: tuple[str, ...] = ()
    transactional: bool = False
    fail_times: int = 0       # raises this many times, then succeeds
    fail_forever: bool = False
    uses_once: bool = False   # its external effect goes through step.once()


@dataclass(frozen=True)
class Shape:
    phases: int
    steps: tuple[StepShape, ...]

    def to_json(self) -> str:
        return json.dumps({"phases": self.phases, "steps": [asdict(s) for s in self.steps]})

    @staticmethod
    def from_json(text: str) -> Shape:
        data = json.loads(text)
        return Shape(data["phases"], tuple(StepShape(**{**s, "after": tuple(s["after"])}) for s in data["steps"]))


@st.composite
def shapes(draw: st.DrawFn, max_phases: int = 4, max_steps: int = 6) -> Shape:
    """1-4 phases of 1-6 sub-steps: parallel steps, `after` chains, transactional and plain,
    steps failing k times before succeeding, and (rarely) steps failing for good."""
    steps: list[StepShape] = []
    phases = draw(st.integers(1, max_phases))
    for p in range(phases):
        names: list[str] = []
        for i in range(draw(st.integers(1, max_steps))):
            name = f"p{p}s{i}"
            after = tuple(draw(st.lists(st.sampled_from(names), max_size=2, unique=True))) if names else ()
            steps.append(StepShape(
                name, p, after,
                transactional=draw(st.booleans()),
                fail_times=draw(st.integers(0, 2)),
                fail_forever=draw(st.integers(0, 9)) == 0,
                uses_once=draw(st.booleans()),
            ))
            names.append(name)
    return Shape(phases, tuple(steps))


class Effects:
    """Where external effects are counted: in memory, or appended to a file (child processes)."""

    def __init__(self, file: str | None = None) -> None:
        self.file = file
        self.counts: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self._lock = threading.Lock()

    def failed_before(self, key: str) -> int:
        """How often this step failed on purpose so far, across processes when file-backed."""
        if not self.file:
            return self.failures[key]
        try:
            with open(self.file + ".failures") as f:
                return sum(1 for line in f if line.strip() == key)
        except FileNotFoundError:
            return 0

    def note_failure(self, key: str) -> None:
        self.failures[key] += 1
        if self.file:
            with open(self.file + ".failures", "a") as f:
                f.write(key + "\n")
                f.flush()
                os.fsync(f.fileno())

    def record(self, step: StepContext) -> str:
        with self._lock:
            self.counts[step.step] += 1
            if self.file:
                with open(self.file, "a") as f:
                    f.write(f"{step.step} {step.idempotency_key}\n")
                    f.flush()
                    os.fsync(f.fileno())
        return f"receipt-{step.step}"

    def read_file(self) -> Counter[str]:
        assert self.file
        if not os.path.exists(self.file):
            return Counter()
        with open(self.file) as f:
            return Counter(line.split()[0] for line in f if line.strip())


def build(shape: Shape, effects: Effects, asynchronous: bool = False) -> Workflow[Any]:
    """A workflow whose final context depends on every step's inputs, so a lost or stale context shows.

    ``asynchronous=True`` declares every handler ``async def`` (the same behaviour, awaited).
    """
    fields: Any = {s.name: (int, 0) for s in shape.steps}
    model: type[BaseModel] = create_model("ShapeContext", **fields)
    flow = Workflow("shape", context=model, phases=[f"phase{p}" for p in range(shape.phases)])
    for spec in shape.steps:
        inputs = [s.name for s in shape.steps if s.phase < spec.phase] + list(spec.after)

        def handler(ctx: Any, step: StepContext, spec: StepShape = spec, inputs: list[str] = inputs) -> Any:
            if spec.fail_forever or effects.failed_before(step.idempotency_key) < spec.fail_times:
                effects.note_failure(step.idempotency_key)
                raise RuntimeError(f"{spec.name} fails on purpose")
            value = 1 + sum(getattr(ctx, n) for n in inputs)
            if spec.transactional:
                step.execute("CREATE TABLE IF NOT EXISTS shape_effects (step TEXT)")
                step.execute("INSERT INTO shape_effects VALUES (?)", (spec.name,))
            elif spec.uses_once:
                step.once("external", lambda: effects.record(step))
            else:
                effects.record(step)
            return {spec.name: value}

        async def ahandler(ctx: Any, step: AsyncStepContext, spec: StepShape = spec,
                           inputs: list[str] = inputs) -> Any:
            if spec.fail_forever or effects.failed_before(step.idempotency_key) < spec.fail_times:
                effects.note_failure(step.idempotency_key)
                raise RuntimeError(f"{spec.name} fails on purpose")
            await asyncio.sleep(0)
            value = 1 + sum(getattr(ctx, n) for n in inputs)
            if spec.transactional:
                step.execute("CREATE TABLE IF NOT EXISTS shape_effects (step TEXT)")
                step.execute("INSERT INTO shape_effects VALUES (?)", (spec.name,))
            elif spec.uses_once:
                await step.once("external", lambda: effects.record(step._sc))
            else:
                effects.record(step._sc)
            return {spec.name: value}

        flow.step(phase=f"phase{spec.phase}", name=spec.name, after=spec.after, transactional=spec.transactional,
                  retry=Retry(max_attempts=3))(ahandler if asynchronous else handler)
    return flow
