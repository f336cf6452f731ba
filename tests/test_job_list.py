"""engine.jobs(): a page of job summaries, newest first, in a fixed number of reads."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

import walstate
from walstate import Engine, JobFailed, StepContext, UsageError, Workflow

from .conftest import trace

pytestmark = pytest.mark.backends


class Order(BaseModel):
    name: str
    fail: bool = False


flow = Workflow("orders", context=Order, phases=["pay", "pack", "ship"])


@flow.step(phase="pay")
def charge(ctx: Order, step: StepContext) -> None:
    pass


@flow.step(phase="pay")
def receipt(ctx: Order, step: StepContext) -> None:
    pass


@flow.step(phase="pack")
def pack(ctx: Order, step: StepContext) -> None:
    if ctx.fail:
        raise ValueError("box too small")


@flow.step(phase="ship")
def ship(ctx: Order, step: StepContext) -> None:
    pass


other = Workflow("refunds", context=Order, phases=["refund"])


@other.step(phase="refund")
def refund(ctx: Order, step: StepContext) -> None:
    pass


@pytest.fixture
def engine(db_path: str) -> Any:
    """12 real jobs: 1-9 succeeded orders, 10 a failed order, 11 a cancelled order, 12 a pending refund."""
    e = Engine(db_path, workers=2)
    e.register(flow)
    e.register(other)
    for i in range(1, 10):
        e.run(e.submit(flow, Order(name=f"o{i}"), key=f"order-{i}"))
    with pytest.raises(JobFailed):
        e.run(e.submit(flow, Order(name="bad", fail=True), key="order-10"))
    e.cancel(e.submit(flow, Order(name="never"), key="order-11"))
    e.submit(other, Order(name="r"), key="refund-12")
    yield e
    e.close()


def test_jobs_come_newest_first_a_page_at_a_time_with_where_the_next_page_starts(engine: Engine) -> None:
    first = engine.jobs(limit=5)
    assert [j.id for j in first] == [12, 11, 10, 9, 8]
    assert first.next_offset == 5 and first.more
    second = engine.jobs(limit=5, offset=first.next_offset)
    assert [j.id for j in second] == [7, 6, 5, 4, 3] and second.next_offset == 10
    last = engine.jobs(limit=5, offset=10)
    assert [j.id for j in last] == [2, 1] and last.next_offset is None and not last.more
    exact = engine.jobs(limit=12)
    assert len(exact) == 12 and exact.next_offset is None  # a full last page says nothing more follows
    assert list(engine.jobs(offset=50)) == []


def test_jobs_filter_by_state_and_workflow(engine: Engine) -> None:
    assert [j.id for j in engine.jobs(state="failed")] == [10]
    assert [j.id for j in engine.jobs(workflow="refunds")] == [12]
    succeeded = engine.jobs(state="succeeded", workflow="orders", limit=3)
    assert [j.id for j in succeeded] == [9, 8, 7] and succeeded.next_offset == 3
    assert list(engine.jobs(state="failed", workflow="refunds")) == []


def test_a_summary_counts_steps_by_state_so_failed_and_cancelled_jobs_read_truthfully(engine: Engine) -> None:
    by_id = {j.id: j for j in engine.jobs()}
    good, failed, cancelled, pending = by_id[1], by_id[10], by_id[11], by_id[12]
    assert (good.workflow, good.key, good.state, good.phase) == ("orders", "order-1", "succeeded", "ship")
    assert good.steps == {"succeeded": 4} and good.total == 4 and good.progress == "4/4 ok" and good.error is None
    assert failed.state == "failed" and failed.phase == "pack"  # where it stopped, not the last phase
    assert failed.steps == {"succeeded": 2, "failed": 1, "cancelled": 1}
    assert failed.progress == "2/4 ok, 1 failed, 1 cancelled"
    assert failed.error is not None and "box too small" in failed.error
    assert cancelled.steps == {"cancelled": 4} and cancelled.progress == "0/4 ok, 4 cancelled"
    assert pending.steps == {"pending": 1} and pending.phase == "refund" and pending.progress == "0/1 ok"
    assert good.created_at <= good.updated_at
    # The same numbers as the full status of each job.
    for j in by_id.values():
        status = engine.status(j.id)
        assert j.total == len(status.steps)
        assert all(j.steps.get(s.state, 0) == sum(t.state == s.state for t in status.steps.values())
                   for s in status.steps.values())


@pytest.mark.sqlite_only  # counts SQLite's statements
def test_a_page_takes_two_selects_whatever_its_size(engine: Engine) -> None:
    log = trace(engine.store.db)
    counts = {}
    for limit in (1, 4, 12):
        log.clear()
        page = engine.jobs(limit=limit)
        assert len(page) == limit
        counts[limit] = log.count("SELECT")
    assert counts == {1: 2, 4: 2, 12: 2}, counts


def test_bad_paging_arguments_are_refused_with_a_usage_error(engine: Engine) -> None:
    with pytest.raises(UsageError, match="limit must be >= 1"):
        engine.jobs(limit=0)
    with pytest.raises(UsageError, match="offset must be >= 0"):
        engine.jobs(offset=-1)
    with pytest.raises(UsageError, match="no job state 'done'"):
        engine.jobs(state="done")


def test_the_summary_types_are_exported_from_walstate() -> None:
    assert walstate.JobSummary.__name__ == "JobSummary" and walstate.JobPage.__name__ == "JobPage"
    assert {"JobSummary", "JobPage"} <= set(walstate.__all__)
