"""PostgreSQL vs SQLite: walstate end to end vs a raw driver floor doing the same durable work, same run.

The shape (issue 17): ``JOBS`` jobs of ``STEPS`` no-op sub-steps in one
parallel phase, submitted and run to their end through the public API, on a
local PostgreSQL with durable defaults (fsync on, ``synchronous_commit=on``,
data on disk; a throwaway cluster from tests/pgserver.py) and, beside it, on
SQLite with ``durability="full"`` (an fsync per commit too).

- 1 process: ``engine.submit`` then ``engine.run`` per job, one after another.
- 4 processes: 4 worker processes each run ``engine.start_worker(concurrency=8)``
  (what ``engine.serve`` runs); once they are all polling, this process
  submits the jobs and the clock stops when every job has succeeded.

The floor is the raw driver (psycopg 3 / sqlite3) on walstate's own schema doing
the same durable work per job: one transaction with the job row and its step
rows, then per sub-step two CAS UPDATEs (pending -> running -> succeeded), each
with its journal INSERT in its own transaction, then the job's end (CAS +
journal); with 4 processes, each on its own connection runs a quarter of the
jobs. Figures are sub-steps/s, median of ``REPS`` runs with their spread, and
the ratio walstate/floor per backend and process count (the median of the
ratios of back-to-back pairs: the disk is shared); the table goes to
``benchmarks/results/postgres.md``.

Run alone: ``python -m benchmarks.postgres_bench`` (``--quick`` for a smoke
run; ``WALSTATE_PG_JOBS`` sets the number of jobs, default 120). Without the
PostgreSQL server binaries or psycopg the PostgreSQL rows are skipped, saying so.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import statistics
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from walstate import Engine, Workflow
from walstate.storage import open_store

from .common import RESULTS, Figure, fresh_path, report

JOBS = int(os.environ.get("WALSTATE_PG_JOBS", "120"))
STEPS = 10
REPS = 3
PROCESSES = (1, 4)
#: Jobs in flight in each worker process of the multi-process runs.
CONCURRENCY = 8

# fork: the children start in milliseconds and need nothing pickled; the parent holds no open
# engine (no threads) when it forks. Outside the timed part either way.
_MP = multiprocessing.get_context("fork")


class Empty(BaseModel):
    pass


def flow() -> Workflow[Empty]:
    f = Workflow("pgbench", context=Empty, phases=["p"])
    for i in range(STEPS):
        f.step(phase="p", name=f"s{i}")(lambda ctx, step: None)
    return f


# -- backends -----------------------------------------------------------------------


@dataclass
class Backend:
    """Where a measurement's fresh database comes from, and how the raw floor talks to it."""

    name: str
    fresh: Callable[[], AbstractContextManager[str]]  # a new empty database's target, removed after
    param: str  # the driver's placeholder: "?" or "%s"


@contextmanager
def _sqlite_fresh() -> Iterator[str]:
    yield fresh_path("pg-sqlite")


def _pg_backend(base_url: str) -> Backend:
    import psycopg
    from psycopg import sql

    @contextmanager
    def fresh() -> Iterator[str]:
        name = f"walstate_bench_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(base_url, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
        try:
            yield urllib.parse.urlsplit(base_url)._replace(path=f"/{name}").geturl()
        finally:
            with psycopg.connect(base_url, autocommit=True) as admin:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    return Backend("PostgreSQL", fresh, "%s")


SQLITE = Backend("SQLite", _sqlite_fresh, "?")


def _connect(target: str) -> Any:
    """A raw driver connection in manual-transaction mode: psycopg for a URL, sqlite3 (synchronous=FULL) else."""
    if target.startswith("postgresql://"):
        import psycopg

        return psycopg.connect(target)
    conn = sqlite3.connect(target, isolation_level=None, timeout=60)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # an fsync per commit, as synchronous_commit=on
    return conn


def _begin(conn: Any) -> None:
    # sqlite3 in autocommit mode needs an explicit write transaction; psycopg opens one by itself.
    if isinstance(conn, sqlite3.Connection):
        conn.execute("BEGIN IMMEDIATE")


def _commit(conn: Any) -> None:
    if isinstance(conn, sqlite3.Connection):
        conn.execute("COMMIT")
    else:
        conn.commit()


def _open_jobs(conn: Any, p: str) -> tuple[int, int]:
    """(jobs not ended yet, jobs succeeded)."""
    row = conn.execute("SELECT SUM(CASE WHEN state IN ('pending', 'running') THEN 1 ELSE 0 END), "
                       f"SUM(CASE WHEN state = {p} THEN 1 ELSE 0 END) FROM walstate_job", ("succeeded",)).fetchone()
    if not isinstance(conn, sqlite3.Connection):
        conn.commit()  # end the read's transaction: the next poll must see new commits
    return int(row[0] or 0), int(row[1] or 0)


