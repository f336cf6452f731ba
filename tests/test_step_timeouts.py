"""Step timeouts (issue 26.3): one execution of a step at a time, and no thread kept per timed-out attempt.

The rule (README, "Step timeouts"): when an attempt runs past its
``timeout``, it is marked timed out (logged) and its handler is told through
``step.cancelled``; the run waits for the handler to return before it records
the attempt as failed and retries or fails the step. So attempts never
overlap, ``run()`` returns only once no handler of the job is executing, and a
timeout needs no thread of its own.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from pydantic import BaseModel

from walstate import Engine, JobFailed, Retry, StepContext, Workflow

pytestmark = pytest.mark.backends


class Ctx(BaseModel):
    n: int = 0


class Overlap:
    """Counts handlers executing at once; remembers the most seen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.calls = 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.calls += 1
            self.most = max(self.most, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


def ignoring_flow(seen: Overlap, timeout: float, attempts: int) -> Workflow[Ctx]:
    """One step whose handler outlives its timeout: it waits until told, then goes on a while (ignores it)."""
    flow = Workflow("slow", context=Ctx, phases=["p"])

    @flow.step(phase="p", timeout=timeout, retry=Retry(max_attempts=attempts))
    def stubborn(ctx: Ctx, step: StepContext) -> dict[str, int]:
        seen.enter()
        try:
            assert step.cancelled.wait(60), "the timeout never told the handler"
            # Told to stop, it keeps going: without the rule, the next attempt starts now.
            threading.Event().wait(0.3)
            return {"n": 99}
        finally:
            seen.leave()

    return flow


def test_timed_out_attempts_of_one_step_never_overlap_and_run_returns_only_when_no_handler_executes(
        db_path: str) -> None:
    seen = Overlap()
    flow = ignoring_flow(seen, timeout=0.2, attempts=3)
    with Engine(db_path) as e:
        e.register(flow)
        job = e.submit(flow, Ctx())
        with pytest.raises(JobFailed) as failed:
            e.run(job)
        assert seen.now == 0, "run() returned while a handler of the job was still executing"
        assert seen.most == 1, f"{seen.most} attempts of one step ran at once"
        assert seen.calls == 3
        assert failed.value.errors == {"stubborn": "TimeoutError: step 'stubborn' attempt 3 timed out after 0.2s"}
        status = e.status(job)
        assert status.steps["stubborn"].attempts == 3 and status.context.n == 0  # the late results: not recorded
        notes = [r.note for r in e.history(job, "stubborn") if r.to_state in ("retrying", "failed")]
        assert notes == [f"TimeoutError: step 'stubborn' attempt {n} timed out after 0.2s" for n in (1, 2, 3)]


def walstate_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("walstate")]


def test_no_thread_is_kept_per_timed_out_attempt(db_path: str) -> None:
    attempts = 6
    seen = Overlap()
    flow = ignoring_flow(seen, timeout=0.05, attempts=attempts)
    plain = Workflow("plain", context=Ctx, phases=["p"])

    @plain.step(phase="p")
    def quick(ctx: Ctx, step: StepContext) -> None:
        return None

    with Engine(db_path, workers=1) as e:
        e.register(flow)
        e.register(plain)
        e.run(e.submit(plain, Ctx()))
        baseline = Counter(t.name for t in walstate_threads())
        counts = []
        for _ in range(2):
            with pytest.raises(JobFailed):
                e.run(e.submit(flow, Ctx()))
            counts.append(len(walstate_threads()))
        # Twelve timed-out attempts: the only thread they added is the process's one deadline thread
        # (none running a late handler, none cached for one), and a second job adds nothing.
        extra = sorted((Counter(t.name for t in walstate_threads()) - baseline).elements())
        assert extra in ([], ["walstate-deadlines"]), extra
        assert counts[0] == counts[1], counts
        assert seen.calls == 2 * attempts and seen.now == 0
