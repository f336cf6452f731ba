"""Demo: one durable sub-step driven through its states, and its journal."""

from __future__ import annotations

import os

from storage import Store

from .substep import JobHandle, SubStep


def main(path: str) -> int:
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    store = Store(path)
    job_id, _ = store.write.create_job("demo", None, "{}", [("import_menu", "setup", 0)])
    step = SubStep(JobHandle(job_id, "demo", "pending", None, store.write), store.read.steps(job_id)[0])
    step.start()
    step.retry(error="TimeoutError: menu service slow")
    step.start()
    step.succeed(output='{"items": 42}')
    print(f"{path}: sub-step {step.name!r} is {step.state} after {step.attempt} attempts; journal:")
    for row in store.read.journal(job_id):
        print(f"  {row.from_state:>9} -> {row.to_state:<9} attempt {row.attempt}  {row.note or ''}")
    store.close()
    return 0
