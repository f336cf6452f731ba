"""Crash-test your own workflows: fault injection, crash and race plans, invariant checks.

walstate's own suite is built on this module; applications use it from pytest
(directly, or through the ``walstate_crash`` fixture of the pytest plugin) to
prove that *their* workflow definitions resume exactly once::

    from walstate.testing import crash_test

    def test_registration_survives_crashes(tmp_path):
        report = crash_test(flow, Onboarding(tenant="t1"), tmp_path)  # raises on a violation
        print(report.repeated_effects)   # handlers whose unprotected outside effects ran twice

:func:`crash_test` runs the workflow crash-free once for reference, then under
Hypothesis-chosen plans: one to three faults, each a fault point and a hit
count. A :class:`Crash` kills the run there (an exception in-process, or a real
SIGKILL with ``processes=True``); a fresh engine then recovers. A :class:`Race`
starts, at that point, a second ``run()`` of the job, a ``recover()`` from
another engine or process, or an operator's cancel or retry. After each
example every invariant is checked, the context and the application's own
tables are compared with the reference run, and each step's effects are
accounted for. A violation fails with Hypothesis's minimal plan and the seed
that replays it.

Every file the harness makes (reference and examples) has the same database
id, so steps get the same ``idempotency_key`` in every run: a context holding
ids that an idempotent outside service returned for that key compares equal.

Not yet covered (they land with the job runtime): examples run through
``Engine.run``/``recover``, not through a worker; durable waits (signals at
chosen moments, timers on an injected clock) and async handlers. The hooks
for them are :class:`Race` (a new action per runtime entry point) and
``make_engine``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st
except ImportError as exc:  # walstate installed without its testing extra
    raise ModuleNotFoundError(
        f"walstate.testing (crash_test, the walstate_crash fixture) needs Hypothesis, which is not installed "
        f"({exc}); install it with walstate: pip install 'walstate[testing]'", name="hypothesis") from exc
from pydantic import BaseModel

from .storage.contract import connect_raw, is_postgres_url, open_store
from .storage.errors import (
    ConfigurationError,
    EngineClosed,
    InjectedCrash,
    InvalidTransition,
    JobCancelled,
    JobFailed,
    JobOwned,
    LeaseLost,
    StaleState,
    UsageError,
)
from .storage.faults import POINTS, Crash, Injector, install

from .context import StepContext, Suspend
from .aio import AsyncStepContext
from .engine import Engine
from .fsm import STEP
from .substep import RunAborted
from .workflow import Workflow

__all__ = [
    "DATABASE_ID",
    "POINTS",
    "RACES",
    "Attempt",
    "Crash",
    "CrashReport",
    "Fault",
    "Injector",
    "InvariantViolation",
    "Outcome",
    "Race",
    "check_invariants",
    "connect",
    "crash_plans",
    "single_crashes",
    "crash_test",
    "run_with_crashes",
]

T = TypeVar("T")

#: The database id of every file the harness makes: steps' idempotency keys are ``crash-test:<job>:<step>``.
DATABASE_ID = "crash-test"

#: What a :class:`Race` can start at a fault point.
RACES: tuple[str, ...] = ("run", "recover", "recover_process", "cancel", "retry", "worker")

RaceAction = Literal["run", "recover", "recover_process", "cancel", "retry", "worker"]


class InvariantViolation(AssertionError):
    """A resumed job broke an exactly-once invariant; the message says which, where, and under which plan."""


@dataclass(frozen=True)
class Race:
    """At the ``nth`` hit of fault point ``point``, start ``action`` beside the run, in another thread.

    ``"run"``: a second ``run()`` of the same job on the same engine.
    ``"recover"``: ``recover()`` from another engine of this process.
    ``"recover_process"``: ``recover()`` from another process (the workflow
    must be importable: see :func:`crash_test`). ``"cancel"``: an operator's
    ``Engine.cancel``; once the job has ended cancelled, the harness retries
    it (``Engine.retry``) and runs it to its end, as an operator would.
    ``"retry"``: an operator's ``Engine.retry`` while the job runs (refused;
    it must disturb nothing). ``"worker"``: a worker of another engine of this
    process (the job runtime) that claims whatever it may, until the job
    ends. The run does not wait for the racer, except for it to start.
    """

    action: RaceAction
    point: str
    nth: int

    def __post_init__(self) -> None:
        if self.action not in RACES:
            raise ValueError(f"unknown race {self.action!r}; known: {', '.join(RACES)}")
        if self.point not in POINTS:
            raise ValueError(f"unknown fault point {self.point!r}; known: {', '.join(POINTS)}")
        if self.nth < 1:
            raise ValueError("nth counts hits from 1")


Fault = Union[Crash, Race]


def crash_plans(points: Sequence[str] = POINTS, max_hit: int = 8, max_crashes: int = 3,
                races: Sequence[str] = ()) -> st.SearchStrategy[list[Fault]]:
    """Hypothesis strategy: one to ``max_crashes`` faults, each at a fault point's n-th hit.

    With ``races`` (names from :data:`RACES`), a fault is a :class:`Crash` or
    a :class:`Race` of one of those actions.
    """
    crash: st.SearchStrategy[Fault] = st.builds(Crash, st.sampled_from(list(points)), st.integers(1, max_hit))
    if races:
        race = st.builds(Race, st.sampled_from(list(races)), st.sampled_from(list(points)), st.integers(1, max_hit))
        crash = st.one_of(crash, race)
    return st.lists(crash, min_size=1, max_size=max_crashes)


def single_crashes(hits: Mapping[str, int], max_hit: int = 8) -> list[list[Fault]]:
    """One plan per reachable position: a single :class:`Crash` at each point's 1st..n-th hit (n capped at ``max_hit``).

    ``hits`` is how often a crash-free run reached each point (an
    :class:`Injector`'s ``hits``); points are taken in :data:`POINTS` order.
    """
    return [[Crash(point, nth)] for point in POINTS for nth in range(1, min(hits.get(point, 0), max_hit) + 1)]


# -- effect accounting ------------------------------------------------------------


@dataclass
class Attempt:
    """One call of a step's handler, as the harness's wrapper saw it."""

    step: str
    attempt: int
    start: float                 # time.monotonic(): one clock for every process of the machine
    end: float | None = None     # None: the handler never returned (the process was killed in it)
    completed: bool = False      # the handler returned (its effects are done) rather than raised
    once_used: bool = False      # it called step.once()
    once_calls: int = 0          # ... and this many once() functions actually ran
    keyed: bool = False          # it read step.idempotency_key (reading alone protects nothing)
    pid: int = 0
    suspended: bool = False      # it suspended in a durable wait (the code before the wait ran)
    key_passed: bool = False     # it passed the key, as an argument, to a function call (see _KeyWatch)


class _Ledger:
    """Where handler attempts are written: in memory, or appended to a file (child processes)."""

    def __init__(self, file: str | None = None) -> None:
        self.file = file
        self.attempts: list[Attempt] = []
        self._lock = threading.Lock()

    def enter(self, step: str, attempt: int) -> Attempt:
        rec = Attempt(step, attempt, time.monotonic(), pid=os.getpid())
        with self._lock:
            self.attempts.append(rec)
        return rec

    def exit(self, rec: Attempt, completed: bool) -> None:
        rec.end = time.monotonic()
        rec.completed = completed
        if self.file:
            # One write() to an O_APPEND file: in the kernel at once, so a SIGKILL
            # right after cannot lose it (only a power cut could).
            line = json.dumps(rec.__dict__) + "\n"
            fd = os.open(self.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def load(self) -> list[Attempt]:
        """Attempts written to the file by any process (killed attempts are missing)."""
        if not self.file or not os.path.exists(self.file):
            return list(self.attempts)
        with open(self.file) as f:
            return [Attempt(**json.loads(line)) for line in f if line.strip()]


_KEY = StepContext.__dict__["idempotency_key"]

#: Calls into these are not "passing the key to an effect": walstate itself, and logging it.
_NOT_EFFECTS = tuple(os.path.dirname(m.__file__ or "") + os.sep for m in (sys.modules["walstate"], logging))
_RESUMABLE = inspect.CO_COROUTINE | inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE


def _holds(value: Any, key: str, depth: int = 2) -> bool:
    if value is key:
        return True
    if depth and isinstance(value, dict):
        return any(_holds(v, key, depth - 1) for v in value.values())
    if depth and isinstance(value, (list, tuple, set)):
        return any(_holds(v, key, depth - 1) for v in value)
    return False


class _KeyWatch:
    """What the harness can see protecting an effect: the step's key passed to a function call.

    While a handler runs, a profile hook (its thread only) looks at the
    arguments of every Python function the handler calls, directly or deeper,
    outside walstate and ``logging``: the key object itself, or in a dict,
    list or tuple argument (two levels deep), counts as passed. Only reading
    the key, logging it, formatting it into another string or closing over it
    does not: the harness cannot see it reach the effect. (A key handed only
    to a C function is not seen either: give it to your client's Python API.)
    """

    def __init__(self, rec: Attempt, key: str) -> None:
        self.rec = rec
        self.key = key

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event != "call":
            return
        code = frame.f_code
        if code.co_filename.startswith(_NOT_EFFECTS) or (code.co_flags & _RESUMABLE and frame.f_lasti > 0):
            return  # walstate or logging, or a coroutine resuming (its locals are not arguments)
        if self.rec.key_passed:
            return  # nothing more to learn
        n = code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & inspect.CO_VARARGS) + bool(
            code.co_flags & inspect.CO_VARKEYWORDS)
        local = frame.f_locals
        if any(_holds(local.get(name), self.key) for name in code.co_varnames[:n]):
            self.rec.key_passed = True

    @contextmanager
    def watching(self) -> Iterator[None]:
        previous = sys.getprofile()
        sys.setprofile(self._profile)
        try:
            yield
        finally:
            sys.setprofile(previous)


class _Observed(StepContext):
    """The StepContext a wrapped handler sees: it notes once() calls, reads of idempotency_key and passes of it."""

    __slots__ = ("_rec", "_watch")
    _rec: Attempt
    _watch: _KeyWatch

    @property
    def idempotency_key(self) -> str:
        self._rec.keyed = True
        key: str = _KEY.__get__(self, StepContext)
        return key

    @idempotency_key.setter
    def idempotency_key(self, value: str) -> None:
        _KEY.__set__(self, value)

    def once(self, name: str, fn: Callable[[], T]) -> T:
        if name.startswith("__walstate_"):  # a durable wait's own record, not an effect
            return super().once(name, fn)
        self._rec.once_used = True

        def counted() -> T:
            self._rec.once_calls += 1
            return fn()

        return super().once(name, counted)


def _observe(step: StepContext, rec: Attempt) -> _Observed:
    obs = object.__new__(_Observed)
    # Every slot of the runner's StepContext, whatever slots later versions add.
    for name in StepContext.__slots__:
        descriptor = StepContext.__dict__[name]
        try:
            descriptor.__set__(obs, descriptor.__get__(step, StepContext))
        except AttributeError:
            pass  # a slot the runner left unset
    obs._rec = rec
    obs._watch = _KeyWatch(rec, _KEY.__get__(step, StepContext))
    return obs


@contextmanager
def _observing(flow: Workflow[Any], ledger: _Ledger) -> Iterator[_Ledger]:
    """Wrap every handler of ``flow`` to note its attempts in ``ledger``, for the duration."""
    originals = dict(flow.steps)
    for name, d in originals.items():
        def wrapped(ctx: Any, step: StepContext, _fn: Callable[..., Any] = d.fn, _name: str = name) -> Any:
            rec = ledger.enter(_name, step.attempt)
            obs = _observe(step, rec)
            try:
                with obs._watch.watching():
                    result = _fn(ctx, obs)
            except BaseException as exc:
                rec.suspended = isinstance(exc, Suspend)
                ledger.exit(rec, completed=False)
                raise
            ledger.exit(rec, completed=True)
            return result
        async def awrapped(ctx: Any, step: AsyncStepContext, _fn: Callable[..., Any] = d.fn,
                           _name: str = name) -> Any:
            rec = ledger.enter(_name, step.attempt)
            obs = _observe(step._sc, rec)
            try:
                # The attempt's event loop runs this task alone, in this thread: the hook sees its calls.
                with obs._watch.watching():
                    result = await _fn(ctx, AsyncStepContext(obs))
            except BaseException as exc:
                rec.suspended = isinstance(exc, Suspend)
                ledger.exit(rec, completed=False)
                raise
            ledger.exit(rec, completed=True)
            return result

        flow.steps[name] = type(d)(**{**d.__dict__, "fn": awrapped if d.is_async else wrapped})
    try:
        yield ledger
    finally:
        flow.steps.clear()
        flow.steps.update(originals)


# -- one example ------------------------------------------------------------------


@dataclass
class Outcome:
    """What one run under a plan did."""

    job_id: int
    state: str
    context: Any
    step_states: dict[str, str]
    crashes: int
    #: How often each step's handler *returned* (its effects completed), over all attempts and restarts.
    completions: Counter[str] = field(default_factory=Counter)
    #: Every handler call, with its timing and how its effects were protected.
    attempts: list[Attempt] = field(default_factory=list)
    #: Races started (the plan's Race faults that were reached).
    races: int = 0
    #: Errors racers raised that no correct run raises (each is a violation).
    race_errors: list[str] = field(default_factory=list)
    plan: tuple[Fault, ...] = ()


def _new_file(path: str, database_id: str | None, template: str | None = None) -> None:
    """Make the walstate file at ``path`` with ``database_id`` (a copy of ``template`` when given)."""
    if database_id is None or (not is_postgres_url(path) and os.path.exists(path)):
        return
    if template is not None and not is_postgres_url(path):
        shutil.copyfile(template, path)  # a closed file without a -wal: the copy is the whole database
        return
    open_store(path, database_id=database_id, sync_interval=None).close()


def connect(target: str, timeout: float = 5.0) -> Any:
    """A plain connection to the walstate database at ``target`` (a SQLite path or a ``postgresql://`` URL).

    It has sqlite3's ``execute(sql, params)`` (``?`` placeholders on both
    backends), ``fetchone``/``fetchall`` on what that returns, and ``close()``:
    for checks that look at the tables themselves, as :func:`check_invariants` does.
    Autocommit on PostgreSQL; on SQLite, sqlite3's defaults.
    """
    return connect_raw(target, timeout)


#: Errors a racer may meet in a correct run: refusals, and the ends of the job.
_EXPECTED = (JobFailed, JobCancelled, JobOwned, EngineClosed, LeaseLost, InvalidTransition, StaleState, UsageError,
             InjectedCrash, RunAborted)


class _PlanInjector(Injector):
    """Fires a plan's faults in order; hits are counted from the last fault fired (or the last restart)."""

    def __init__(self, faults: Sequence[Fault], on_race: Callable[[Race], None]) -> None:
        super().__init__(None)
        self.pending = list(faults)
        self.on_race = on_race

    def restart(self) -> None:
        with self._lock:
            self.hits.clear()

    def hit(self, name: str) -> None:
        with self._lock:
            self.hits[name] += 1
            fault = self.pending[0] if self.pending else None
            fire = fault is not None and fault.point == name and self.hits[name] == fault.nth
            if fire:
                self.pending.pop(0)
                self.hits.clear()
        if not fire:
            return
        if isinstance(fault, Race):
            self.on_race(fault)
            return
        assert fault is not None
        raise InjectedCrash(name, fault.nth)


class _Racers:
    """The threads a plan's races started, and what they met."""

    def __init__(self, flow: Workflow[Any], path: str, job_id: int, engine: Callable[[], Engine],
                 make_engine: Callable[[], Engine], child: Callable[..., subprocess.Popen[bytes]] | None) -> None:
        self.flow, self.path, self.job_id = flow, path, job_id
        self.current = engine
        self.make_engine = make_engine
        self.child = child
        self.threads: list[threading.Thread] = []
        self.errors: list[str] = []
        self.cancelled = False
        self._lock = threading.Lock()

    def start(self, race: Race) -> None:
        engine = self.current()
        started = threading.Event()

        def body() -> None:
            started.set()
            try:
                self._act(race, engine)
            except _EXPECTED:
                pass
            except BaseException as exc:  # noted, and reported as a violation once the example ends
                with self._lock:
                    self.errors.append(f"{race}: {type(exc).__name__}: {exc}")

        thread = threading.Thread(target=body, name=f"walstate-race-{race.action}", daemon=True)
        self.threads.append(thread)
        thread.start()
        started.wait()

    def _act(self, race: Race, engine: Engine) -> None:
        if race.action == "run":
            engine.run(self.job_id)
        elif race.action == "recover":
            other = self.make_engine()
            try:
                other.recover()
            finally:
                other.close()
        elif race.action == "recover_process":
            if self.child is None:
                raise ConfigurationError("a recover_process race needs an importable workflow")
            proc = self.child("recover")
            _, err = proc.communicate(timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"the recovering process exited {proc.returncode}: {err.decode()[-2000:]}")
        elif race.action == "cancel":
            self.cancelled = True
            engine.cancel(self.job_id)
        elif race.action == "retry":
            engine.retry(self.job_id)
        elif race.action == "worker":
            other = self.make_engine()
            try:
                with other.start_worker(1, poll=0.005):
                    deadline = time.monotonic() + 10
                    while other.status(self.job_id).state not in ("succeeded", "failed", "cancelled"):
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.005)
            finally:
                other.close()

    def join(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                self.errors.append(f"{thread.name} did not finish within {timeout:g}s")


class _Clock:
    """The wall clock of a crash-test run's engines, which the harness moves forward past timers.

    It follows real time plus an offset; a durable sleep is made due by
    advancing the offset, so a crash test never sleeps.
    """

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance_to(self, when: float) -> None:
        self.offset += max(0.0, when - self())


def _drive_waits(e: Engine, job_id: int, messages: Mapping[str, Any], clock: _Clock) -> bool:
    """A parked job: send the message each waiting step waits for, or move the clock to its wake-up.

    Returns whether anything was done (so the job can go on). Messages are
    sent with a fixed key per topic, so sending again after a crash stores nothing.
    """
    moved = False
    for step in e.store.steps(job_id):
        if step.state != "waiting":
            continue
        if step.wait_topic is not None and step.wait_topic in messages:
            e.send(job_id, step.wait_topic, messages[step.wait_topic], key=f"crash-test:{step.wait_topic}")
            moved = True
        elif step.wake_at is not None and step.wake_at != float("inf"):
            clock.advance_to(step.wake_at)
            moved = True
    return moved


def run_with_crashes(flow: Workflow[Any], context: BaseModel, path: str, plan: Sequence[Fault] = (),
                     *, workers: int = 1, make_engine: Callable[[str], Engine] | None = None,
                     database_id: str | None = DATABASE_ID, template: str | None = None,
                     flow_spec: str | None = None, messages: Mapping[str, Any] | None = None) -> Outcome:
    """Submit one job and run it under ``plan``: each crash kills the run, a fresh engine recovers.

    Faults that the run never reaches are skipped (the plan only says where a
    fault *may* happen). A new file at ``path`` gets ``database_id`` (see
    :data:`DATABASE_ID`). Returns the final outcome; raises nothing for a job
    that ends failed. ``flow_spec`` (``"module:attr"``) is needed for
    ``recover_process`` races only.

    Durable waits: when the job parks, a step waiting for a topic of
    ``messages`` is sent that message (once per topic), and a sleeping step's
    wake-up time is reached by moving the run's clock forward (no real sleep).
    """
    _new_file(path, database_id, template)
    clock = _Clock()
    messages = dict(messages or {})

    def engine() -> Engine:
        e = make_engine(path) if make_engine else Engine(path, workers=workers, sync_interval=None, clock=clock)
        e.register(flow)
        return e

    crashes = 0
    with _observing(flow, _Ledger()) as ledger:
        e = engine()
        job_id = e.submit(flow.name, context, key="crash-test")
        child = None
        if flow_spec is not None:
            child = _child_launcher(flow_spec, context, path, workers, database_id, None)
        racers = _Racers(flow, path, job_id, lambda: e, engine, child)
        injector = _PlanInjector(plan, racers.start)
        if plan:  # with no plan, leave any counting injector of the caller in place
            install(injector)
        first = True
        try:
            while True:
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
                    injector.restart()
                    e = engine()
                    first = False
                    continue
                except (JobFailed, JobCancelled, JobOwned, EngineClosed, LeaseLost):
                    # JobOwned/EngineClosed/LeaseLost: a racer holds or took the job; settled below.
                    pass
                if (e.status(job_id).state not in ("succeeded", "failed", "cancelled")
                        and _drive_waits(e, job_id, messages, clock)):
                    first = False
                    continue  # parked: its waits are now due; run it again (through recovery)
                break
        finally:
            if plan:
                install(None)
        racers.join()
        e = _settle(e, engine, job_id, racers, lambda e: _drive_waits(e, job_id, messages, clock))
        status = e.status(job_id)
        e.close()
    return Outcome(job_id, status.state, status.context, {n: s.state for n, s in status.steps.items()},
                   crashes, Counter(a.step for a in ledger.attempts if a.completed), list(ledger.attempts),
                   len(racers.threads), racers.errors, tuple(plan))


def _settle(e: Engine, engine: Callable[[], Engine], job_id: int, racers: _Racers,
            drive: Callable[[Engine], bool] = lambda e: False) -> Engine:
    """With every racer done: the operator retries a job their cancel ended, and an unfinished job is recovered."""
    retried = False
    for _ in range(20):
        state = e.status(job_id).state
        # A cancel cut short by a crash leaves the job failed (its steps cancelled) rather than
        # cancelled: the operator retries it all the same.
        if state in ("cancelled", "failed") and racers.cancelled and not retried:
            retried = True
            e.retry(job_id)
        elif state in ("succeeded", "failed", "cancelled"):
            return e
        else:
            # A racer crashed or closed its run, or the job parked: as after any crash, a
            # fresh engine recovers it (its waits made due first).
            e.close()
            e = engine()
            drive(e)
            e.recover()
        try:
            e.run(job_id)
        except (JobFailed, JobCancelled):
            pass
    return e


# -- real kills -------------------------------------------------------------------


def flow_spec(flow: Workflow[Any] | str) -> str:
    """The ``"module:attr"`` a child process imports ``flow`` by.

    The rule: a workflow crash-tested with ``processes=True`` (or a
    ``recover_process`` race) is either given as ``"module:attr"`` or is a
    module-level name of the module its handlers are defined in, and that
    module is importable by the child (it gets this process's ``sys.path``
    and working directory). Raises ConfigurationError otherwise.
    """
    if isinstance(flow, str):
        return flow
    for d in flow.steps.values():
        module_name = getattr(d.fn, "__module__", None)
        module = sys.modules.get(module_name or "")
        if module is None or module_name == "__main__":
            continue
        for attr, value in vars(module).items():
            if value is flow:
                return f"{module_name}:{attr}"
    raise ConfigurationError(
        f"workflow {flow.name!r} cannot be imported by a child process: define it at module level of an importable "
        "module (where its handlers are), or pass it as 'module:attr'")


def load_flow(spec: str) -> Workflow[Any]:
    """Import the workflow named by ``"module:attr"``."""
    module_name, _, attr = spec.partition(":")
    flow = getattr(importlib.import_module(module_name), attr, None)
    if not isinstance(flow, Workflow):
        raise ConfigurationError(f"{spec!r} does not name a Workflow (expected 'module:attr')")
    return flow


def _child_launcher(spec: str, context: BaseModel, path: str, workers: int, database_id: str | None,
                    ledger: str | None, messages: Mapping[str, Any] | None = None
                    ) -> Callable[..., subprocess.Popen[bytes]]:
    def launch(action: str, kill_at: Crash | None = None) -> subprocess.Popen[bytes]:
        args = {"flow": spec, "context": context.model_dump_json(), "path": path, "workers": workers,
                "action": action, "ledger": ledger, "kill_at": [kill_at.point, kill_at.nth] if kill_at else None,
                "messages": dict(messages or {})}
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        return subprocess.Popen([sys.executable, "-m", "walstate._crash_child", json.dumps(args)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return launch


def run_in_processes(flow: Workflow[Any], context: BaseModel, path: str, plan: Sequence[Crash], *, spec: str,
                     workers: int = 1, database_id: str | None = DATABASE_ID, template: str | None = None,
                     messages: Mapping[str, Any] | None = None) -> Outcome:
    """Run the job in child processes, SIGKILLing each at its crash of ``plan``; a last child finishes it.

    Each child drives the job's durable waits as :func:`run_with_crashes` does (``messages`` sent,
    sleeps reached by moving its clock), so a waiting job ends as it would crash-free.
    """
    _new_file(path, database_id, template)
    ledger_file = path + ".attempts"
    launch = _child_launcher(spec, context, path, workers, database_id, ledger_file, messages)
    crashes = 0
    for crash in [*plan, None]:
        child = launch("run", crash)
        _, err = child.communicate(timeout=300)
        if child.returncode == -9:
            crashes += 1
        elif child.returncode != 0:
            raise RuntimeError(f"crash-test child exited {child.returncode}: {err.decode()[-4000:]}")
    with Engine(path, workers=workers, sync_interval=None) as e:
        e.register(flow)
        status = e.status(1)
    attempts = _Ledger(ledger_file).load()
    return Outcome(1, status.state, status.context, {n: s.state for n, s in status.steps.items()}, crashes,
                   Counter(a.step for a in attempts if a.completed), attempts, 0, [], tuple(plan))


# -- invariants -------------------------------------------------------------------


def check_invariants(path: str, flow: Workflow[Any], job_id: int, reference: Outcome | None = None, *,
                     compare: Sequence[str] | Callable[[Any, Any], bool] | None = None) -> None:
    """Check every exactly-once invariant of job ``job_id`` in the file at ``path``.

    Always: the job and every step are terminal; each step's journal is a
    legal path of the sub-step machine with attempts numbered 1, 2, 3… and
    never going down; it succeeded at most once; no step started before every
    step of earlier phases was terminal; ``PRAGMA integrity_check`` is ok.
    With a crash-free ``reference``: the job ends the same way and, when it
    succeeded, with the same context and step states. (When a job fails,
    which parallel siblings ran before the failure was seen depends on timing,
    even without crashes, so only the outcome is compared.) ``compare`` names
    the context fields to compare (the others are known to differ), or is a
    function ``(context, reference_context) -> bool`` given both models.

    Raises :class:`InvariantViolation` naming the broken invariant.
    """
    conn = connect(path)
    try:
        _check(conn, flow, job_id, reference, compare, sqlite=not is_postgres_url(path))
    finally:
        conn.close()


def _fail(message: str) -> None:
    raise InvariantViolation(message)


def _check(conn: Any, flow: Workflow[Any], job_id: int, reference: Outcome | None,
           compare: Sequence[str] | Callable[[Any, Any], bool] | None, sqlite: bool = True) -> None:
    if sqlite and conn.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
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
    # No step of a phase started while a step of an earlier phase was not terminal
    # (its state at that moment: an operator's retry requeues steps and starts the phases over).
    order = {p: i for i, p in enumerate(flow.phases)}
    current: dict[str, str] = {name: "pending" for name in steps}
    for rid, name, _, to_state, _ in journal:
        if to_state == "running":
            for other, (phase, _, _) in steps.items():
                if order[phase] < order[steps[name][0]] and current[other] not in STEP.terminal:
                    _fail(f"step {name!r} started (journal row {rid}) while step {other!r} of an earlier phase was "
                          f"{current[other]!r}")
        current[name] = to_state
    if reference is not None:
        if job_state != reference.state:
            _fail(f"job ended {job_state!r}, crash-free run ended {reference.state!r}")
        if reference.state != "succeeded":
            # Which sibling steps got to run before a failure was seen depends on
            # timing, in a crash-free run too; only the outcome is comparable.
            return
        got = flow.context.model_validate_json(context)
        expected = reference.context
        if callable(compare):
            if not compare(got, expected):
                _fail(f"final context differs from a crash-free run (by compare=): {got!r} != {expected!r}")
        else:
            ctx = got.model_dump()
            ref = expected.model_dump() if isinstance(expected, BaseModel) else dict(expected)
            if compare is not None:
                ctx = {k: v for k, v in ctx.items() if k in compare}
                ref = {k: v for k, v in ref.items() if k in compare}
            if ctx != ref:
                diff = {k: (ctx.get(k), ref.get(k)) for k in set(ctx) | set(ref) if ctx.get(k) != ref.get(k)}
                _fail(f"final context differs from a crash-free run: {diff} (field: (this run, crash-free run)); "
                      "pass compare= for fields known to differ")
        final = {n: s[1] for n, s in steps.items()}
        if final != reference.step_states:
            _fail(f"final step states differ from a crash-free run: {final} != {reference.step_states}")


def check_overlaps(attempts: Sequence[Attempt]) -> None:
    """No two calls of one step's handler ran at the same time (a race let two executions in)."""
    by_step: dict[str, list[Attempt]] = {}
    for a in attempts:
        by_step.setdefault(a.step, []).append(a)
    for step, calls in by_step.items():
        calls.sort(key=lambda a: a.start)
        for before, after in zip(calls, calls[1:]):
            if before.end is not None and after.start < before.end:
                _fail(f"two attempts of step {step!r} overlapped in time: attempt {before.attempt} "
                      f"(pid {before.pid}) was still running when attempt {after.attempt} (pid {after.pid}) started")


def app_rows(path: str, tables: Sequence[str] | None = None) -> dict[str, Counter[tuple[Any, ...]]]:
    """Every row of the application's tables (all but walstate's and SQLite's own, or ``tables``), as multisets."""
    conn = connect(path)
    try:
        if is_postgres_url(path):
            names = [r[0] for r in conn.execute("SELECT table_name FROM information_schema.tables WHERE "
                                                "table_schema = current_schema() ORDER BY table_name").fetchall()]
        else:
            names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        if tables is None:
            names = [n for n in names if not n.startswith(("walstate_", "sqlite_"))]
        else:
            names = [n for n in names if n in tables]
        # Table names come from sqlite_master; quoted as identifiers, never as values.
        return {n: Counter(conn.execute('SELECT * FROM "' + n.replace('"', '""') + '"').fetchall()) for n in names}
    finally:
        conn.close()


def check_rows(rows: Mapping[str, Counter[tuple[Any, ...]]], reference: Mapping[str, Counter[tuple[Any, ...]]],
               outcome: Outcome, flow: Workflow[Any]) -> None:
    """The application's rows equal the crash-free run's: none doubled, none missing."""
    for table in sorted(set(rows) | set(reference)):
        got, want = rows.get(table, Counter()), reference.get(table, Counter())
        extra, missing = got - want, want - got
        if not extra and not missing:
            continue
        diff = list(extra) + list(missing)
        named = sorted({s for s in flow.steps for row in diff for v in row
                        if isinstance(v, str) and (v == s or v.endswith(f":{s}"))})
        runs = Counter(a.step for a in _runs(outcome.attempts))
        repeated = sorted(s for s, n in runs.items() if n > 1 and not flow.steps[s].transactional)
        who = (f"written by step {', '.join(map(repr, named))}" if named else
               f"the step cannot be told from the rows; non-transactional steps that ran more than once (a resume "
               f"after a wait runs the code before it again): {repeated}")
        counts = [f"{sum(extra.values())} row(s) more" + (f" {dict(extra)}" if extra else ""),
                  f"{sum(missing.values())} row(s) missing" + (f" {dict(missing)}" if missing else "")]
        _fail(f"table {table!r} differs from the crash-free run: {', '.join(counts)}; {who}; "
              "make the writing step transactional=True (or its writes idempotent)")


# -- the report -------------------------------------------------------------------


@dataclass
class StepEffects:
    """How one step's effects fared over every example."""

    invocations: int = 0          # handler calls, over all examples
    most_completions: int = 0     # most times its handler returned in one example
    most_runs: int = 0            # most times its handler returned or suspended in a wait in one example
    protection: str = "none"      # "transactional", "idempotency_key", "once" or "none" (as last seen repeated)
    once_calls: int = 0           # most times once() functions actually ran in one example


@dataclass
class CrashReport:
    """What :func:`crash_test` ran and found.

    A *run* of a step is a handler call that returned or suspended in a
    durable wait: either way the code it went through (before the wait) did
    its effects. What the harness counts as protecting a repeated run's
    outside effects is what it can see: ``transactional=True`` (the repeated
    writes rolled back), the step's ``idempotency_key`` passed as an argument
    to a function call (``"idempotency_key"``: the service that gets it can
    recognise the repeat; merely reading, logging or formatting the key does
    not count), or ``step.once()`` (``"once"``: it does not call again what it
    recorded, but calls again when the process dies between the call and its
    record, so strict mode wants the key passed too).
    """

    examples: int = 0
    crashes: int = 0
    races: int = 0
    #: step -> largest number of runs in one example, for steps that ran more often than in the crash-free
    #: run with *no* protection (not transactional, no once(), the key never passed): their outside effects
    #: ran that many times.
    repeated_effects: dict[str, int] = field(default_factory=dict)
    #: step -> the plan of the example that showed its largest unprotected repeat (replay it with plans=).
    repeat_plans: dict[str, tuple[Fault, ...]] = field(default_factory=dict)
    #: Per step: invocations and how repeats were absorbed (transactional rollback, idempotency key, once()).
    steps: dict[str, StepEffects] = field(default_factory=dict)
    #: step -> runs in the crash-free reference run, for steps that ran more than once there with their
    #: effects not protected by a transaction or the key: the code before a durable wait runs again on every
    #: resume, crash or not, so an effect there (a counter bumped, a row inserted, a mail sent) repeats in
    #: every run and the reference itself holds it twice. (A step whose code before the wait does nothing
    #: shows here too, harmlessly.)
    reruns: dict[str, int] = field(default_factory=dict)
    #: Steps that called step.once() without passing their idempotency_key to a function call (strict fails).
    once_without_key: list[str] = field(default_factory=list)


def _runs(calls: Sequence[Attempt]) -> list[Attempt]:
    """The calls that did their effects: returned, or suspended in a wait (the code before it ran)."""
    return [a for a in calls if a.completed or a.suspended]


def _protection(transactional: bool, runs: Sequence[Attempt]) -> str:
    if transactional:
        return "transactional"  # the repeated attempts' writes rolled back with them
    if all(a.key_passed for a in runs):
        return "idempotency_key"
    if all(a.once_used or a.key_passed for a in runs):
        return "once"
    return "none"


def _reruns(flow: Workflow[Any], outcome: Outcome) -> dict[str, int]:
    """Steps that ran more than once in a crash-free ``outcome`` with effects no transaction or key protects."""
    out = {}
    for name, d in flow.steps.items():
        runs = _runs([a for a in outcome.attempts if a.step == name])
        if len(runs) > 1 and _protection(d.transactional, runs) not in ("transactional", "idempotency_key"):
            out[name] = len(runs)
    return out


def _account(report: CrashReport, flow: Workflow[Any], outcome: Outcome,
             baseline: Mapping[str, int] | None = None) -> list[str]:
    """Add one example's attempts to ``report``; return the steps whose unprotected effects repeated.

    ``baseline``: each step's runs in the crash-free run (a step that waits runs again on each resume);
    a step repeated when it ran more often than that (and more than once).
    """
    unprotected = []
    for name, d in flow.steps.items():
        calls = [a for a in outcome.attempts if a.step == name]
        done = [a for a in calls if a.completed]
        runs = _runs(calls)
        acc = report.steps.setdefault(name, StepEffects())
        acc.invocations += len(calls)
        acc.once_calls = max(acc.once_calls, sum(a.once_calls for a in calls))
        acc.most_completions = max(acc.most_completions, len(done))
        acc.most_runs = max(acc.most_runs, len(runs))
        if any(a.once_used and not a.key_passed for a in calls) and name not in report.once_without_key:
            report.once_without_key.append(name)
        if len(runs) <= max(1, (baseline or {}).get(name, 1)):
            continue
        acc.protection = _protection(d.transactional, runs)
        if acc.protection == "none":
            unprotected.append(name)
            if len(runs) > report.repeated_effects.get(name, 0):
                report.repeated_effects[name] = len(runs)
                report.repeat_plans[name] = outcome.plan
    return unprotected


def _clean(path: str) -> None:
    for suffix in ("", "-wal", "-shm", ".attempts"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)


def crash_test(flow: Workflow[Any] | str, context: BaseModel, directory: str | os.PathLike[str] | None = None, *,
               max_examples: int | None = None, workers: int = 1, points: Sequence[str] = POINTS,
               max_hit: int = 8, races: Sequence[str] | None = None, processes: bool = False,
               compare: Sequence[str] | Callable[[Any, Any], bool] | None = None,
               tables: Sequence[str] | None = None, strict: bool = False,
               plans: Sequence[Sequence[Fault]] | None = None, seed: int | None = None,
               database_id: str = DATABASE_ID, messages: Mapping[str, Any] | None = None) -> CrashReport:
    """Run ``flow`` under Hypothesis-chosen crash and race plans and check every invariant after each.

    ``messages`` maps a topic to the payload sent when a step waits for it
    (``step.wait_for``); durable sleeps are reached by moving the run's clock,
    so waiting workflows are crash-tested without sleeping.

    The first examples (up to three quarters of ``max_examples``) are one
    crash at each position the crash-free run reaches (each fault point's
    1st, 2nd, ... hit; see :func:`single_crashes`), so what a single crash
    breaks is found on every run; the rest are Hypothesis's plans of one to
    three faults, crashes and races.

    ``flow`` is a :class:`Workflow` or its ``"module:attr"``. Each example
    checks :func:`check_invariants` against a crash-free reference run (same
    database id, so the same idempotency keys; ``compare`` limits the context
    comparison), that the application's tables (every table not named
    ``walstate_*``, or only ``tables``) hold the same rows as after the
    reference run, that no two attempts of a step overlapped in time, and that
    no racer met an error a correct run never raises.

    ``races`` (default: every race of :data:`RACES`, but ``recover_process``
    only when the workflow is importable; ``()`` for crashes only).
    ``processes=True`` runs every attempt in a child process and SIGKILLs it at
    its crash point (plans are then crashes only; each child sends ``messages``
    and moves its clock past sleeps as the in-process runs do, so waiting
    workflows end as they would crash-free); the workflow must be
    importable (see :func:`flow_spec` for the rule). ``plans`` runs exactly
    these plans instead of Hypothesis's (how a failure is replayed); ``seed``
    fixes Hypothesis's seed. ``max_examples=None`` takes the active Hypothesis
    profile's.

    Raises :class:`InvariantViolation` (via Hypothesis, with the minimal plan
    and a seed to replay it) on the first violation, and with ``strict`` also
    when a step's outside effects repeated unprotected, or a step calls
    ``step.once()`` without passing its key to a call. Returns a
    :class:`CrashReport` (see there what the harness counts as protection):
    ``repeated_effects`` names the steps that ran more often than in the
    crash-free run with no protection (not transactional, no ``step.once()``,
    ``step.idempotency_key`` never passed to a function call), with the plan
    that showed it; ``reruns`` the steps that ran more than once even in the
    crash-free run (the code before a durable wait runs again on resume);
    ``once_without_key`` the steps whose ``once()`` a crash between its call
    and its record would repeat.
    """
    spec: str | None
    if isinstance(flow, str):
        spec = flow
        flow = load_flow(flow)
    else:
        try:
            spec = flow_spec(flow)
        except ConfigurationError:
            if processes:
                raise
            spec = None
    if races is None:
        races = () if processes else tuple(r for r in RACES if r != "recover_process" or spec is not None)
    if processes and races:
        raise ConfigurationError("processes=True runs crash plans only; pass races=() (races run in-process)")
    if "recover_process" in races and spec is None:
        flow_spec(flow)  # raises, saying how to make the workflow importable
    base = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="walstate-crash-"))
    base.mkdir(parents=True, exist_ok=True)
    template = str(base / "template.db")
    if not os.path.exists(template):
        _new_file(template, database_id)
    if os.path.exists(template + "-wal"):
        template_arg: str | None = None  # not a self-contained file: create each one instead of copying
    else:
        template_arg = template
    report = CrashReport()
    ref_path = str(base / "reference.db")
    _clean(ref_path)
    # The reference run also counts the fault points the workflow reaches: plans
    # are drawn from those only (a workflow that never waits never reaches the
    # message points), so no example is spent on a crash that cannot happen.
    with Injector() as reach:
        reference = run_with_crashes(flow, context, ref_path, workers=workers, database_id=database_id,
                                     template=template_arg, messages=messages)
    points = [p for p in points if reach.hits[p]] or list(points)
    ref_rows = app_rows(ref_path, tables)
    report.reruns = _reruns(flow, reference)
    baseline = Counter(a.step for a in _runs(reference.attempts))
    counter = iter(range(1 << 30))
    wf = flow

    def example(plan: Sequence[Fault]) -> None:
        path = str(base / f"run-{next(counter)}.db")
        _clean(path)
        if processes:
            assert spec is not None
            outcome = run_in_processes(wf, context, path, [f for f in plan if isinstance(f, Crash)], spec=spec,
                                       workers=workers, database_id=database_id, template=template_arg,
                                       messages=messages)
        else:
            outcome = run_with_crashes(wf, context, path, plan, workers=workers, database_id=database_id,
                                       template=template_arg, flow_spec=spec if "recover_process" in races else None,
                                       messages=messages)
        report.examples += 1
        report.crashes += outcome.crashes
        report.races += outcome.races
        try:
            unprotected = _account(report, wf, outcome, baseline)
            if outcome.race_errors:
                _fail(f"a racer met an error no correct run raises: {outcome.race_errors}")
            check_invariants(path, wf, outcome.job_id, reference, compare=compare)
            check_overlaps(outcome.attempts)
            if reference.state == "succeeded" and outcome.state == "succeeded":
                check_rows(app_rows(path, tables), ref_rows, outcome, wf)
            if strict and unprotected:
                _fail(f"the outside effects of step(s) {unprotected} ran more than once (no transactional=True, "
                      "no step.once(), step.idempotency_key never passed to a call); pass the key to the outside "
                      "service (and wrap the call in step.once(), or make the step transactional)")
            if strict and report.once_without_key:
                _fail(f"step(s) {report.once_without_key} call step.once() without passing step.idempotency_key "
                      "to the call: a process that dies between the call and its record calls it again; pass the "
                      "key to the outside service inside the once() too")
        except InvariantViolation as exc:
            raise InvariantViolation(f"{exc}\n  plan: {list(plan)!r}\n  replay: crash_test(..., plans=[{list(plan)!r}])"
                                     ) from None
        _clean(path)

    if plans is not None:
        for plan in plans:
            example(plan)
        return report

    # The active profile's settings, minus what cannot apply to a crash test: examples are stored
    # files (no example database), and their time varies with the plan (no deadline).
    parent = settings.default
    examples = (parent.max_examples if parent is not None else 100) if max_examples is None else max_examples
    # First, one crash at each reachable position (point, n-th hit), in the run's order: what a
    # single crash can break is then found on every run, not by luck of the draw. Up to three
    # quarters of the examples (spread over the run when there are more positions); the rest go
    # to Hypothesis's plans (several faults, races).
    sweep = single_crashes({p: reach.hits[p] for p in points}, max_hit)
    room = examples - examples // 4
    if len(sweep) > room:
        sweep = [sweep[i * len(sweep) // room] for i in range(room)]
    for plan in sweep:
        example(plan)
    examples -= len(sweep)
    if examples < 1:
        return report
    suppressed = list(parent.suppress_health_check) if parent is not None else []
    run_settings = settings(parent, database=None, max_examples=examples, deadline=None,
                            suppress_health_check=[*suppressed, HealthCheck.too_slow])

    @run_settings
    @given(plan=crash_plans(points, max_hit, races=races))
    def scenario(plan: list[Fault]) -> None:
        example(plan)

    if seed is not None:
        scenario = hypothesis_seed(seed)(scenario)
    scenario()
    return report


# The chaos run and the history checker (their own modules), public here.
from .chaos import ChaosJob, Nemeses, ServerControl, Workload, run_chaos  # noqa: E402
from .history import HistoryReport, HistoryViolation, Ledger, Violation, check_history  # noqa: E402

__all__ += ["ChaosJob", "HistoryReport", "HistoryViolation", "Ledger", "Nemeses", "ServerControl", "Violation",
            "Workload", "check_history", "run_chaos"]
