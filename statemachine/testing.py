"""Crash-test your own workflows: fault injection, crash plans and invariant checks.

walstate's own suite is built on this module; applications use it from pytest
to prove that *their* workflow definitions resume exactly once::

    from walstate.testing import crash_test

    def test_registration_survives_crashes(tmp_path):
        report = crash_test(flow, Onboarding(tenant="t1"), tmp_path)  # raises on a violation
        print(report.crashes, report.repeated_effects)   # handlers that should use idempotency_key / once()

:func:`crash_test` runs the workflow crash-free once for reference, then under
Hypothesis-chosen crash plans (one to three crashes, each a fault point and a
hit count): run, crash, drop the engine, open a fresh one on the same file,
``recover()``, and again, then check every invariant. A violation fails with
Hypothesis's minimal plan and the seed that replays it.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from .storage.errors import InjectedCrash, JobFailed
from .storage.faults import POINTS, Crash, Injector, install

from .engine import Engine
from .fsm import STEP
from .workflow import Workflow

__all__ = [
    "POINTS",
    "Crash",
    "CrashReport",
    "Injector",
    "InvariantViolation",
    "Outcome",
    "check_invariants",
    "crash_plans",
    "crash_test",
    "run_with_crashes",
]


class InvariantViolation(AssertionError):
    """A resumed job broke an exactly-once invariant; the message says which and where."""


def crash_plans(points: Sequence[str] = POINTS, max_hit: int = 8, max_crashes: int = 3) -> st.SearchStrategy[list[Crash]]:
    """Hypothesis strategy: one to ``max_crashes`` crashes, each at a fault point's n-th hit."""
    crash = st.builds(Crash, st.sampled_from(list(points)), st.integers(1, max_hit))
    return st.lists(crash, min_size=1, max_size=max_crashes)


@dataclass
class Outcome:
    """What one run under a crash plan did."""

    job_id: int
    state: str
    context: Any
    step_states: dict[str, str]
    crashes: int
    #: How often each step's handler *returned* (its effects completed), over all attempts and restarts.
    completions: Counter[str] = field(default_factory=Counter)


@contextmanager
def _counting(flow: Workflow[Any]) -> Iterator[Counter[str]]:
    """Count handler completions per step by wrapping the handlers for the duration."""
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    originals = dict(flow.steps)
    for name, d in originals.items():
        def wrapped(ctx: Any, step: Any, _fn: Callable[..., Any] = d.fn, _name: str = name) -> Any:
            result = _fn(ctx, step)
            with lock:
                counts[_name] += 1
            return result
        flow.steps[name] = type(d)(**{**d.__dict__, "fn": wrapped})
    try:
        yield counts
    finally:
        flow.steps.clear()
        flow.steps.update(originals)


def run_with_crashes(flow: Workflow[Any], context: BaseModel, path: str, plan: Sequence[Crash] = (),
                     *, workers: int = 1, make_engine: Callable[[str], Engine] | None = None) -> Outcome:
    """Submit one job and run it under ``plan``: each crash kills the run, a fresh engine recovers.

    Crashes that the run never reaches are skipped (the plan only says where
    a crash *may* happen). Returns the final outcome; raises nothing for a
    job that ends failed.
    """
    def engine() -> Engine:
        e = make_engine(path) if make_engine else Engine(path, workers=workers)
        e.register(flow)
        return e

    crashes = 0
    with _counting(flow) as counts:
        e = engine()
        job_id = e.submit(flow.name, context, key="crash-test")
        pending = list(plan)
        first = True
        while True:
            injector = Injector(pending.pop(0)) if pending else None
            if injector is not None:  # with no crash left, leave any counting injector in place
                install(injector)
            try:
                if first:
                    e.run(job_id)
                else:
                    e.recover()
                    if e.status(job_id).state not in ("succeeded", "failed", "cancelled"):
                        e.run(job_id)
            except InjectedCrash:
                crashes += 1
                e.close()
                e = engine()
                first = False
                continue
            except JobFailed:
                pass
            finally:
                if injector is not None:
                    install(None)
            if injector is not None and not injector.fired and pending:
                continue  # this crash was not reached; try the next one on the (finished) run
            break
        status = e.status(job_id)
        e.close()
    return Outcome(job_id, status.state, status.context, {n: s.state for n, s in status.steps.items()},
                   crashes, counts)


def check_invariants(path: str, flow: Workflow[Any], job_id: int, reference: Outcome | None = None) -> None:
    """Check every exactly-once invariant of job ``job_id`` in the file at ``path``.

    Always: the job and every step are terminal; each step's journal is a
    legal path of the sub-step machine with attempts numbered 1, 2, 3… and
    never going down; it succeeded at most once; no step started before every
    step of earlier phases was terminal; ``PRAGMA integrity_check`` is ok.
    With a crash-free ``reference``: the job ends the same way and, when it
    succeeded, with the same context and step states. (When a job fails,
    which parallel siblings ran before the failure was seen depends on timing,
    even without crashes, so only the outcome is compared.)

    Raises :class:`InvariantViolation` naming the broken invariant.
    """
    conn = sqlite3.connect(path)
    try:
        _check(conn, flow, job_id, reference)
    finally:
        conn.close()


