"""The app the chaos tests run (``tests.chaos_app:make_engine``), and the breakages its negative controls switch on.

``WALSTATE_CHAOS_BREAK`` (comma-separated) puts a known defect back in every
process of a chaos run that builds this engine (not in the test's own process), so that the history checker can be shown to
catch it:

``claim-ignores-epoch``  a worker's claim of a job whose owner it found dead matches the job by id
                         only, not by the epoch it found it at; with a scan that is slow to claim
                         (``slow-scan``, switched on with it) a job another worker claimed
                         meanwhile is taken from that live run.
``slow-scan``            a worker claims what its dead-owner scan found 0.6 s later (harmless alone:
                         the epoch makes a stale scan match nothing).
``rerun-on-busy``        the first completion write of each plain step in a process fails with
                         DatabaseBusy before writing, and the run gives the job up (issue 26 item 1's
                         behaviour, kept here whatever the library does).
``unfenced-once``        ``once()`` calls its function and stores the record without looking at the
                         claim (issue 26 item 2, as it was).
``pid-liveness``         an owner on this host is alive while its pid exists, whatever its lease
                         (a hung owner keeps its jobs: issue 26 item 7, as it was).
``reuse-ids``            after each ``prune()`` the job id counter goes back to the highest id left
                         (SQLite: its ``sqlite_sequence`` row deleted; PostgreSQL: ``setval``), so a pruned
                         newest job's id is handed out again (issue 26 item 4, as it was).
``forget-schedule-progress`` a process keeps a schedule's progress in memory, starting from nothing,
                         and makes a slot's job whenever no job has its key (the stored progress is
                         neither read nor obeyed): a pruned slot's job is made again (issue 26 item 5).

Every engine also runs the schedule ``chaos_tick`` (``TICK_CRON``: every second, grace ``TICK_GRACE``).

``WALSTATE_CHAOS_FOREIGN=1`` makes each process look like another host (its own boot id): owners
are then judged by their lease alone, as between containers. ``WALSTATE_CHAOS_LEASE`` sets the
lease (seconds, default 2); ``WALSTATE_CHAOS_SLOW`` adds seconds to every handler.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from walstate import DatabaseBusy, Engine, StepContext, Workflow, ownership
from walstate.runtime import Worker
from walstate.storage.postgres import PgWritePath, is_postgres_url
from walstate.storage.reads import Reader
from walstate.testing import connect
from walstate.storage.writepath import WritePath
from walstate.substep import SubStep


#: Seconds every handler's work takes beyond its usual (``WALSTATE_CHAOS_SLOW``): jobs still run when a breakage strikes.
SLOW = float(os.environ.get("WALSTATE_CHAOS_SLOW", "0"))


class Order(BaseModel):
    n: int = 0
    charge: Any = None
    got: Any = None


order = Workflow("chaos_order", context=Order, phases=["pay", "ship"])


@order.step(phase="pay")
def charge(ctx: Order, step: StepContext) -> dict[str, Any]:
    time.sleep(random.uniform(0.05, 0.3) + SLOW)  # the work before the outside call
    receipt = step.once("charge", lambda: {"pid": os.getpid(), "token": uuid.uuid4().hex, "key": step.idempotency_key})
    time.sleep(random.uniform(0.0, 0.05))
    return {"charge": receipt}


@order.step(phase="pay", after=["charge"], transactional=True)
def book(ctx: Order, step: StepContext) -> None:
    step.execute("SELECT 1")  # short: a transactional step holds the database's writer (SQLite)


@order.step(phase="ship")
def wait(ctx: Order, step: StepContext) -> dict[str, Any]:
    return {"got": step.wait_for("go")}


@order.step(phase="ship")
def nap(ctx: Order, step: StepContext) -> None:
    time.sleep(random.uniform(0.05, 0.3) + SLOW)


capped = Workflow("chaos_capped", context=Order, phases=["only"], concurrency=2)


@capped.step(phase="only")
def work(ctx: Order, step: StepContext) -> None:
    time.sleep(random.uniform(0.1, 0.4) + SLOW)


late = Workflow("chaos_late_once", context=Order, phases=["only"])

#: Seconds the first run of ``late_charge`` works before its once(); every later run (a takeover) works longer:
#: longer than the first run's work plus a stop (3 s in the tests), so a continued stale run reaches once() first.
LATE_FIRST, LATE_AGAIN = 2.5, 6.0


@late.step(phase="only")
def late_charge(ctx: Order, step: StepContext) -> dict[str, Any]:
    """Long work, then once(): a run stopped in its work past its lease, then continued, reaches once() before
    the run that took the job over meanwhile (which works longer), so an unfenced once() of the stale run calls
    the function and stores its record."""
    time.sleep(LATE_FIRST if step.attempt <= 1 else LATE_AGAIN)
    return {"charge": step.once("charge", lambda: {"pid": os.getpid(), "token": uuid.uuid4().hex})}


tick = Workflow("chaos_tick", context=Order, phases=["only"])

#: The schedule every chaos engine runs: a job every second (six fields: the last is the second).
TICK_CRON, TICK_GRACE = "* * * * * *", 5.0


@tick.step(phase="only")
def tock(ctx: Order, step: StepContext) -> None:
    time.sleep(random.uniform(0.05, 0.15))


def make_engine(path: str, clock: Callable[[], float] = time.time) -> Engine:
    """The chaos app's engine on ``path`` (its workflows and schedule registered), with the breakages asked for."""
    # Only in a chaos run's children: the test's own process (which builds an engine to read the lease) stays whole.
    child = bool(os.environ.get("WALSTATE_CHAOS_ROLE"))
    if child:
        _break(set(filter(None, os.environ.get("WALSTATE_CHAOS_BREAK", "").split(","))))
    if child and os.environ.get("WALSTATE_CHAOS_FOREIGN") == "1":
        me = ownership.identity()
        ownership._identity = ownership.Identity(f"chaos-{uuid.uuid4().hex[:8]}", me.pid_ns, me.host, me.pid, me.start)
    engine = Engine(path, workers=3, lease=float(os.environ.get("WALSTATE_CHAOS_LEASE", "2")), clock=clock)
    engine.register(order)
    engine.register(capped)
    engine.register(late)
    engine.schedule(tick, cron=TICK_CRON, context=Order(), name="chaos_tick", grace=TICK_GRACE)
    return engine


