"""A chaos run: real worker processes of the user's app under seeded nemeses, then the history checked.

:func:`run_chaos` starts ``workers`` processes running the app's engine (the
factory ``walstate worker --app`` takes), a submitter and a sender, each
appending what it was acknowledged to its ledger (:mod:`walstate.history`), and
meanwhile applies :class:`Nemeses` on a schedule drawn from ``seed``: SIGKILL
(the worker is replaced), SIGSTOP for longer than the lease then SIGCONT, a
jump of one worker's clock (through the engine's ``clock=``, when the factory
takes one), and on a PostgreSQL server the run controls, an immediate stop and
restart, and the termination of every session on the database; and a pruner
process that deletes every finished job every ``prune_every`` seconds (each
deleted job row is logged by a trigger, so the checker counts it as ended, not
lost, and sees an id handed out again). When the nemeses stop, the run waits (within ``settle`` seconds) for every acknowledged
job to end, stops the workers and checks the history.

The child processes are this module run as a script (``python -m walstate.chaos``), with
``WALSTATE_CHAOS_ROLE`` set in their environment to their role (``worker``, ``submit``, ``send``,
``prune``): an app can tell them from the caller's process, which builds one engine too (to read its
lease and schedules).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .context import StepContext, Suspend
from .engine import Engine
from .history import (CREATE_EFFECTS, INSERT_EFFECT, PRUNED_TABLE, READ_PRUNED_IDS, HistoryReport, Ledger, check_history, read_ledgers)
from .storage.errors import (ConfigurationError, DatabaseBusy, DatabaseUnavailable, JobFinished, UnknownJob,
                             WriteFailed)
from .storage.contract import is_postgres_url
from .workflow import Workflow


@dataclass(frozen=True)
class ChaosJob:
    """One job the submitter submits (``context``: a dict of its fields), and the messages then sent to it."""

    workflow: Workflow[Any] | str
    context: dict[str, Any]
    #: ``(topic, payload)`` sent to the job, in this order, once its submit was acknowledged.
    messages: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Workload:
    """The jobs of a chaos run; each must end in ``expect``."""

    jobs: Sequence[ChaosJob]
    expect: str = "succeeded"


@dataclass(frozen=True)
class Nemeses:
    """How many of each fault the run applies, one at a time, spread over the run and ``gap`` seconds apart at least.

    Kills and stops mostly (4 in 5) hit a worker that is inside a handler.

    ``stop_for`` is how long a SIGSTOP lasts (default: 1.5 times the lease,
    capped below SQLite's busy timeout by the caller's choice of lease);
    ``jump`` how far a clock jump moves one worker's clock (seconds, forward).
    ``hang`` stops one worker that is running a handler for good, from the
    middle of the run until after the check (a hung owner: its jobs must be
    taken over; if no worker is inside a handler by the end of ``duration``, it waits up to as
    long again for one). ``restarts`` and ``terminations`` need a PostgreSQL URL and,
    for restarts, the ``server`` given to :func:`run_chaos`. ``prune_every``
    (seconds) runs a pruner process that calls ``engine.prune(older_than=0)``
    that often, from the start until the check. ``target_step`` (a step's
    name) makes every kill and stop hit a worker inside that step's handler,
    waiting until one is.
    """

    kills: int = 0
    stops: int = 0
    stop_for: float | None = None
    clock_jumps: int = 0
    jump: float = 120.0
    restarts: int = 0
    terminations: int = 0
    hang: bool = False
    prune_every: float | None = None
    target_step: str | None = None
    gap: tuple[float, float] = (0.1, 0.6)


class ServerControl(Protocol):
    """A local throwaway PostgreSQL server the caller started: stopped (``-m immediate``) and started again."""

    def stop_immediate(self) -> None: ...

    def start(self) -> None: ...


@dataclass
class _Proc:
    popen: subprocess.Popen[bytes]
    role: str
    ready: Path
    stopped: bool = False


@dataclass
class _Run:
    app: str
    db: str
    directory: Path
    flows: list[str]
    concurrency: int
    jump: float
    procs: list[_Proc] = field(default_factory=list)
    ledger: Ledger | None = None

    def spawn(self, role: str, *extra: str) -> _Proc:
        n = len(self.procs)
        ready = self.directory / f"ready-{role}-{n}"
        log = open(self.directory / f"{role}-{n}.log", "wb")
        cmd = [sys.executable, "-m", "walstate.chaos", role, "--app", self.app, "--db", self.db, "--ledger",
               str(self.directory / "ledger"), "--ready", str(ready), "--concurrency", str(self.concurrency),
               "--jump", str(self.jump), *itertools.chain.from_iterable(("--flow", f) for f in self.flows), *extra]
        popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, "WALSTATE_CHAOS_ROLE": role})
        log.close()
        proc = _Proc(popen, role, ready)
        self.procs.append(proc)
        assert self.ledger is not None
        self.ledger.append("spawn", role=role, target=popen.pid)
        return proc

    def workers(self, ready: bool = False) -> list[_Proc]:
        return [p for p in self.procs if p.role == "worker" and p.popen.poll() is None and not p.stopped
                and (not ready or p.ready.exists())]


def _engine(app: str, db: str, clock: Callable[[], float] | None = None) -> Engine:
    """The app's engine on ``db``: ``module:attr`` naming an Engine or a factory taking the path (and ``clock=``)."""
    module_name, _, attr = app.partition(":")
    target = getattr(importlib.import_module(module_name), attr or "engine", None)
    if isinstance(target, Engine):
        return target
    if not callable(target):
        raise ConfigurationError(f"{app} is neither an Engine nor a factory taking the database path")
    takes_clock = "clock" in inspect.signature(target).parameters
    engine = target(db, clock=clock) if clock is not None and takes_clock else target(db)
    if not isinstance(engine, Engine):
        raise ConfigurationError(f"{app}: the factory returned {type(engine).__name__}, not an Engine")
    return engine


