"""The job runtime between real processes: ``walstate worker`` processes sharing one file.

Workers here are real ``walstate worker DB --app tests.proc_runtime:make_engine`` processes; the tests
submit jobs (from this process or from submitting processes), stop workers with real SIGTERM and
SIGKILL, and judge the outcome from the file and from the outside effects each handler execution
appends to a log (one line per execution, tagged with its process id; see ``tests/proc_runtime.py``).
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from walstate import Engine
from walstate.storage.postgres import is_postgres_url
from walstate.testing import check_invariants, connect

from . import proc_runtime
from .conftest import PROFILE
from .proc_runtime import Ctx

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def lines(path: str | Path) -> list[list[str]]:
    p = Path(path)
    return [line.split() for line in p.read_text().splitlines()] if p.exists() else []


def poll(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g}s for {what}")
        time.sleep(0.005)


def query(db: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows read through a connection of their own (what any other process sees), on either backend."""
    conn = connect(db, timeout=10)
    try:
        return [tuple(r) for r in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()


def job_states(db: str) -> Counter[str]:
    return Counter(state for (state,) in query(db, "SELECT state FROM walstate_job"))


def step_row(db: str, job: int, step: str) -> tuple[str, int]:
    state, attempt = query(db, "SELECT state, attempt FROM walstate_step WHERE job_id=? AND name=?", (job, step))[0]
    return str(state), int(attempt)


def notes(db: str, job: int, step: str | None) -> list[str | None]:
    if step is None:
        return [n for (n,) in query(db, "SELECT note FROM walstate_journal WHERE job_id=? AND step IS NULL ORDER BY id",
                                    (job,))]
    return [n for (n,) in query(db, "SELECT note FROM walstate_journal WHERE job_id=? AND step=? ORDER BY id",
                                (job, step))]


class Procs:
    """The processes a test starts: ``walstate worker`` processes and scripts, output in files, killed at the end."""

    def __init__(self, db: str, tmp: Path, effects: str) -> None:
        self.db = db
        self.tmp = tmp
        self.environ = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "WALSTATE_EFFECTS": effects}
        self.started: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, tuple[Path, Path]] = {}

    def _popen(self, args: list[str], _WRAP: str | None = None, **extra: str) -> subprocess.Popen[bytes]:
        n = len(self.started)
        out, err = self.tmp / f"proc{n}.out", self.tmp / f"proc{n}.err"
        command = [sys.executable, *args]
        if _WRAP is not None:
            # Another "host": new pid, mount (for /proc) and UTS namespaces; the child dies with unshare.
            command = ["unshare", "--uts", "--pid", "--mount-proc", "--kill-child=SIGKILL",
                       "sh", "-c", 'hostname "$0" && exec "$@"', _WRAP, *command]
        with out.open("wb") as o, err.open("wb") as e:
            p = subprocess.Popen(command, cwd=ROOT, env={**self.environ, **extra}, stdout=o, stderr=e)
        self.started.append(p)
        self.logs[p.pid] = (out, err)
        return p

    def worker(self, concurrency: int, *, ready: bool = True, host: tuple[str, float, str] | None = None,
               **extra: str) -> subprocess.Popen[bytes]:
        """A ``walstate worker`` process; with ``ready``, returned once its worker loop runs.

        ``host=(name, skew, how)`` simulates another host: the worker runs in a pid and UTS namespace
        of its own (``unshare``, host name ``name``; liveness across them is judged by lease alone),
        with its clock ``skew`` seconds off: ``how="patched"`` patches ``time.time`` before walstate
        loads (the machine's clock is off), ``"injected"`` gives the app's Engine a skewed ``clock=``.
        """
        args = ["-m", "walstate", "worker", self.db, "--app", "tests.proc_runtime:make_engine",
                "--concurrency", str(concurrency), "--grace", "30"]
        if host is None:
            p = self._popen(args, **extra)
        elif host[2] == "injected":
            p = self._popen(args, _WRAP=host[0], WALSTATE_CLOCK_SKEW=repr(host[1]), **extra)
        else:
            name, skew, _ = host
            code = (f"import runpy, sys, time; real = time.time; time.time = lambda: real() + {skew!r}; "
                    f"sys.argv = ['walstate', *sys.argv[1:]]; runpy.run_module('walstate', run_name='__main__')")
            p = self._popen(["-c", code, *args[2:]], _WRAP=name, **extra)
        if ready:
            self.ready(p)
        return p

    def ready(self, p: subprocess.Popen[bytes]) -> None:
        """Return once the worker's loop runs (and its SIGTERM handler is installed)."""
        poll(lambda: "worker on" in self.out(p) or p.poll() is not None, f"worker {p.pid} to start")
        assert p.poll() is None, f"worker {p.pid} exited {p.returncode}: {self.err(p)}"

    def script(self, *args: str, **extra: str) -> subprocess.Popen[bytes]:
        """``python -m tests.proc_runtime ARGS``."""
        return self._popen(["-m", "tests.proc_runtime", *args], **extra)

    def out(self, p: subprocess.Popen[bytes]) -> str:
        return self.logs[p.pid][0].read_text()

    def err(self, p: subprocess.Popen[bytes]) -> str:
        return self.logs[p.pid][1].read_text()

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 60) -> int:
        """SIGTERM a worker and return its exit code."""
        if isinstance(p.args, list) and p.args[0] == "unshare":
            # unshare does not pass SIGTERM on: signal the worker itself (its only child).
            children = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
            for child in children:
                os.kill(int(child), signal.SIGTERM)
        else:
            p.send_signal(signal.SIGTERM)
        return p.wait(timeout=timeout)

    def pid_namespaces(self, p: subprocess.Popen[bytes]) -> set[str]:
        """The pid namespace of the worker ``p`` runs (of its child, for a simulated host)."""
        pids = [p.pid]
        if isinstance(p.args, list) and p.args[0] == "unshare":
            pids = [int(c) for c in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()]
        return {str(os.stat(f"/proc/{pid}/ns/pid").st_ino) for pid in pids}

    def kill(self, p: subprocess.Popen[bytes]) -> None:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)

    def close(self) -> None:
        for p in self.started:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