# -- the raw floor ------------------------------------------------------------------


def _floor_jobs(target: str, p: str, jobs: int, start: Any = None) -> None:
    """Do ``jobs`` jobs' durable work on one raw connection, one transaction per commit."""
    conn = _connect(target)
    journal = ("INSERT INTO walstate_journal (job_id, step, from_state, to_state, attempt, at, note) "
               f"VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p})")
    if start is not None:
        start.wait()  # every process connected: the clock starts
    for _ in range(jobs):
        now = time.time()
        _begin(conn)
        job = conn.execute("INSERT INTO walstate_job (workflow, state, context, initial_context, created_at, "
                           f"updated_at) VALUES ('pgbench', 'pending', '{{}}', '{{}}', {p}, {p}) RETURNING id",
                           (now, now)).fetchone()[0]
        conn.cursor().executemany("INSERT INTO walstate_step (job_id, name, phase, position, state, attempt, updated_at) "
                         f"VALUES ({p}, {p}, 'p', {p}, 'pending', 0, {p})",
                         [(job, f"s{i}", i, now) for i in range(STEPS)])
        _commit(conn)
        ids = [r[0] for r in conn.execute(f"SELECT id FROM walstate_step WHERE job_id={p} ORDER BY position", (job,))]
        for sid, name in zip(ids, (f"s{i}" for i in range(STEPS))):
            for src, dst in (("pending", "running"), ("running", "succeeded")):
                _begin(conn)
                cur = conn.execute(f"UPDATE walstate_step SET state={p}, attempt=1, updated_at={p} "
                                   f"WHERE id={p} AND state={p}", (dst, time.time(), sid, src))
                assert cur.rowcount == 1
                conn.execute(journal, (job, name, src, dst, 1, time.time(), None))
                _commit(conn)
        _begin(conn)
        conn.execute(f"UPDATE walstate_job SET state='succeeded', updated_at={p} WHERE id={p} AND state='pending'",
                     (time.time(), job))
        conn.execute(journal, (job, None, "running", "succeeded", 0, time.time(), None))
        _commit(conn)
    conn.close()