def run_chaos(app: str, db: str, workload: Workload, directory: str | os.PathLike[str], *, workers: int = 3,
              concurrency: int = 2, seed: int = 0, nemeses: Nemeses = Nemeses(), duration: float = 60.0,
              settle: float = 120.0, server: ServerControl | None = None) -> HistoryReport:
    """Run ``workload`` on ``db`` in ``workers`` processes of ``app`` under ``nemeses``; return the checked history.

    ``app`` is ``"module:attr"``, an Engine or a factory taking the database
    path (and, to allow clock jumps, a ``clock=`` keyword), as ``walstate
    worker --app`` takes it; the workload's workflows must be module-level
    names of importable modules. Nemeses go on for at most ``duration``
    seconds; then every acknowledged job must end within ``settle`` seconds.
    ``directory`` receives the ledgers and each process's log. The report's
    ``seed`` replays the schedule: ``run_chaos(..., seed=report.seed)``.
    """
    from .testing import connect, flow_spec

    if (nemeses.restarts or nemeses.terminations) and not is_postgres_url(db):
        raise ConfigurationError("server restarts and session terminations need a PostgreSQL URL")
    if nemeses.restarts and server is None:
        raise ConfigurationError("server restarts need server= (a local throwaway server this run may restart)")
    rng = random.Random(seed)
    base = Path(directory)
    (base / "ledger").mkdir(parents=True, exist_ok=True)
    probe = _engine(app, db, time.time)
    try:
        lease = probe.lease
        schedules = list(probe.schedules.values())
    finally:
        probe.close()
    flows = {id(j.workflow): j.workflow for j in workload.jobs}
    specs = sorted({flow_spec(f) for f in flows.values()})
    from .testing import load_flow

    loaded = [load_flow(s) for s in specs]
    limits = {f.name: f.concurrency for f in loaded if f.concurrency is not None}
    transactional = [(f.name, d.name) for f in loaded for d in f.steps.values() if d.transactional]
    conn = connect(db)
    try:
        conn.execute(CREATE_EFFECTS)
        for sql in _pruned_log(is_postgres_url(db)):
            conn.execute(sql)
        conn.commit()
    finally:
        conn.close()
    plan = [{"key": f"chaos-{seed}-{i}", "workflow": (j.workflow if isinstance(j.workflow, str) else j.workflow.name),
             "context": j.context,
             "messages": [[topic, payload, f"chaos-{seed}-{i}-{k}"] for k, (topic, payload) in enumerate(j.messages)]}
            for i, j in enumerate(workload.jobs)]
    (base / "plan.json").write_text(json.dumps(plan))
    run = _Run(app, db, base, specs, concurrency, nemeses.jump, ledger=Ledger(base / "ledger", "nemesis"))
    pace = f"{duration * 0.7 / max(1, len(plan)):.4f}"
    clients = [run.spawn("submit", "--seed", str(seed), "--pace", pace, "--deadline", str(duration + settle)),
               run.spawn("send", "--seed", str(seed), "--pace", pace, "--deadline", str(duration + settle))]
    if nemeses.prune_every is not None:
        run.spawn("prune", "--pace", str(nemeses.prune_every))
    for _ in range(workers):
        run.spawn("worker")
    hung: _Proc | None = None
    try:
        hung = _apply(run, rng, nemeses, lease, duration, server)
        for p in run.procs:
            if p.stopped and p is not hung:
                os.kill(p.popen.pid, signal.SIGCONT)
                p.stopped = False
        while len(run.workers()) < workers:
            run.spawn("worker")
        run.ledger.append("phase", name="settle")  # type: ignore[union-attr]
        deadline = time.monotonic() + settle
        for c in clients:
            try:
                c.popen.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break  # the check says which acknowledged jobs did not end
        _settle(db, base / "ledger", deadline)
    finally:
        _stop_all(run)
    return check_history(db, base / "ledger", lease=lease, seed=seed, expect=workload.expect, limits=limits,
                         transactional=transactional, schedules=schedules)