@pytest.fixture
def effects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    path = str(tmp_path / "effects.log")
    monkeypatch.setenv("WALSTATE_EFFECTS", path)
    return path


@pytest.fixture
def procs(db_path: str, tmp_path: Path, effects: str) -> Iterator[Procs]:
    p = Procs(db_path, tmp_path, effects)
    yield p
    p.close()


@pytest.fixture
def app(db_path: str) -> Iterator[Engine]:
    """The app's engine in this (the test's) process, to submit jobs; it runs no worker."""
    engine = proc_runtime.make_engine(db_path)
    yield engine
    engine.close()


# -- the load test: 4 worker processes x 8 threads, 2 submitting processes, SIGKILLs ------------

LOAD_WORKERS = 4
LOAD_CONCURRENCY = 8
LOAD_SUBMITTERS = 2
LOAD_JOBS_PER_SUBMITTER = 500 if PROFILE == "deep" else 30  # 60 jobs in ci, 1000 in deep
LOAD_STOPS = 20 if PROFILE == "deep" else 2  # SIGKILLs (or SIGTERMs) of a worker


def running_step_pids(db: str) -> set[int]:
    """The pids of the owners of jobs with a sub-step running right now."""
    owners = query(db, "SELECT DISTINCT j.owner FROM walstate_step s JOIN walstate_job j ON j.id = s.job_id "
                       "WHERE s.state = 'running' AND j.owner IS NOT NULL")
    return {int(owner.split("|")[3]) for (owner,) in owners}


class LoadRun:
    """What one run of the load test left: its jobs, their outside calls, and figures to report."""

    def __init__(self, jobs: list[int], calls: Counter[tuple[int, str]], interrupted: dict[tuple[int, str], int],
                 where: str, summary: str) -> None:
        self.jobs, self.calls, self.interrupted, self.where, self.summary = jobs, calls, interrupted, where, summary
        #: The pid namespaces (inode numbers) of the workers SIGKILLed.
        self.killed_ns: set[str] = set()


