"""Exactly-once resume, proven: Hypothesis-chosen shapes and crash plans, an exhaustive sweep, real SIGKILLs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from walstate.testing import (
    POINTS,
    Crash,
    Injector,
    InvariantViolation,
    Outcome,
    check_invariants,
    crash_plans,
    connect,
    run_with_crashes,
    single_crashes,
)
from walstate.storage import faults
from walstate import Workflow

from .conftest import PARALLEL_EXAMPLES, SIGKILL_EXAMPLES, NewDb
from .shapes import Effects, Shape, StepShape, build, shapes

ROOT = Path(__file__).resolve().parent.parent

# The whole proof runs on both backends: in-process crashes at fault points,
# the exhaustive sweep, and real SIGKILLs.
pytestmark = pytest.mark.backends

#: Totals over the session, written to $WALSTATE_CRASH_STATS (JSON) for closing notes and deep runs.
TOTALS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _write_totals() -> Iterator[None]:
    yield
    target = os.environ.get("WALSTATE_CRASH_STATS")
    if target:
        Path(target).write_text(json.dumps(dict(TOTALS), indent=2))


def check_effects(path: str, shape: Shape, job_id: int, external: Counter[str], once_strict: bool = False) -> None:
    """Transactional effects exactly once per succeeded step; external ones at least once, and
    more than once only for a step a crash interrupted between its effect and its commit.

    A step that never succeeded (failed, or cancelled because the job failed)
    ran its effect only in attempts a crash interrupted."""
    conn = connect(path)
    try:
        states = dict(conn.execute("SELECT name, state FROM walstate_step WHERE job_id=?", (job_id,)).fetchall())
        try:
            tx = Counter(dict(conn.execute("SELECT step, count(*) FROM shape_effects GROUP BY step").fetchall()))
        except Exception as exc:  # sqlite3's or psycopg's "no such table"
            if "shape_effects" not in str(exc):
                raise
            tx = Counter()
        interrupted = Counter(dict(conn.execute(
            "SELECT step, count(*) FROM walstate_journal WHERE job_id=? AND note='interrupted' GROUP BY step",
            (job_id,)).fetchall()))
    finally:
        conn.close()
    for spec in shape.steps:
        ok = states[spec.name] == "succeeded"
        if spec.transactional:
            if tx[spec.name] != (1 if ok else 0):
                raise InvariantViolation(f"transactional effect of {spec.name!r} exists {tx[spec.name]} times "
                                         f"(step {states[spec.name]})")
            continue
        n = external[spec.name]
        if spec.uses_once and once_strict and n > 1:
            raise InvariantViolation(f"once() of {spec.name!r} called its function {n} times")
        if ok and n < 1:
            raise InvariantViolation(f"step {spec.name!r} succeeded but its external effect never ran")
        if not ok and n > interrupted[spec.name]:
            # A step that never succeeded may have run its effect only in attempts a crash cut short.
            raise InvariantViolation(f"step {spec.name!r} ended {states[spec.name]!r} but its effect ran {n} times")
        if n > 1 + interrupted[spec.name]:
            raise InvariantViolation(f"external effect of {spec.name!r} ran {n} times, but only "
                                     f"{interrupted[spec.name]} crash(es) interrupted it")


def reference_run(new_db: NewDb, shape: Shape) -> Outcome:
    return run_shape(shape, Effects(), new_db("reference"))


def run_shape(shape: Shape, effects: Effects, path: str, plan: Sequence[Crash] = (), workers: int = 1,
              asynchronous: bool = False) -> Outcome:
    # The context is an instance of this flow's own model: submit refuses another class's instance.
    flow = build(shape, effects, asynchronous)
    return run_with_crashes(flow, flow.context(), path, plan, workers=workers)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], database=None)
@given(shape=shapes(), plan=crash_plans(max_hit=12))
def test_any_shape_resumes_exactly_once_under_any_crash_plan(new_db: NewDb,
                                                             shape: Shape, plan: list[Crash]) -> None:
    crash_and_check(new_db, shape, plan, workers=1)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], database=None,
          max_examples=PARALLEL_EXAMPLES)
@given(shape=shapes(), plan=crash_plans(max_hit=12))
def test_parallel_workers_resume_exactly_once_under_any_crash_plan(new_db: NewDb,
                                                                   shape: Shape, plan: list[Crash]) -> None:
    # Crashes now hit one worker while others are mid-step: the run must stop them all and resume cleanly.
    crash_and_check(new_db, shape, plan, workers=3)


def crash_and_check(new_db: NewDb, shape: Shape, plan: list[Crash], workers: int,
                    asynchronous: bool = False) -> None:
    reference = reference_run(new_db, shape)
    effects = Effects()
    path = new_db("crashed")
    outcome = run_shape(shape, effects, path, plan, workers=workers, asynchronous=asynchronous)
    check_invariants(path, build(shape, Effects()), outcome.job_id, reference)
    check_effects(path, shape, outcome.job_id, effects.counts)
    TOTALS["in_process_examples"] += 1
    TOTALS["in_process_crashes"] += outcome.crashes


SWEEP_SHAPE = Shape(2, (
    StepShape("p0s0", 0), StepShape("p0s1", 0, uses_once=True), StepShape("p0s2", 0, ("p0s0",), fail_times=1),
    StepShape("p1s0", 1, transactional=True), StepShape("p1s1", 1), StepShape("p1s2", 1, ("p1s0",)),
))
#: Every (fault point, hit) pair the crash-free run of SWEEP_SHAPE reaches. Pinned, so the sweep cannot shrink.
#: 86 since a success commits with the start of the next ready step of a sequential run (issue 16): three
#: such pairs here, each one commit fewer (its before_begin, before_commit and after_commit); every
#: after_update and after_journal of both changes is still reached, now inside one transaction.
#: 83 since the last step's success commits with the job's success (issue 16): one commit fewer
#: (its before_begin, before_commit, after_commit); both changes' other points are still reached.
SWEEP_POSITIONS = 83


def sweep(new_db: NewDb, shape: Shape = SWEEP_SHAPE, asynchronous: bool = False) -> int:
    """Crash at every reachable (fault point, hit) of ``shape``, resume, check; return positions covered."""
    counter = Injector()
    with counter:
        reference = run_shape(shape, Effects(), new_db("ref"), asynchronous=asynchronous)
    # Every hit of every point: the harness's own list of reachable positions, uncapped.
    positions = [(crash.point, crash.nth) for [crash] in single_crashes(counter.hits, max_hit=sys.maxsize)]
    for point, n in positions:
        effects = Effects()
        path = new_db(f"{point}-{n}")
        outcome = run_shape(shape, effects, path, [Crash(point, n)], asynchronous=asynchronous)
        assert outcome.crashes == 1, f"crash at {point}#{n} was not reached"
        check_invariants(path, build(shape, Effects()), outcome.job_id, reference)
        # once() may repeat its call only when the crash fell between the call and its record.
        check_effects(path, shape, outcome.job_id, effects.counts, once_strict=point != "before_once_record")
        TOTALS["sweep_crashes"] += 1
    # Every fault point is on the path, but those of message consumption: SWEEP_SHAPE
    # does not wait (test_waits crashes around consuming a message on its own).
    assert {p for p, _ in positions} == set(POINTS) - {"before_consume", "after_consume"}
    return len(positions)


def test_a_crash_at_every_reachable_position_of_a_fixed_workflow_resumes_exactly_once(new_db: NewDb) -> None:
    assert sweep(new_db) == SWEEP_POSITIONS


#: SWEEP_SHAPE with each phase's steps chained by `after`: async steps of a phase all run at
#: once (they do not count against `workers`), so only a chain keeps the hit counts of a
#: crash-free run the same from one run to the next.
ASYNC_SWEEP_SHAPE = Shape(2, (
    StepShape("p0s0", 0), StepShape("p0s1", 0, ("p0s0",), uses_once=True), StepShape("p0s2", 0, ("p0s1",), fail_times=1),
    StepShape("p1s0", 1, transactional=True), StepShape("p1s1", 1, ("p1s0",)), StepShape("p1s2", 1, ("p1s1",)),
))


#: Async steps run on the parallel path, where a success is not chained with the next start:
#: each start is a commit of its own, so three more (before_begin, before_commit, after_commit)
#: triples than SWEEP_SHAPE's sequential run. Pinned like SWEEP_POSITIONS. 92 (was 95) since the
#: last step's success commits with the job's success: one commit fewer, as in SWEEP_POSITIONS.
ASYNC_SWEEP_POSITIONS = 92


def test_the_sweep_holds_with_async_handlers_too(new_db: NewDb) -> None:
    assert sweep(new_db, ASYNC_SWEEP_SHAPE, asynchronous=True) == ASYNC_SWEEP_POSITIONS


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], database=None,
          max_examples=PARALLEL_EXAMPLES)
@given(shape=shapes(), plan=crash_plans(max_hit=12))
def test_async_handlers_of_any_shape_resume_exactly_once_under_any_crash_plan(
        new_db: NewDb, shape: Shape, plan: list[Crash]) -> None:
    crash_and_check(new_db, shape, plan, workers=3, asynchronous=True)


def spawn(shape: Shape, db: str, effects: str, crash: Crash | None,
          asynchronous: bool = False) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WALSTATE_SHAPE": shape.to_json(), "WALSTATE_EFFECTS": effects}
    if asynchronous:
        env["WALSTATE_ASYNC"] = "1"
    if crash is not None:
        env["WALSTATE_KILL_AT"] = f"{crash.point}:{crash.nth}"
    return subprocess.Popen([sys.executable, "-m", "tests.proc_shape", db], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], database=None,
          max_examples=SIGKILL_EXAMPLES)
@given(shape=shapes(max_phases=3, max_steps=4), plan=crash_plans(max_hit=10, max_crashes=2))
def test_a_child_killed_by_sigkill_at_any_point_is_resumed_exactly_once(tmp_path_factory: pytest.TempPathFactory,
                                                                        new_db: NewDb,
                                                                        shape: Shape, plan: list[Crash]) -> None:
    sigkill_and_check(tmp_path_factory, new_db, shape, plan)


@pytest.mark.slow
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], database=None,
          max_examples=max(2, SIGKILL_EXAMPLES // 2))
@given(shape=shapes(max_phases=3, max_steps=4), plan=crash_plans(max_hit=10, max_crashes=2))
def test_a_child_with_async_handlers_killed_by_sigkill_is_resumed_exactly_once(
        tmp_path_factory: pytest.TempPathFactory, new_db: NewDb, shape: Shape, plan: list[Crash]) -> None:
    sigkill_and_check(tmp_path_factory, new_db, shape, plan, asynchronous=True)


def sigkill_and_check(tmp_path_factory: pytest.TempPathFactory, new_db: NewDb, shape: Shape, plan: list[Crash],
                      asynchronous: bool = False) -> None:
    tmp = tmp_path_factory.mktemp("kill")
    reference = reference_run(new_db, shape)
    db, effects_file = new_db("jobs"), str(tmp / "effects.log")
    kills = 0
    for crash in [*plan, None]:
        child = spawn(shape, db, effects_file, crash, asynchronous)
        _, err = child.communicate(timeout=120)
        if child.returncode == -signal.SIGKILL:
            kills += 1
        else:
            assert child.returncode == 0, err.decode()
    flow = build(shape, Effects())
    check_invariants(db, flow, 1, reference)
    check_effects(db, shape, 1, Effects(effects_file).read_file())
    TOTALS["sigkill_examples"] += 1
    TOTALS["sigkills"] += kills