def _fail(message: str) -> None:
    raise InvariantViolation(message)


def _check(conn: sqlite3.Connection, flow: Workflow[Any], job_id: int, reference: Outcome | None) -> None:
    if conn.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
        _fail("PRAGMA integrity_check is not ok")
    job_state, context = conn.execute("SELECT state, context FROM walstate_job WHERE id=?", (job_id,)).fetchone()
    if job_state not in ("succeeded", "failed", "cancelled"):
        _fail(f"job {job_id} ended {job_state!r}, not terminal")
    steps = {r[0]: (r[1], r[2], r[3]) for r in conn.execute(
        "SELECT name, phase, state, attempt FROM walstate_step WHERE job_id=?", (job_id,))}
    journal = conn.execute("SELECT id, step, from_state, to_state, attempt FROM walstate_journal "
                           "WHERE job_id=? AND step IS NOT NULL ORDER BY id", (job_id,)).fetchall()
    for name, (phase, state, attempt) in steps.items():
        if state not in STEP.terminal:
            _fail(f"step {name!r} ended {state!r}, not terminal")
        rows = [r for r in journal if r[1] == name]
        path = ["pending"] + [r[3] for r in rows]
        if path[-1] != state:
            _fail(f"step {name!r} is {state!r} but its journal ends at {path[-1]!r}")
        if any(r[2] != p for r, p in zip(rows, path)) or not STEP.is_legal_path(path):
            _fail(f"journal of step {name!r} is not a legal path of the sub-step machine: {path}")
        started = [r[4] for r in rows if r[3] == "running"]
        if started != list(range(1, len(started) + 1)):
            _fail(f"step {name!r}: attempt numbers repeat or skip: {started}")
        attempts = [r[4] for r in rows]
        if attempts != sorted(attempts) or (attempts and attempts[-1] != attempt):
            _fail(f"step {name!r}: attempts go down or disagree with the row: {attempts} vs {attempt}")
        if path.count("succeeded") > 1:
            _fail(f"step {name!r} succeeded more than once")
    # No step of a phase started before every step of the previous phases was terminal.
    order = {p: i for i, p in enumerate(flow.phases)}
    terminal_at: dict[str, int] = {}
    for rid, name, _, to_state, _ in journal:
        if to_state in STEP.terminal:
            terminal_at[name] = rid
    for rid, name, _, to_state, _ in journal:
        if to_state != "running":
            continue
        for other, (phase, _, _) in steps.items():
            if order[phase] < order[steps[name][0]] and terminal_at.get(other, 1 << 62) > rid:
                _fail(f"step {name!r} started before step {other!r} of an earlier phase was terminal")
    if reference is not None:
        if job_state != reference.state:
            _fail(f"job ended {job_state!r}, crash-free run ended {reference.state!r}")
        if reference.state != "succeeded":
            # Which sibling steps got to run before a failure was seen depends on
            # timing, in a crash-free run too; only the outcome is comparable.
            return
        ctx = flow.context.model_validate_json(context).model_dump()
        expected = reference.context.model_dump() if isinstance(reference.context, BaseModel) else reference.context
        if ctx != expected:
            _fail(f"final context differs from a crash-free run: {ctx!r} != {expected!r}")
        final = {n: s[1] for n, s in steps.items()}
        if final != reference.step_states:
            _fail(f"final step states differ from a crash-free run: {final} != {reference.step_states}")


@dataclass
class CrashReport:
    """What :func:`crash_test` ran and found."""

    examples: int = 0
    crashes: int = 0
    #: step -> largest number of times its handler completed in one example (> 1: not effectively once).
    repeated_effects: dict[str, int] = field(default_factory=dict)


def crash_test(flow: Workflow[Any], context: BaseModel, directory: str | os.PathLike[str] | None = None, *,
               max_examples: int | None = None, workers: int = 1, points: Sequence[str] = POINTS,
               max_hit: int = 8) -> CrashReport:
    """Run ``flow`` under Hypothesis-chosen crash plans and check every invariant after each.

    Raises :class:`InvariantViolation` (via Hypothesis, with the minimal plan
    and a seed to replay it) on the first violation. Returns a
    :class:`CrashReport` with counts and the handlers whose effects ran more
    than once (crash between effect and commit): give those
    ``step.idempotency_key`` or ``step.once()``.
    """
    base = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="walstate-crash-"))
    report = CrashReport()
    reference = run_with_crashes(flow, context, str(base / "reference.db"), workers=workers)
    counter = iter(range(1 << 30))

    # None: whatever the active Hypothesis profile says.
    examples = (settings.default.max_examples if settings.default else 100) if max_examples is None else max_examples

    @settings(database=None, max_examples=examples)
    @given(plan=crash_plans(points, max_hit))
    def scenario(plan: list[Crash]) -> None:
        path = str(base / f"run-{next(counter)}.db")
        outcome = run_with_crashes(flow, context, path, plan, workers=workers)
        report.examples += 1
        report.crashes += outcome.crashes
        for name, n in outcome.completions.items():
            if n > 1:
                report.repeated_effects[name] = max(report.repeated_effects.get(name, 0), n)
        check_invariants(path, flow, outcome.job_id, reference)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)

    scenario()
    return report