_applied: set[str] = set()


def _replace(cls: type, attr: str, old: str, new: str) -> None:
    sql = str(getattr(cls, attr))
    if old not in sql:
        raise RuntimeError(f"{cls.__name__}.{attr} changed; update the breakage in tests/chaos_app.py: {sql}")
    value = sql.replace(old, new)
    setattr(cls, attr, type(getattr(cls, attr))(value))


def _break(breaks: set[str]) -> None:
    todo = breaks - _applied
    _applied.update(todo)
    if "claim-ignores-epoch" in todo:
        _replace(WritePath, "_RUNNABLE", "(id, epoch) IN (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') "
                 "FROM json_each(?))", "id IN (SELECT json_extract(value, '$[0]') FROM json_each(?))")
        _replace(PgWritePath, "_RUNNABLE", "(id, epoch) IN (SELECT (d->>0)::bigint, (d->>1)::bigint FROM "
                 "json_array_elements(%s::json) AS d)", "id IN (SELECT (d->>0)::bigint FROM json_array_elements(%s::json) AS d)")
        todo.add("slow-scan")
    if "slow-scan" in todo:
        claim = Worker._claim

        def slow_claim(self: Worker, free: int, dead: list[tuple[int, int]]) -> None:
            if dead:
                time.sleep(0.6)  # longer than the scan period: every other worker's next scan finds the same dead owner
            claim(self, free, dead)

        Worker._claim = slow_claim  # type: ignore[method-assign]
    if "rerun-on-busy" in todo:
        succeed = SubStep.succeed
        failed_once: set[tuple[int, str]] = set()

        def busy_succeed(self: SubStep, *args: Any, **kwargs: Any) -> bool:
            key = (self.job.id, self.name)
            if kwargs.get("effect") is None and key not in failed_once:
                failed_once.add(key)
                raise DatabaseBusy(f"injected: completion write of step {self.name!r} of job {self.job.id} found "
                                   "the database busy")
            return succeed(self, *args, **kwargs)

        SubStep.succeed = busy_succeed  # type: ignore[method-assign]
    if "unfenced-once" in todo:
        def once(self: StepContext, name: str, fn: Callable[[], Any]) -> Any:
            stored = self._store.once(self.job_id, self.step, name)
            if stored is None:
                text = json.dumps(fn())
                self.recorded.append((self.step, name, text))
                stored = self._store.record_once(self.job_id, self.step, name, text)
            return json.loads(stored)

        def record_once(self: WritePath, job_id: int, step: str, name: str, result: str) -> str:
            with self._lock, self._own_transaction() as conn:
                conn.execute(WritePath._ONCE, (job_id, step, name, result, time.time()))
                row = conn.execute("SELECT result FROM walstate_once WHERE job_id=? AND step=? AND name=?",
                                   (job_id, step, name)).fetchone()
            return str(row[0])

        StepContext.once = once  # type: ignore[method-assign]
        WritePath.record_once = record_once  # type: ignore[method-assign]
    if "pid-liveness" in todo:
        def owner_alive(owner: str | None, job_id: int, lease_expires: float | None, now: float) -> bool:
            if owner is None:
                return False
            parts = owner.split("|")
            me = ownership.identity()
            if len(parts) != 6 or parts[0] != me.boot_id:
                return lease_expires is not None and lease_expires > now
            pid = int(parts[3])
            if pid == me.pid:
                return original_alive(owner, job_id, lease_expires, now)
            return Path(f"/proc/{pid}").exists() and not _zombie(pid)

        original_alive = ownership.owner_alive
        ownership.owner_alive = owner_alive


    if "reuse-ids" in todo:
        prune = Engine.prune

        def reusing_prune(self: Engine, *args: Any, **kwargs: Any) -> int:
            n = prune(self, *args, **kwargs)
            conn = connect(self.path)
            try:
                if is_postgres_url(self.path):
                    conn.execute("SELECT setval(pg_get_serial_sequence('walstate_job', 'id'), "
                                 "COALESCE((SELECT max(id) FROM walstate_job), 0) + 1, false)").fetchall()
                else:
                    conn.execute("DELETE FROM sqlite_sequence WHERE name='walstate_job'")
                    conn.commit()
            finally:
                conn.close()
            return n

        Engine.prune = reusing_prune  # type: ignore[method-assign]
    if "forget-schedule-progress" in todo:
        progress: dict[str, float] = {}
        create = WritePath.create_scheduled
        _replace(WritePath, "_ADVANCE", " WHERE walstate_schedule.last_slot < excluded.last_slot", "")

        def create_scheduled(self: WritePath, schedule: str, slot: float, *args: Any, **kwargs: Any) -> int | None:
            job_id = create(self, schedule, slot, *args, **kwargs)
            progress[schedule] = max(slot, progress.get(schedule, slot))
            return job_id

        def pass_slot(self: WritePath, schedule: str, slot: float) -> bool:
            progress[schedule] = max(slot, progress.get(schedule, slot))
            return True

        WritePath.create_scheduled = create_scheduled  # type: ignore[method-assign]
        WritePath.pass_slot = pass_slot  # type: ignore[method-assign]
        Reader.schedule_slot = lambda self, name: progress.get(name)  # type: ignore[method-assign]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


class PgServer:
    """The test session's throwaway PostgreSQL server (tests/pgserver.py) as the chaos run's ServerControl."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def stop_immediate(self) -> None:
        from tests import pgserver

        s = self.server
        pgserver._run(s.user, s.bindir, "pg_ctl", "stop", "-D", str(s.datadir), "-m", "immediate", "-w", cwd=s.root)

    def start(self) -> None:
        from tests import pgserver

        s = self.server
        pgserver._run(s.user, s.bindir, "pg_ctl", "start", "-D", str(s.datadir), "-l", str(s.root / "server.log"),
                      "-w", "-t", "60", cwd=s.root, timeout=90)
        pgserver._wait_ready(s, time.monotonic() + 60)