def run_load(db_path: str, effects: str, procs: Procs, tmp_path: Path, signum: signal.Signals,
             hosts: list[tuple[str, float, str]] | None = None) -> LoadRun:
    """4 workers x 8 and 2 submitters; ``LOAD_STOPS`` times a worker gets ``signum`` and is restarted.

    Returns once every job succeeded, after checking what holds whatever the signal: nothing reached
    a submitting caller, no worker met a busy file, each transactional row exists once, every
    job's journal is legal, ``integrity_check`` is ok, every worker SIGTERMed exits 0.
    """
    seed = int(os.environ.get("WALSTATE_LOAD_SEED", random.randrange(1 << 32)))
    where = f"seed {seed} (replay with WALSTATE_LOAD_SEED={seed})"
    rng = random.Random(seed)
    errors = str(tmp_path / "errors.log")
    Engine(db_path).close()  # the schema, before the app's own table
    conn = connect(db_path)
    conn.execute("CREATE TABLE app_rows (job_id INTEGER, pid INTEGER)")
    conn.commit()
    conn.close()

    def host(i: int) -> tuple[str, float, str] | None:
        return None if hosts is None else hosts[i % len(hosts)]
    n_jobs = LOAD_SUBMITTERS * LOAD_JOBS_PER_SUBMITTER
    expected_calls = n_jobs * len(proc_runtime.LOAD_CALLS)
    began = time.monotonic()

    workers = [procs.worker(LOAD_CONCURRENCY, host=host(i)) for i in range(LOAD_WORKERS)]
    every_worker = list(workers)
    submitters = [procs.script("submit", db_path, str(slot), str(LOAD_JOBS_PER_SUBMITTER), WALSTATE_ERRORS=errors)
                  for slot in range(LOAD_SUBMITTERS)]
    # Each signal comes once the outside calls reach a random share of all of them.
    targets = sorted(rng.uniform(0.05, 0.7) * expected_calls for _ in range(LOAD_STOPS))
    stops = 0
    killed_ns: set[str] = set()
    for target in targets:
        poll(lambda: len(lines(effects)) >= target, f"{target:.0f} outside calls ({where})", timeout=120)
        # Preferably a worker with a step in flight, so that the signal lands mid-step.
        busy = [i for i, w in enumerate(workers) if w.pid in running_step_pids(db_path)]
        i = rng.choice(busy or list(range(LOAD_WORKERS)))
        if signum == signal.SIGKILL:
            killed_ns.update(procs.pid_namespaces(workers[i]))
            procs.kill(workers[i])
        else:
            procs.ready(workers[i])  # a worker still starting up would die of SIGTERM before its handler exists
            assert procs.stop(workers[i]) == 0, f"{where}: {procs.err(workers[i])}"
        stops += 1
        workers[i] = procs.worker(LOAD_CONCURRENCY, ready=False, host=host(i))
        every_worker.append(workers[i])
    for s in submitters:
        assert s.wait(timeout=120) == 0, procs.err(s)
    # After the last signal, the living and restarted workers finish everything by themselves.
    poll(lambda: job_states(db_path) == Counter({"succeeded": n_jobs}),
         f"every job to succeed ({where}); now {job_states(db_path)}", timeout=120)
    elapsed = time.monotonic() - began
    for w in workers:
        procs.ready(w)
        assert procs.stop(w) == 0, procs.err(w)

    assert stops == LOAD_STOPS, where
    # Nothing reached a submitting caller; no worker ever met a busy file.
    assert lines(errors) == [], f"{where}: {lines(errors)}"
    busy_logs = {w.pid: procs.err(w) for w in every_worker if "DatabaseBusy" in procs.err(w)}
    assert busy_logs == {}, f"{where}: {busy_logs}"
    if not is_postgres_url(db_path):
        assert query(db_path, "PRAGMA integrity_check") == [("ok",)]
    jobs = [j for (j,) in query(db_path, "SELECT id FROM walstate_job ORDER BY id")]
    assert len(jobs) == n_jobs
    # The transactional step's row exists exactly once per job.
    rows = Counter(j for (j,) in query(db_path, "SELECT job_id FROM app_rows"))
    assert rows == Counter({j: 1 for j in jobs}), f"{where}: {({j: n for j, n in rows.items() if n != 1})}"
    calls = Counter((int(e[2]), e[3]) for e in lines(effects))
    interrupted = {(j, s): n for j, s, n in query(
        db_path, "SELECT job_id, step, count(*) FROM walstate_journal WHERE note='interrupted' GROUP BY job_id, step")}
    assert set(calls) == {(j, s) for j in jobs for s in proc_runtime.LOAD_CALLS}, where
    for job in jobs:
        check_invariants(db_path, proc_runtime.load, job)
    job_notes = [n or "" for (n,) in query(db_path, "SELECT note FROM walstate_journal WHERE step IS NULL")]
    pids = Counter(int(e[1]) for e in lines(effects))
    loop_errors = sum(procs.err(w).count("trying again") for w in every_worker)
    summary = (f"{n_jobs} jobs on {LOAD_WORKERS} workers x {LOAD_CONCURRENCY} ({len(every_worker)} worker processes "
               f"in all, {len(pids)} ran calls), {stops} {signum.name}s, "
               f"{sum(n.startswith('claimed from') for n in job_notes)} takeovers, "
               f"{sum(n.startswith('released') for n in job_notes)} releases, {sum(interrupted.values())} "
               f"interrupted attempts, {sum(n - 1 for n in calls.values())} repeated outside calls, {loop_errors} "
               f"worker-loop errors retried, {elapsed:.1f}s")
    run = LoadRun(jobs, calls, interrupted, where, summary)
    run.killed_ns = killed_ns
    return run