def _pruned_log(postgres: bool) -> list[str]:
    """The table and trigger that keep every deleted job row (a prune's), written in the deleting transaction."""
    table = (f"CREATE TABLE IF NOT EXISTS {PRUNED_TABLE} (job_id BIGINT, workflow TEXT, key TEXT, state TEXT, "
             "created_at DOUBLE PRECISION)")
    insert = f"INSERT INTO {PRUNED_TABLE} VALUES (OLD.id, OLD.workflow, OLD.key, OLD.state, OLD.created_at)"
    if not postgres:
        return [table, f"CREATE TRIGGER IF NOT EXISTS {PRUNED_TABLE}_log AFTER DELETE ON walstate_job "
                       f"BEGIN {insert}; END"]
    return [table, f"CREATE OR REPLACE FUNCTION {PRUNED_TABLE}_log() RETURNS trigger LANGUAGE plpgsql AS "
                   f"$$ BEGIN {insert}; RETURN OLD; END $$",
            f"DROP TRIGGER IF EXISTS {PRUNED_TABLE}_log ON walstate_job",
            f"CREATE TRIGGER {PRUNED_TABLE}_log AFTER DELETE ON walstate_job FOR EACH ROW "
            f"EXECUTE FUNCTION {PRUNED_TABLE}_log()"]


