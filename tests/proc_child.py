"""A workflow run in a child process that the tests SIGKILL (``python -m tests.proc_child ACTION DB``)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from pydantic import BaseModel

from walstate import Engine, StepContext, Workflow


class Ctx(BaseModel):
    done: list[str] = []
    total: int = 0


flow = Workflow("proc", context=Ctx, phases=["one", "two"])


def external(step: StepContext) -> None:
    """An outside effect: one line per execution, tagged with the idempotency key."""
    with open(os.environ["WALSTATE_EFFECTS"], "a") as f:
        f.write(f"{step.step} {step.idempotency_key}\n")
        f.flush()
        os.fsync(f.fileno())


for i in range(2):
    @flow.step(phase="one", name=f"one_{i}")
    def one(ctx: Ctx, step: StepContext) -> dict[str, Any]:
        external(step)
        return {"total": 1}

for i in range(4):
    @flow.step(phase="two", name=f"two_{i}", transactional=(i == 0))
    def two(ctx: Ctx, step: StepContext, i: int = i) -> dict[str, Any] | None:
        time.sleep(0.05 * i)
        if i == 0:
            step.db.execute_sql("CREATE TABLE IF NOT EXISTS effects (step TEXT)")
            step.db.execute_sql("INSERT INTO effects VALUES (?)", (step.step,))
            return None
        external(step)
        return None


def main(action: str, path: str) -> int:
    engine = Engine(path, workers=2)
    engine.register(flow)
    if action == "run":
        engine.run(engine.submit("proc", Ctx(), key="k"))
    else:
        print(engine.recover())
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
