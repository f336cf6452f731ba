"""Jobs of phases of parallel sub-steps: order, retries, context, transactional steps, once(), recovery."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from pydantic import BaseModel

from walstate import (
    ContextInvalid,
    DefinitionError,
    Engine,
    InjectedCrash,
    JobFailed,
    KeyConflict,
    Retry,
    StepContext,
    StepResult,
    Workflow,
)
from walstate.storage import faults

from .conftest import trace

from .helpers import query

pytestmark = pytest.mark.backends


class Ctx(BaseModel):
    tenant: str = "t1"
    a: int = 0
    b: int = 0
    paths: list[str] = []


def engine_for(path: str, flow: Workflow[Any], workers: int = 4) -> Engine:
    e = Engine(path, workers=workers)
    e.register(flow)
    return e


def test_phases_run_in_order_and_a_phase_waits_for_all_its_steps(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["one", "two"])
    for name, phase, pause in [("a1", "one", 0.05), ("a2", "one", 0.0), ("b1", "two", 0.0)]:
        flow.step(phase=phase, name=name)(lambda ctx, step, pause=pause: time.sleep(pause))
    with engine_for(db_path, flow) as e:
        job = e.submit("w", Ctx())
        e.run(job)
        hist = e.history(job)
    starts = {r.step: i for i, r in enumerate(hist) if r.to_state == "running" and r.step}
    ends = {r.step: i for i, r in enumerate(hist) if r.to_state == "succeeded" and r.step}
    assert starts["b1"] > max(ends["a1"], ends["a2"])


def test_steps_of_one_phase_run_in_parallel(db_path: str) -> None:
    barrier = threading.Barrier(3, timeout=10)
    flow = Workflow("w", context=Ctx, phases=["p"])
    for i in range(3):
        # Each step waits for the other two: only parallel execution lets all three pass.
        flow.step(phase="p", name=f"s{i}")(lambda ctx, step: barrier.wait() and None)
    with engine_for(db_path, flow, workers=3) as e:
        status = e.run(e.submit("w", Ctx()))
    assert {s.state for s in status.steps.values()} == {"succeeded"}


def test_after_orders_steps_inside_a_phase(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="menu", after=["register"])(lambda ctx, step: None)
    flow.step(phase="p", name="register")(lambda ctx, step: time.sleep(0.05))
    with engine_for(db_path, flow) as e:
        job = e.submit("w", Ctx())
        e.run(job)
        hist = [(r.step, r.to_state) for r in e.history(job)]
    assert hist.index(("register", "succeeded")) < hist.index(("menu", "running"))


@pytest.mark.parametrize("after,message", [(["ghost"], "unknown step 'ghost'"), (["b"], "cycle"),
                                           (["other"], "inside one phase")])
def test_bad_step_order_is_an_error_when_the_workflow_is_registered(db_path: str, after: list[str], message: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p", "q"])
    flow.step(phase="p", name="a", after=after)(lambda ctx, step: None)
    flow.step(phase="p", name="b", after=["a"])(lambda ctx, step: None)
    flow.step(phase="q", name="other")(lambda ctx, step: None)
    e = Engine(db_path)
    with pytest.raises(DefinitionError, match=message):
        e.register(flow)
    e.close()


def test_unknown_phase_and_duplicate_step_are_definition_errors() -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    with pytest.raises(DefinitionError, match="unknown phase 'x'"):
        flow.step(phase="x")
    flow.step(phase="p", name="a")(lambda ctx, step: None)
    with pytest.raises(DefinitionError, match="declared twice"):
        flow.step(phase="p", name="a")(lambda ctx, step: None)


def test_a_failing_step_is_retried_and_its_failed_attempts_are_journalled(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    calls = Counter[str]()

    @flow.step(phase="p", retry=Retry(max_attempts=3))
    def flaky(ctx: Ctx, step: StepContext) -> dict[str, Any]:
        calls["flaky"] += 1
        if step.attempt < 3:
            raise ConnectionError(f"try {step.attempt}")
        return {"a": step.attempt}

    with engine_for(db_path, flow) as e:
        job = e.submit("w", Ctx())
        status = e.run(job)
        moves = [(r.from_state, r.to_state, r.attempt, r.note) for r in e.history(job, "flaky")]
    assert calls["flaky"] == 3
    assert status.steps["flaky"].attempts == 3 and status.context.a == 3
    assert moves == [("pending", "running", 1, None), ("running", "retrying", 1, "ConnectionError: try 1"),
                     ("retrying", "running", 2, None), ("running", "retrying", 2, "ConnectionError: try 2"),
                     ("retrying", "running", 3, None), ("running", "succeeded", 3, None)]


def test_a_step_out_of_attempts_fails_the_job_lets_in_flight_steps_finish_and_starts_nothing_new(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p", "q"])
    ran: list[str] = []
    slow_started = threading.Event()

    @flow.step(phase="p", retry=Retry(max_attempts=2))
    def broken(ctx: Ctx, step: StepContext) -> None:
        slow_started.wait(10)  # make sure `slow` is in flight when this fails for good
        raise ValueError("bad credentials")

    @flow.step(phase="p")
    def slow(ctx: Ctx, step: StepContext) -> dict[str, Any]:
        slow_started.set()
        time.sleep(0.1)
        ran.append("slow")
        return {"b": 1}

    @flow.step(phase="q")
    def later(ctx: Ctx, step: StepContext) -> None:
        ran.append("later")

    with engine_for(db_path, flow) as e:
        job = e.submit("w", Ctx())
        with pytest.raises(JobFailed) as err:
            e.run(job)
        status = e.status(job)
    assert err.value.errors == {"broken": "ValueError: bad credentials"}
    assert "bad credentials" in str(err.value)
    assert status.state == "failed"
    assert status.steps["broken"].state == "failed" and status.steps["broken"].attempts == 2
    assert status.steps["slow"].state == "succeeded" and status.context.b == 1  # in flight: finished and recorded
    assert status.steps["later"].state == "cancelled" and "later" not in ran


def test_parallel_context_updates_to_different_fields_all_survive(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="sa")(lambda ctx, step: {"a": 1})
    flow.step(phase="p", name="sb")(lambda ctx, step: {"b": 2})
    flow.step(phase="p", name="sp")(lambda ctx, step: {"paths": ["x"]})
    with engine_for(db_path, flow) as e:
        status = e.run(e.submit("w", Ctx()))
    assert (status.context.a, status.context.b, status.context.paths) == (1, 2, ["x"])


def test_an_invalid_context_update_fails_the_step_clearly_without_retries_and_stores_nothing(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    calls = Counter[str]()

    @flow.step(phase="p", retry=Retry(max_attempts=5))
    def typo(ctx: Ctx, step: StepContext) -> dict[str, Any]:
        calls["typo"] += 1
        return {"a": "not a number"}

    with engine_for(db_path, flow) as e:
        job = e.submit("w", Ctx())
        with pytest.raises(JobFailed):
            e.run(job)
        status = e.status(job)
    assert calls["typo"] == 1
    assert status.steps["typo"].error is not None and "ContextInvalid" in status.steps["typo"].error
    assert "does not validate against Ctx" in status.steps["typo"].error
    assert status.context.a == 0


def test_an_update_naming_an_unknown_field_is_refused(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="s")(lambda ctx, step: {"colour": "red"})
    with engine_for(db_path, flow) as e:
        job = e.submit("w", Ctx())
        with pytest.raises(JobFailed):
            e.run(job)
        error = e.status(job).steps["s"].error or ""
        assert "colour" in error and f"step 's' of job {job}: context update names fields" in error


def test_output_that_is_not_json_fails_the_step_with_a_clear_message(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="s")(lambda ctx, step: StepResult(output=object()))
    with engine_for(db_path, flow) as e:
        job = e.submit("w", Ctx())
        with pytest.raises(JobFailed):
            e.run(job)
        error = e.status(job).steps["s"].error or ""
    assert "OutputNotJSON" in error and f"the output of step 's' of job {job} is not JSON-serialisable" in error


def test_step_result_records_an_output_apart_from_the_context_update(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="s")(lambda ctx, step: StepResult(output={"rows": 3}, context={"a": 7}))
    with engine_for(db_path, flow) as e:
        status = e.run(e.submit("w", Ctx()))
    assert status.steps["s"].output == {"rows": 3} and status.context.a == 7


@pytest.mark.sqlite_only  # counts SQLite's statements
def test_a_step_completion_with_a_context_update_is_one_commit(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="s")(lambda ctx, step: {"a": 1})
    with engine_for(db_path, flow, workers=1) as e:
        job = e.submit("w", Ctx())
        log = trace(e.store.db)
        e.run(job)
    # job start, step start, step success (with context), job success: four changes in three commits,
    # since the last step's success commits with the job's (issue 16).
    assert log.count("COMMIT") == 3
    assert log.count("UPDATE WALSTATE_JOB SET CONTEXT") == 1


def test_when_false_skips_the_step(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p", "q"])
    flow.step(phase="p", name="gen")(lambda ctx, step: None)  # produces no paths
    flow.step(phase="q", name="site", when=lambda ctx: bool(ctx.paths))(lambda ctx, step: pytest.fail("ran"))
    with engine_for(db_path, flow) as e:
        status = e.run(e.submit("w", Ctx()))
    assert status.steps["site"].state == "skipped" and status.state == "succeeded"


@pytest.mark.sqlite_only  # counts SQLite's statements
def test_submit_with_a_known_key_returns_the_same_job_and_creates_nothing(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="s")(lambda ctx, step: None)
    with engine_for(db_path, flow) as e:
        first = e.submit("w", Ctx(tenant="t1"), key="t1")
        log = trace(e.store.db)
        assert e.submit("w", Ctx(tenant="t1"), key="t1") == first
        assert log.writes == []
        with pytest.raises(KeyConflict, match="another context"):
            e.submit("w", Ctx(tenant="t2"), key="t1")
        assert len(e.store.read.jobs()) == 1


def test_a_context_that_fails_validation_at_submit_is_refused(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="s")(lambda ctx, step: None)
    with engine_for(db_path, flow) as e:
        with pytest.raises(ContextInvalid, match="does not validate"):
            e.submit("w", {"a": "many"})
        assert e.store.read.jobs() == []


def crashing_flow(calls: Counter[str]) -> Workflow[Ctx]:
    flow = Workflow("w", context=Ctx, phases=["one", "two"])

    @flow.step(phase="one")
    def first(ctx: Ctx, step: StepContext) -> dict[str, Any]:
        calls["first"] += 1
        return {"paths": ["index.html"]}

    @flow.step(phase="two", transactional=True)
    def menu(ctx: Ctx, step: StepContext) -> dict[str, Any]:
        calls["menu"] += 1
        step.execute("CREATE TABLE IF NOT EXISTS menus (tenant TEXT)")
        step.execute("INSERT INTO menus VALUES (?)", (ctx.tenant,))
        return {"a": len(ctx.paths)}

    @flow.step(phase="two")
    def pay(ctx: Ctx, step: StepContext) -> dict[str, Any]:
        calls["pay"] += 1
        account = step.once("account", lambda: calls.update(["provider"]) or f"acct-{step.idempotency_key}")
        return {"b": len(account)}

    return flow


def crash_then_recover(db_path: str, crash: faults.Crash) -> tuple[Counter[str], Any, Engine]:
    calls = Counter[str]()
    flow = crashing_flow(calls)
    e1 = engine_for(db_path, flow, workers=1)
    job = e1.submit("w", Ctx())
    with faults.Injector(crash), pytest.raises(InjectedCrash):
        e1.run(job)
    e1.close()  # the "process" is gone; a fresh one opens the file
    e2 = engine_for(db_path, flow, workers=1)
    assert e2.recover() == [job]
    return calls, e2.status(job), e2


def test_a_succeeded_step_is_never_run_again_after_a_crash_and_its_context_is_restored(db_path: str) -> None:
    # Crash when `menu` starts: `first` had succeeded in an earlier phase.
    calls, status, e = crash_then_recover(db_path, faults.Crash("after_commit", 3))
    assert calls["first"] == 1
    assert status.state == "succeeded" and status.context.paths == ["index.html"] and status.context.a == 1
    e.close()


def test_a_transactional_effect_interrupted_before_commit_exists_exactly_once(db_path: str) -> None:
    calls, status, e = crash_then_recover(db_path, faults.Crash("handler_after_effect", 2))
    assert calls["menu"] == 2  # ran again after the crash...
    rows = query(db_path, "SELECT count(*) FROM menus")[0][0]
    assert rows == 1  # ...but its writes rolled back with the lost completion
    assert status.state == "succeeded"
    e.close()


def test_a_handler_that_raises_rolls_back_its_transactional_writes(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p", transactional=True, retry=Retry(max_attempts=2))
    def menu(ctx: Ctx, step: StepContext) -> None:
        step.execute("CREATE TABLE IF NOT EXISTS menus (attempt INT)")
        step.execute("INSERT INTO menus VALUES (?)", (step.attempt,))
        if step.attempt == 1:
            raise RuntimeError("menu service down")

    with engine_for(db_path, flow) as e:
        e.run(e.submit("w", Ctx()))
    assert query(db_path, "SELECT attempt FROM menus") == [(2,)]


def test_once_returns_the_stored_result_without_calling_again_after_a_crash(db_path: str) -> None:
    # Crash right after the once() record commits, before the step's completion.
    calls, status, e = crash_then_recover(db_path, faults.Crash("after_once_record", 1))
    assert calls["pay"] == 2 and calls["provider"] == 1
    assert status.steps["pay"].state == "succeeded"
    e.close()


def test_the_idempotency_key_is_stable_across_attempts_and_restarts(db_path: str) -> None:
    keys: list[str] = []
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p", retry=Retry(max_attempts=3))
    def s(ctx: Ctx, step: StepContext) -> None:
        keys.append(step.idempotency_key)
        if step.attempt == 1:
            raise RuntimeError("again")
        if len(keys) == 2:
            faults.point("handler_after_effect")

    e1 = engine_for(db_path, flow)
    job = e1.submit("w", Ctx())
    with faults.Injector(faults.Crash("handler_after_effect", 1)), pytest.raises(InjectedCrash):
        e1.run(job)
    e1.close()
    with engine_for(db_path, flow) as e2:
        e2.recover()
    assert len(keys) == 3 and len(set(keys)) == 1


def test_recovery_journals_the_interrupted_attempt_and_retries_it(db_path: str) -> None:
    calls, status, e = crash_then_recover(db_path, faults.Crash("handler_before_effect", 2))
    moves = [(r.from_state, r.to_state, r.attempt, r.note) for r in e.history(status.id, "menu")]
    assert moves == [("pending", "running", 1, None), ("running", "retrying", 1, "interrupted"),
                     ("retrying", "running", 2, None), ("running", "succeeded", 2, None)]
    assert status.steps["menu"].attempts == 2
    e.close()


@contextmanager
def live_run(db_path: str) -> Iterator[tuple[Engine, int]]:
    """A job held mid-step by a run in another thread; yields a second engine and the job id."""
    gate, release = threading.Event(), threading.Event()
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def slow(ctx: Ctx, step: StepContext) -> None:
        gate.set()
        release.wait(10)

    e1, e2 = engine_for(db_path, flow), engine_for(db_path, flow)
    job = e1.submit("w", Ctx())
    runner = threading.Thread(target=e1.run, args=(job,))
    runner.start()
    try:
        assert gate.wait(10)
        yield e2, job
    finally:
        release.set()
        runner.join(10)
        assert e2.status(job).state == "succeeded"
        assert [r.to_state for r in e2.history(job, "slow")] == ["running", "succeeded"]  # ran once
        e1.close()
        e2.close()


def test_recover_never_takes_over_a_job_that_a_live_run_is_executing(db_path: str) -> None:
    with live_run(db_path) as (e2, job):
        assert e2.recover() == []
        assert e2.status(job).steps["slow"].state == "running"


def test_running_a_job_that_a_live_run_owns_raises_job_owned(db_path: str) -> None:
    from walstate import JobOwned

    with live_run(db_path) as (e2, job), pytest.raises(JobOwned, match="being run by"):
        e2.run(job)


def test_a_step_that_kills_its_process_every_time_fails_after_max_interruptions(db_path: str) -> None:
    from walstate.testing import run_with_crashes

    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="poison", retry=Retry(max_attempts=5, max_interruptions=2))(lambda ctx, step: None)
    plan = [faults.Crash("handler_before_effect", 1)] * 3  # it dies on every attempt
    outcome = run_with_crashes(flow, Ctx(), db_path, plan)
    assert outcome.crashes == 3
    assert outcome.step_states == {"poison": "failed"} and outcome.state == "failed"
    with engine_for(db_path, flow) as e:
        notes = [r.note for r in e.history(outcome.job_id, "poison") if r.to_state in ("retrying", "failed")]
    assert notes == ["interrupted", "interrupted", "interrupted"]


def test_a_sequential_run_commits_each_success_together_with_the_start_of_the_next_step(db_path: str) -> None:
    flow = Workflow("chain", context=Ctx, phases=["p"])
    for i in range(5):
        flow.step(phase="p", name=f"s{i}")(lambda ctx, step: None)
    e = engine_for(db_path, flow, workers=1)
    job = e.submit(flow, Ctx())
    before = e.store.write.batches
    e.run(job)
    # The first start, five successes (four carrying the next start, the last the job's end): 6 commits,
    # not 11 (issue 16).
    assert e.store.write.batches - before == 6
    # The journal is what one commit per change writes, in the same order.
    moves = [(r.step, r.from_state, r.to_state, r.attempt) for r in e.history(job)]
    assert moves == [(None, "pending", "running", 0),
                     *[m for i in range(5) for m in ((f"s{i}", "pending", "running", 1),
                                                     (f"s{i}", "running", "succeeded", 1))],
                     (None, "running", "succeeded", 0)]
    e.close()


def test_a_success_in_an_after_chain_commits_together_with_the_start_of_the_step_it_unlocks(db_path: str) -> None:
    flow = Workflow("chain", context=Ctx, phases=["p"])
    for i in range(5):
        flow.step(phase="p", name=f"s{i}", after=[f"s{i - 1}"] if i else [])(lambda ctx, step: None)
    e = engine_for(db_path, flow, workers=1)
    job = e.submit(flow, Ctx())
    before = e.store.write.batches
    e.run(job)
    # As in a phase of independent steps: the first start, five successes (the last with the job's end).
    assert e.store.write.batches - before == 6
    assert [(r.step, r.to_state) for r in e.history(job)][1:-1] == [
        (f"s{i}", state) for i in range(5) for state in ("running", "succeeded")]
    e.close()


def test_a_job_failed_by_one_step_names_that_error_not_a_cancelled_siblings_old_one(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p", "later"])
    flow.step(phase="later", name="never")(lambda ctx, step: None)
    failed_once = threading.Event()

    @flow.step(phase="p", retry=Retry(max_attempts=3, backoff=5.0))  # waits to retry when the job fails
    def flaky(ctx: Ctx, step: StepContext) -> None:
        failed_once.set()
        raise RuntimeError("boom 1")

    @flow.step(phase="p", retry=Retry(max_attempts=1))
    def always(ctx: Ctx, step: StepContext) -> None:
        failed_once.wait(10)
        raise ValueError("never works")

    with engine_for(db_path, flow, workers=2) as e:
        job = e.submit(flow, Ctx())
        with pytest.raises(JobFailed) as raised:
            e.run(job)
        assert raised.value.errors == {"always": "ValueError: never works"}
        status = e.status(job)
        assert status.error == "flaky: cancelled; always: ValueError: never works; never: cancelled"
        assert status.steps["flaky"].state == "cancelled"
        # It did run once: its journal says the next attempt was not made, not that it never ran.
        assert [h.note for h in e.history(job, "flaky") if h.to_state == "cancelled"] == [
            "job failed; attempt 2 of this sub-step was not made"]
        assert [h.note for h in e.history(job, "never") if h.to_state == "cancelled"] == [
            "job failed before this sub-step could run"]


def test_a_handler_returning_the_context_model_fails_the_step_saying_what_to_return(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def whole(ctx: Ctx, step: StepContext) -> Ctx:
        return ctx.model_copy(update={"a": 9})  # meant as the new context: it used to be dropped silently

    with engine_for(db_path, flow) as e:
        job = e.submit(flow, Ctx())
        with pytest.raises(JobFailed):
            e.run(job)
        status = e.status(job)
        assert status.context.a == 0 and status.steps["whole"].state == "failed"
        error = status.steps["whole"].error or ""
        assert f"step 'whole' of job {job} returned a Ctx (the workflow's context model); a handler updates the " \
               "context by returning a dict of the fields to change, or StepResult(output=..., context={...})" in error
