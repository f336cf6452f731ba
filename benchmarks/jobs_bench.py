"""End-to-end sub-steps per second (no-op handlers) vs the raw sqlite3 floor, same run.

A sub-step costs walstate two persisted changes (pending -> running ->
succeeded, the second with its output). The floor is raw sqlite3 doing the
same two CAS UPDATE + journal INSERT commits per sub-step.
"""

from __future__ import annotations

from pydantic import BaseModel

from walstate import Engine, Workflow

from .common import Figure, fresh_path, measure, rate, report
from .transitions_bench import raw_floor

STEPS = 300


class Empty(BaseModel):
    pass


def flow(parallel: bool) -> Workflow[Empty]:
    f = Workflow("bench", context=Empty, phases=["p"])
    for i in range(STEPS):
        after = [] if parallel or i == 0 else [f"s{i - 1}"]
        f.step(phase="p", name=f"s{i}", after=after)(lambda ctx, step: None)
    return f




def library(parallel: bool, durability: str) -> float:
    e = Engine(fresh_path("jobs"), durability=durability, workers=8 if parallel else 1)  # type: ignore[arg-type]
    e.register(flow(parallel))
    job = e.submit("bench", Empty())
    result = rate(STEPS, lambda: e.run(job) and None)
    e.close()
    return result


def main() -> list[Figure]:
    figures = []
    for durability in ("normal", "full"):
        floor, fs = measure(lambda: raw_floor(durability) / 2, reps=3)
        figures.append(Figure(f"raw floor, 2 commits per sub-step, {durability}", floor, fs, "sub-steps/s"))
        for parallel in (False, True):
            kind = "parallel phase, 8 workers" if parallel else "sequential (after-chain), 1 worker"
            lib, ls = measure(lambda: library(parallel, durability), reps=3)
            # The bar: 8 workers on a parallel phase under `full` at >= 2x the raw
            # sequential FULL floor (one commit per change).
            target = ">= 2x" if parallel and durability == "full" else ""
            figures.append(Figure(f"walstate {kind}, {durability}", lib, ls, "sub-steps/s",
                                  f"raw floor, {durability}", lib / floor, target))
    report("End-to-end sub-steps per second (no-op handlers)", figures, "jobs.json")
    return figures


if __name__ == "__main__":
    main()