@pytest.mark.backends
def test_four_worker_processes_sigkilled_at_random_finish_every_job_repeating_only_interrupted_calls(
        db_path: str, effects: str, procs: Procs, tmp_path: Path) -> None:
    run = run_load(db_path, effects, procs, tmp_path, signal.SIGKILL)
    # An outside call repeats only for a step whose attempt a kill interrupted, once per interruption at most.
    beyond = {k: (n, run.interrupted.get(k, 0)) for k, n in run.calls.items() if n > 1 + run.interrupted.get(k, 0)}
    assert beyond == {}, f"{run.where}: outside calls repeated without an interruption: {beyond}"
    print(f"runtime load ({run.where}): {run.summary}")


@pytest.mark.backends
def test_four_worker_processes_stopped_with_sigterm_at_random_interrupt_nothing_and_repeat_no_call(
        db_path: str, effects: str, procs: Procs, tmp_path: Path) -> None:
    run = run_load(db_path, effects, procs, tmp_path, signal.SIGTERM)
    # A graceful stop lets steps in flight finish: nothing is interrupted, no call runs twice.
    assert run.interrupted == {}, run.where
    repeated = {k: n for k, n in run.calls.items() if n != 1}
    assert repeated == {}, f"{run.where}: outside calls repeated after SIGTERMs: {repeated}"
    print(f"runtime load ({run.where}): {run.summary}")


#: Four simulated hosts: their own pid and UTS namespaces, wall clocks up to 30 s apart.
HOSTS = [("host-a", -30.0), ("host-b", 30.0), ("host-c", -12.5), ("host-d", 21.0)]