def _apply(run: _Run, rng: random.Random, n: Nemeses, lease: float, duration: float,
           server: ServerControl | None) -> _Proc | None:
    """Apply the nemeses one at a time until all are done or ``duration`` passed; return the hung worker, if any."""
    assert run.ledger is not None
    ledger = run.ledger
    todo = {"kill": n.kills, "stop": n.stops, "clock": n.clock_jumps, "pg_restart": n.restarts,
            "pg_terminate": n.terminations}
    end = time.monotonic() + duration
    hang_at = time.monotonic() + duration / 3 if n.hang else None
    hung: _Proc | None = None
    # The hang waits for a worker inside a handler past ``duration`` if it must (a loaded machine), up to twice it.
    while (time.monotonic() < end and any(todo.values())) or (
            hang_at is not None and hung is None and time.monotonic() < end + duration):
        # Spread over the duration (the work arrives over it too), never closer than ``gap`` allows.
        spread = (end - time.monotonic()) / (sum(todo.values()) + 1)
        pause = max(rng.uniform(*n.gap), rng.uniform(0.5, 1.5) * spread)
        if hang_at is not None and hung is None:
            pause = min(pause, max(n.gap[0], hang_at - time.monotonic()))
        time.sleep(pause)
        if hang_at is not None and hung is None and time.monotonic() >= hang_at:
            hung = _hang(run)
            continue
        actions = [a for a, left in todo.items() if left > 0]
        if not actions:
            continue
        action = rng.choices(actions, weights=[todo[a] for a in actions])[0]
        ready = run.workers(ready=True)
        if n.target_step is not None and action in ("kill", "stop"):
            ready = _inside(run, ready, n.target_step)
        if action in ("kill", "stop", "clock") and not ready:
            continue
        todo[action] -= 1
        target = rng.choice(ready) if ready else None
        if action in ("kill", "stop") and rng.random() < 0.8:
            busy = _inside(run, ready)  # mostly a worker inside a handler: a kill there is the one that tests most
            target = rng.choice(busy) if busy else target
        if action == "kill" and target is not None:
            ledger.append("nemesis", action="kill", target=target.popen.pid)
            target.popen.kill()
            target.popen.wait()
            run.spawn("worker")
        elif action == "stop" and target is not None:
            seconds = n.stop_for if n.stop_for is not None else lease * 1.5
            start = time.monotonic()
            os.kill(target.popen.pid, signal.SIGSTOP)
            time.sleep(seconds)
            os.kill(target.popen.pid, signal.SIGCONT)
            ledger.append("nemesis", action="stop", target=target.popen.pid, t=start,
                          seconds=time.monotonic() - start)
        elif action == "clock" and target is not None:
            ledger.append("nemesis", action="clock", target=target.popen.pid, seconds=n.jump)
            os.kill(target.popen.pid, signal.SIGUSR1)
        elif action == "pg_restart" and server is not None:
            ledger.append("nemesis", action="pg_restart", target=0)
            server.stop_immediate()
            time.sleep(rng.uniform(0.2, 1.5))
            server.start()
        elif action == "pg_terminate":
            _terminate_sessions(run.db)
            ledger.append("nemesis", action="pg_terminate", target=0)
    return hung


def _inside(run: _Run, procs: Sequence[_Proc], step: str | None = None) -> list[_Proc]:
    """Those of ``procs`` that are inside a handler (of ``step``, if given) now, by their ledgers."""
    open_calls: set[tuple[int, int]] = set()
    for p in procs:
        for r in read_ledgers(run.directory / "ledger", f"worker-{p.popen.pid}"):
            if r["kind"] == "enter" and step in (None, r["step"]):
                open_calls.add((int(r["pid"]), int(r["call"])))
            elif r["kind"] == "exit":
                open_calls.discard((int(r["pid"]), int(r["call"])))
    inside = {pid for pid, _ in open_calls}
    return [p for p in procs if p.popen.pid in inside]


def _hang(run: _Run) -> _Proc | None:
    """SIGSTOP, for good, a worker that is inside a handler now (by the ledgers); None if none is."""
    live = _inside(run, run.workers(ready=True))
    if not live:
        return None
    target = live[0]
    os.kill(target.popen.pid, signal.SIGSTOP)
    target.stopped = True
    assert run.ledger is not None
    run.ledger.append("nemesis", action="hang", target=target.popen.pid)
    return target


def _terminate_sessions(db: str) -> None:
    """Terminate every other session on the run's PostgreSQL database (the workers', the clients')."""
    from .testing import connect

    for _ in range(20):
        try:
            conn = connect(db)
        except Exception:  # the server is restarting: try again shortly
            time.sleep(0.25)
            continue
        try:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall()
        finally:
            conn.close()
        return


def _settle(db: str, ledger_dir: Path, deadline: float) -> None:
    """Wait until every acknowledged job has ended, or ``deadline``."""
    from .testing import connect

    while time.monotonic() < deadline:
        acked = [int(r["job"]) for r in read_ledgers(ledger_dir, "submit-*")]
        try:
            conn = connect(db)
            try:
                states = dict(conn.execute("SELECT id, state FROM walstate_job").fetchall())
                states.update({int(r[0]): "pruned" for r in conn.execute(READ_PRUNED_IDS).fetchall()})
            finally:
                conn.close()
        except Exception:  # busy or restarting: look again
            states = {}
        if acked and all(states.get(j) in ("succeeded", "failed", "cancelled", "pruned") for j in acked):
            return
        time.sleep(0.25)