def raw_floor(backend: Backend, processes: int, jobs: int) -> float:
    """Sub-steps/s of the raw driver doing ``jobs`` jobs' durable work over ``processes`` processes."""
    with backend.fresh() as target:
        open_store(target).close()  # the same schema, made by walstate
        if processes == 1:
            t = time.perf_counter()
            _floor_jobs(target, backend.param, jobs)
            elapsed = time.perf_counter() - t
        else:
            start = _MP.Barrier(processes + 1)
            share = [jobs // processes + (i < jobs % processes) for i in range(processes)]
            procs = [_MP.Process(target=_floor_jobs, args=(target, backend.param, n, start)) for n in share]
            for proc in procs:
                proc.start()
            start.wait()
            t = time.perf_counter()
            for proc in procs:
                proc.join()
            elapsed = time.perf_counter() - t
            if any(proc.exitcode for proc in procs):
                raise RuntimeError(f"a {backend.name} floor process failed")
        conn = _connect(target)
        try:
            assert _open_jobs(conn, backend.param) == (0, jobs)
        finally:
            conn.close()
    return jobs * STEPS / elapsed


# -- walstate -----------------------------------------------------------------------


def _serve(target: str, ready: Any, stop: Any) -> None:
    """A worker process: what ``engine.serve(concurrency=8)`` runs, stopped by ``stop`` instead of Ctrl-C."""
    engine = Engine(target, durability="full", workers=1)
    engine.register(flow())
    engine.start_worker(concurrency=CONCURRENCY)
    ready.release()
    stop.wait()
    engine.close()


def walstate(backend: Backend, processes: int, jobs: int) -> float:
    """Sub-steps/s of walstate: run() per job in this process, or ``processes`` worker processes."""
    with backend.fresh() as target:
        if processes == 1:
            engine = Engine(target, durability="full", workers=1)
            f = engine.register(flow())
            t = time.perf_counter()
            for _ in range(jobs):
                engine.run(engine.submit(f, Empty()))
            elapsed = time.perf_counter() - t
            engine.close()
        else:
            open_store(target).close()  # the schema, before the workers race to make it
            ready, stop = _MP.Semaphore(0), _MP.Event()
            procs = [_MP.Process(target=_serve, args=(target, ready, stop)) for _ in range(processes)]
            for proc in procs:
                proc.start()
            try:
                for _ in procs:
                    if not ready.acquire(timeout=120):
                        raise RuntimeError(f"a {backend.name} worker process did not start")
                engine = Engine(target, durability="full", workers=1)
                f = engine.register(flow())
                poll = _connect(target)
                t = time.perf_counter()
                for _ in range(jobs):
                    engine.submit(f, Empty())
                deadline = time.monotonic() + 600
                while _open_jobs(poll, backend.param)[0] and time.monotonic() < deadline:
                    time.sleep(0.002)  # polling the jobs' ends, with the deadline above
                elapsed = time.perf_counter() - t
                poll.close()
                engine.close()
            finally:
                stop.set()
                for proc in procs:
                    proc.join(60)
        conn = _connect(target)
        try:
            done = _open_jobs(conn, backend.param)
        finally:
            conn.close()
        if done != (0, jobs):
            raise RuntimeError(f"{backend.name}: {done[1]} of {jobs} jobs succeeded, {done[0]} still open")
    return jobs * STEPS / elapsed


# -- the table ----------------------------------------------------------------------


def _spread(values: list[float]) -> tuple[float, float]:
    """(median, (max - min) / median)."""
    med = statistics.median(values)
    return med, (max(values) - min(values)) / med if med else 0.0


def _paired(floor: Callable[[], float], lib: Callable[[], float], reps: int) -> tuple[list[float], list[float]]:
    """``reps`` runs of each, interleaved: a slow spell of the shared disk hits both sides alike."""
    floors: list[float] = []
    libs: list[float] = []
    for _ in range(reps):
        floors.append(floor())
        libs.append(lib())
    return floors, libs


def _pg_server() -> tuple[Any, str]:
    """A durable throwaway PostgreSQL server, or (None, why not)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return None, "psycopg is not installed (pip install -e '.[postgres]')"
    try:
        from tests import pgserver
    except ImportError:
        return None, "tests/pgserver.py is not importable (run from the repository's root)"
    if pgserver.find_bindir() is None:
        return None, "no PostgreSQL server binaries (initdb, pg_ctl): install Debian's `postgresql` package"
    try:
        return pgserver.start(durable=True), ""
    except pgserver.ServerError as exc:
        return None, f"the PostgreSQL server did not start: {exc}"


def main(argv: list[str] | None = None) -> list[Figure]:
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    jobs, reps = (8, 1) if quick else (JOBS, REPS)
    backends = [SQLITE]
    server, why = _pg_server()
    if server is None:
        print(f"\nPostgreSQL rows skipped: {why}")
    else:
        backends.insert(0, _pg_backend(server.url))
    figures: list[Figure] = []
    rows: list[str] = []
    try:
        for backend in backends:
            for procs in PROCESSES:
                floors, libs = _paired(lambda: raw_floor(backend, procs, jobs), lambda: walstate(backend, procs, jobs),
                                       reps)
                (floor, fs), (lib, ls) = _spread(floors), _spread(libs)
                # The ratio of each pair of runs measured back to back, then their median.
                ratio, rs = _spread([w / f for w, f in zip(libs, floors)])
                floor_name = f"raw floor, {backend.name}, {procs} process{'es' * (procs > 1)}"
                figures.append(Figure(floor_name, floor, fs, "sub-steps/s"))
                figures.append(Figure(f"walstate, {backend.name}, {procs} process{'es' * (procs > 1)}", lib, ls,
                                      "sub-steps/s", floor_name, ratio))
                rows.append(f"| {backend.name} | {procs} | {lib:,.0f} ±{ls * 50:.0f}% | {floor:,.0f} ±{fs * 50:.0f}% "
                            f"| {ratio:.2f}x ±{rs * 50:.0f}% |")
    finally:
        if server is not None:
            server.stop()
    title = f"PostgreSQL and SQLite ({jobs} jobs x {STEPS} no-op sub-steps, one parallel phase) vs the raw floor"
    report(title, figures, "postgres.json")
    lines = [f"### {title}", "",
             "Durable commits on both: PostgreSQL fsync on, synchronous_commit=on (local server, data on disk); "
             "SQLite WAL, synchronous=FULL. 1 process: submit + run() per job; 4 processes: 4 workers at "
             f"concurrency {CONCURRENCY}, jobs submitted by a 5th. Floor: the raw driver, same schema, "
             "one transaction per job insert, per CAS + journal, and per job end. "
             f"Median of {reps} run{'s' * (reps > 1)} (floor and walstate alternating), ± half the spread; the ratio "
             "is the median of the back-to-back pairs' ratios.", "",
             "| backend | processes | walstate sub-steps/s | raw floor sub-steps/s | walstate/floor |",
             "| --- | ---: | ---: | ---: | ---: |", *rows]
    if server is None:
        lines += ["", f"PostgreSQL skipped: {why}"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "postgres.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n" + "\n".join(lines))
    return figures


if __name__ == "__main__":
    main()