@pytest.mark.postgres
@pytest.mark.parametrize("how", ["patched", "injected"])
def test_workers_on_four_hosts_with_clocks_30s_apart_share_postgres_and_survive_kills_running_nothing_twice(
        pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    # A 5 s lease against clocks 60 s apart: judged by its own clock, a host would find every other
    # host's lease long expired (or never expiring). Only the server's clock makes them agree.
    monkeypatch.setenv("WALSTATE_LEASE", "5")
    effects = str(tmp_path / "effects.log")
    monkeypatch.setenv("WALSTATE_EFFECTS", effects)
    procs = Procs(pg_database, tmp_path, effects)
    try:
        run = run_load(pg_database, effects, procs, tmp_path, signal.SIGKILL, hosts=[(h, skew, how) for h, skew in HOSTS])
    finally:
        procs.close()
    beyond = {k: (n, run.interrupted.get(k, 0)) for k, n in run.calls.items() if n > 1 + run.interrupted.get(k, 0)}
    assert beyond == {}, f"{run.where}: outside calls repeated without an interruption: {beyond}"
    # Every takeover was of a killed worker's job (judged by lease: each worker had a pid namespace
    # of its own), never of a live host's whose lease a skewed clock misread.
    taken = {n.split()[2].rstrip(",") for (n,) in query(
        pg_database, "SELECT note FROM walstate_journal WHERE note LIKE 'claimed from %'")}
    assert taken, f"{run.where}: no job of a killed worker was taken over"
    assert {owner.split("|")[1] for owner in taken} <= run.killed_ns, (taken, run.killed_ns)
    print(f"multi-host load ({run.where}): {run.summary}")


# -- SIGTERM ----------------------------------------------------------------------------------


def test_a_worker_stopped_with_sigterm_mid_job_finishes_its_step_releases_the_job_and_exits_0(
        db_path: str, effects: str, procs: Procs, app: Engine) -> None:
    first = procs.worker(2, WALSTATE_HOLD="1.0")
    job = app.submit(proc_runtime.slow, Ctx(), key="sigterm")
    poll(lambda: any(e[0] == "start" for e in lines(effects)), "the worker to start the held step")
    signalled = time.time()
    assert procs.stop(first) == 0, procs.err(first)

    # The step in flight when SIGTERM came finished, and the next one never started.
    ran = [(e[0], int(e[1]), e[3]) for e in lines(effects)]
    assert ran == [("start", first.pid, "held"), ("end", first.pid, "held")], ran
    assert float(lines(effects)[1][4]) > signalled, "the held step was not in flight when SIGTERM came"
    assert step_row(db_path, job, "held") == ("succeeded", 1)
    assert "interrupted" not in notes(db_path, job, "held")
    assert step_row(db_path, job, "after") == ("pending", 0)
    # Released, journalled, for another worker.
    state, owner = query(db_path, "SELECT state, owner FROM walstate_job WHERE id=?", (job,))[0]
    assert owner is None and state != "succeeded", (state, owner)
    assert any(n and n.startswith("released") for n in notes(db_path, job, None)), notes(db_path, job, None)
    assert "worker stopped" in procs.out(first)

    second = procs.worker(2)
    poll(lambda: app.status(job).state == "succeeded", "the second worker to finish the job")
    assert procs.stop(second) == 0, procs.err(second)
    ran = [(e[0], int(e[1]), e[3]) for e in lines(effects)]
    assert ran == [("start", first.pid, "held"), ("end", first.pid, "held"), ("run", second.pid, "after")], ran
    check_invariants(db_path, proc_runtime.slow, job)


# -- sharing work ------------------------------------------------------------------------------


def test_workers_in_three_processes_share_the_jobs_and_run_no_step_twice(
        db_path: str, effects: str, procs: Procs, app: Engine) -> None:
    workers = [procs.worker(2, WALSTATE_HOLD="0.05") for _ in range(3)]
    jobs = [app.submit(proc_runtime.slow, Ctx(), key=f"share-{i}") for i in range(24)]
    poll(lambda: job_states(db_path) == Counter({"succeeded": len(jobs)}), "every job to succeed")
    for w in workers:
        assert procs.stop(w) == 0, procs.err(w)

    ran = Counter((e[0], int(e[2]), e[3]) for e in lines(effects))
    assert ran == Counter({(tag, j, s): 1 for j in jobs for tag, s in (("start", "held"), ("end", "held"),
                                                                        ("run", "after"))}), \
        {k: n for k, n in ran.items() if n != 1}
    # Each job was claimed once: no worker took a job another held.
    claims = Counter(j for (j,) in query(db_path, "SELECT job_id FROM walstate_journal "
                                                  "WHERE step IS NULL AND to_state='running'"))
    assert claims == Counter({j: 1 for j in jobs}), {j: n for j, n in claims.items() if n != 1}
    per_pid = Counter(int(e[1]) for e in lines(effects) if e[0] == "start")
    assert set(per_pid) <= {w.pid for w in workers}
    assert len(per_pid) > 1, f"one worker ran every job: {per_pid}"
    print(f"jobs per worker process: {sorted(per_pid.values(), reverse=True)}")
    for job in jobs:
        check_invariants(db_path, proc_runtime.slow, job)


# -- automatic recovery -----------------------------------------------------------------------


def test_a_running_worker_takes_over_the_job_of_a_killed_process_by_itself(
        db_path: str, effects: str, procs: Procs, app: Engine) -> None:
    runner = procs.script("run", db_path, WALSTATE_HOLD="120")
    poll(lambda: any(e[0] == "start" for e in lines(effects)), "the process to start the held step")
    job = int(lines(effects)[0][2])
    worker = procs.worker(2)  # started before the kill; it must leave the live run alone
    (owner,), = query(db_path, "SELECT owner FROM walstate_job WHERE id=?", (job,))
    assert int(owner.split("|")[3]) == runner.pid
    procs.kill(runner)
    killed = time.monotonic()
    poll(lambda: app.status(job).state == "succeeded", "the worker to finish the killed process's job")
    took = time.monotonic() - killed
    assert procs.stop(worker) == 0, procs.err(worker)

    ran = [(e[0], int(e[1]), e[3]) for e in lines(effects)]
    assert ran == [("start", runner.pid, "held"), ("start", worker.pid, "held"), ("end", worker.pid, "held"),
                   ("run", worker.pid, "after")], ran
    assert "interrupted" in notes(db_path, job, "held")
    assert any(n and n.startswith("claimed from") for n in notes(db_path, job, None)), notes(db_path, job, None)
    print(f"killed process's job finished by a running worker {took:.2f}s after the kill")
    check_invariants(db_path, proc_runtime.slow, job)


# -- per-workflow concurrency -----------------------------------------------------------------


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an exit at the same instant as an enter closes first)."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    now = most = 0
    for _, delta in events:
        now += delta
        most = max(most, now)
    return most