def _stop_all(run: _Run) -> None:
    """SIGTERM every process and wait for it; a hung one (stopped for good) is killed last, once the rest are gone."""
    for p in run.procs:
        if p.popen.poll() is None and not p.stopped:
            p.popen.terminate()
    for p in run.procs:
        if p.stopped:
            continue
        try:
            p.popen.wait(30)
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait()
    for p in run.procs:
        if p.stopped and p.popen.poll() is None:
            assert run.ledger is not None
            run.ledger.append("nemesis", action="kill", target=p.popen.pid)
            p.popen.kill()
            p.popen.wait()


# -- the child processes ------------------------------------------------------------


class _JumpingClock:
    """Wall-clock time plus an offset that SIGUSR1 moves forward (a clock jump)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class _Epochs:
    """The claim epoch of a job as stored now, read on a connection of this thread's own (None if unreadable)."""

    def __init__(self, db: str) -> None:
        self.db = db
        self.local = threading.local()

    def read(self, job_id: int) -> int | None:
        from .testing import connect

        try:
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = self.local.conn = connect(self.db)
            row = conn.execute("SELECT epoch FROM walstate_job WHERE id=?", (job_id,)).fetchone()
            if not is_postgres_url(self.db):
                conn.commit()
            return None if row is None else int(row[0])
        except Exception:  # a restarting server, a busy file: the epoch is evidence, not a rule
            self.local.conn = None
            return None


class _Recorded:
    """The StepContext a chaos-wrapped handler sees: its once() and wait_for() results go to the ledger."""

    def __init__(self, step: StepContext, ledger: Ledger, base: dict[str, Any]) -> None:
        object.__setattr__(self, "_step", step)
        object.__setattr__(self, "_ledger", ledger)
        object.__setattr__(self, "_base", base)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._step, name)

    def once(self, name: str, fn: Callable[[], Any]) -> Any:
        where = {"job": self._base["job"], "step": self._base["step"], "name": name}

        def called() -> Any:
            start = time.monotonic()
            value = fn()
            self._ledger.append("once_fn", **where, call=self._base["call"], start=start, value=value)
            return value

        value = self._step.once(name, called)
        self._ledger.append("once", **where, value=value)
        return value

    def wait_for(self, topic: str, timeout: float | None = None) -> Any:
        value = self._step.wait_for(topic, timeout)
        self._ledger.append("received", job=self._base["job"], step=self._base["step"], topic=topic, value=value)
        return value


def _instrument(flow: Workflow[Any], ledger: Ledger, epochs: _Epochs) -> None:
    """Wrap every handler of ``flow`` so that its calls, once() results and messages go to ``ledger``."""
    calls = itertools.count()
    for name, d in list(flow.steps.items()):
        if d.is_async:
            raise ConfigurationError(f"workflow {flow.name!r} step {name!r}: chaos runs wrap sync handlers only")

        def wrapped(ctx: Any, step: StepContext, _fn: Callable[..., Any] = d.fn, _name: str = name,
                    _tx: bool = d.transactional) -> Any:
            base = {"job": step.job_id, "step": _name, "workflow": flow.name, "attempt": step.attempt,
                    "call": next(calls)}
            ledger.append("enter", **base, epoch=epochs.read(step.job_id))
            outcome = "raised"
            try:
                result = _fn(ctx, _Recorded(step, ledger, base))
                if _tx:
                    step.execute(INSERT_EFFECT,
                                 (step.job_id, _name, step.attempt, os.getpid(), base["call"]))
                    ledger.append("effect", job=step.job_id, step=_name, attempt=step.attempt)
                outcome = "returned"
                return result
            except Suspend:
                outcome = "suspended"
                raise
            except Exception as exc:
                if _tx and _from_database(exc):
                    # The database failed the step's transaction (a killed session, a busy file): nothing of
                    # this attempt was kept, so the runner rightly calls the handler again at the same attempt.
                    outcome = "rolled-back"
                raise
            except BaseException:
                outcome = "aborted"
                raise
            finally:
                ledger.append("exit", **base, outcome=outcome)

        flow.steps[name] = type(d)(**{**d.__dict__, "fn": wrapped})


def _from_database(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, is the database's (not the handler's own)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (DatabaseBusy, DatabaseUnavailable, WriteFailed, sqlite3.Error)):
            return True
        if type(cur).__module__.split(".")[0] in ("psycopg", "peewee"):
            return True  # named by module: importing psycopg here would make it a dependency of every run
        cur = cur.__cause__ or cur.__context__
    return False