def test_a_workflow_capped_at_two_never_runs_more_than_two_jobs_at_once_across_worker_processes(
        db_path: str, effects: str, procs: Procs, app: Engine, tmp_path: Path) -> None:
    times = tmp_path / "times"
    times.mkdir()
    workers = [procs.worker(4, WALSTATE_TIMES=str(times), WALSTATE_CAPPED_SECONDS="0.2") for _ in range(2)]
    jobs = [app.submit(proc_runtime.capped, Ctx(), key=f"capped-{i}") for i in range(8)]
    poll(lambda: job_states(db_path) == Counter({"succeeded": len(jobs)}), "every capped job to succeed")
    for w in workers:
        assert procs.stop(w) == 0, procs.err(w)

    intervals: list[tuple[float, float]] = []
    per_pid: dict[str, int] = {}
    for f in times.iterdir():
        enters = {e[2]: float(e[1]) for e in lines(f) if e[0] == "enter"}
        exits = {e[2]: float(e[1]) for e in lines(f) if e[0] == "exit"}
        assert set(enters) == set(exits)
        intervals += [(enters[j], exits[j]) for j in enters]
        per_pid[f.stem] = len(enters)
    assert len(intervals) == len(jobs)
    most = max_overlap(intervals)
    assert most <= 2, f"{most} jobs of a workflow capped at 2 ran at once"
    assert most == 2, "the capped jobs never ran two at once: the test proves nothing"
    print(f"capped workflow: at most {most} jobs at once; handlers per worker process {sorted(per_pid.values())}")


# -- cross-process wake-up --------------------------------------------------------------------


def test_a_job_submitted_by_another_process_starts_on_an_idle_worker_within_a_second(
        db_path: str, effects: str, procs: Procs, app: Engine) -> None:
    worker = procs.worker(2)
    latencies = []
    for i in range(5):
        submitted = time.time()
        job = app.submit(proc_runtime.ping, Ctx(), key=f"ping-{i}")
        poll(lambda: any(e[0] == "started" and int(e[2]) == job for e in lines(effects)), f"job {job} to start")
        latencies.append(next(float(e[4]) for e in lines(effects) if int(e[2]) == job) - submitted)
        # Idle again before the next submission.
        poll(lambda: app.status(job).state == "succeeded", f"job {job} to end")
    assert procs.stop(worker) == 0, procs.err(worker)
    assert max(latencies) < 1.0, f"submit-to-start latencies across processes: {latencies}"
    print(f"cross-process submit-to-start: median {statistics.median(latencies) * 1000:.0f} ms, "
          f"max {max(latencies) * 1000:.0f} ms over {len(latencies)} jobs")