_stopping = False


def _on_term(signum: int, frame: object) -> None:
    global _stopping
    _stopping = True  # only a flag: a signal handler that takes a lock can deadlock the main thread


def _child(argv: Sequence[str]) -> int:
    from .testing import load_flow

    parser = argparse.ArgumentParser(prog="python -m walstate.chaos")
    parser.add_argument("role", choices=("worker", "submit", "send", "prune"))
    for opt in ("--app", "--db", "--ledger", "--ready"):
        parser.add_argument(opt, required=True)
    parser.add_argument("--flow", action="append", default=[])
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--jump", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pace", type=float, default=0.05)
    parser.add_argument("--deadline", type=float, default=300.0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_term)
    ledger = Ledger(args.ledger, args.role)
    clock = _JumpingClock()
    engine = _engine(args.app, args.db, clock)
    try:
        if args.role == "worker":
            signal.signal(signal.SIGUSR1, lambda s, f: setattr(clock, "offset", clock.offset + args.jump))
            epochs = _Epochs(args.db)
            for spec in args.flow:
                _instrument(load_flow(spec), ledger, epochs)
            engine.start_worker(args.concurrency)
            Path(args.ready).touch()
            while not _stopping:
                time.sleep(0.1)
            engine.stop_worker(drain=False, grace=5.0)
        elif args.role == "prune":
            Path(args.ready).touch()
            _prune(engine, ledger, args.pace)
        else:
            Path(args.ready).touch()
            plan = json.loads((Path(args.ledger).parent / "plan.json").read_text())
            _clients(args.role, engine, plan, ledger, Path(args.ledger), args.seed, args.pace, args.deadline)
    finally:
        engine.close(grace=0)
    return 0


def _retrying(deadline: float, fn: Callable[[], Any]) -> Any:
    """``fn()`` until it returns without a transient error (a busy file, a restarting server), or raise at ``deadline``."""
    while True:
        try:
            return fn()
        except (DatabaseBusy, DatabaseUnavailable, WriteFailed):
            if time.monotonic() > deadline or _stopping:
                raise
            time.sleep(0.1)


def _clients(role: str, engine: Engine, plan: list[dict[str, Any]], ledger: Ledger, ledger_dir: Path, seed: int,
             pace: float, seconds: float) -> None:
    rng = random.Random(f"{seed}-{role}")
    deadline = time.monotonic() + seconds
    if role == "submit":
        for item in plan:
            if _stopping:
                return
            time.sleep(rng.uniform(0, 2 * pace))
            job = _retrying(deadline, lambda: engine.submit(item["workflow"], item["context"], key=item["key"]))
            ledger.append("submit", job=int(job), key=item["key"], workflow=item["workflow"])
        return
    ids: dict[str, int] = {}
    for item in plan:
        for topic, payload, key in item["messages"]:
            while item["key"] not in ids:
                if _stopping or time.monotonic() > deadline:
                    return
                ids.update({r["key"]: int(r["job"]) for r in read_ledgers(ledger_dir, "submit-*")})
                if item["key"] not in ids:
                    time.sleep(0.1)
            time.sleep(rng.uniform(0, 2 * pace))
            job_id = ids[item["key"]]
            try:
                new = _retrying(deadline, lambda: engine.send(job_id, topic, payload, key=key))
            except (JobFinished, UnknownJob):
                continue  # the job ended (or was pruned) without waiting for it (the checker says why)
            ledger.append("send", job=job_id, topic=topic, key=key, payload=payload, new=bool(new))


def _prune(engine: Engine, ledger: Ledger, every: float) -> None:
    """``engine.prune(older_than=0)`` every ``every`` seconds until SIGTERM (the trigger logs what each deletes)."""
    while not _stopping:
        time.sleep(every)
        try:
            n = engine.prune(older_than=0)
        except (DatabaseBusy, DatabaseUnavailable, WriteFailed) as exc:
            ledger.append("prune", removed=None, error=repr(exc))
            continue
        ledger.append("prune", removed=n)


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))


__all__ = ["ChaosJob", "Nemeses", "ServerControl", "Workload", "run_chaos"]
