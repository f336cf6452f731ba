"""Ownership between real processes: fork, zombies, other pid namespaces and host names, heartbeats, load.

Every test here runs real processes (``tests/proc_owner.py``, ``tests/proc_load.py``) on one SQLite
file, kills them with real signals, and judges the outcome from the file and from the outside effects
each handler execution appends to a log (one line per execution, tagged with the process id).
The pid-namespace and host-name tests use ``unshare`` (they run as root) and are skipped with the
reason when it is unavailable.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from walstate import Engine
from walstate.testing import check_invariants

from . import proc_load
from .conftest import PROFILE
from .proc_owner import Ctx, flow

from walstate.storage.postgres import is_postgres_url
from walstate.testing import connect

pytestmark = [pytest.mark.slow, pytest.mark.backends]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def effects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The outside-effect log, for the child processes and for handlers run in this process."""
    path = str(tmp_path / "effects.log")
    monkeypatch.setenv("WALSTATE_EFFECTS", path)
    return path


def lines(path: str) -> list[list[str]]:
    p = Path(path)
    return [line.split() for line in p.read_text().splitlines()] if p.exists() else []


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def run_driver(*args: str, timeout: float = 120) -> dict[str, Any]:
    """Run ``python -m tests.proc_owner ARGS`` to its end and return the JSON it prints."""
    done = subprocess.run([sys.executable, "-m", "tests.proc_owner", *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def poll(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g}s for {what}")
        time.sleep(0.005)


def job_row(db: str, job: int) -> tuple[str, str | None, int, float | None]:
    """``(state, owner, epoch, lease_expires)`` of a job, read through a connection of its own."""
    conn = connect(db, timeout=10)
    try:
        row = conn.execute("SELECT state, owner, epoch, lease_expires FROM walstate_job WHERE id=?", (job,)).fetchone()
        return str(row[0]), row[1], int(row[2]), row[3]
    finally:
        conn.close()


def owner_of(db: str, job: int) -> str | None:
    conn = connect(db, timeout=10)
    try:
        owner: str | None = conn.execute("SELECT owner FROM walstate_job WHERE id=?", (job,)).fetchone()[0]
        return owner
    finally:
        conn.close()


def notes(db: str, job: int, step: str) -> list[str | None]:
    conn = connect(db, timeout=10)
    try:
        return [n for (n,) in conn.execute("SELECT note FROM walstate_journal WHERE job_id=? AND step=? ORDER BY id",
                                           (job, step))]
    finally:
        conn.close()


@pytest.fixture
def recoverer(db_path: str) -> Iterator[Engine]:
    """An engine in this (the test's) process, with the same workflow, to recover jobs from outside."""
    engine = Engine(db_path, workers=1)
    engine.register(flow)
    yield engine
    engine.close()


# -- item 2: an Engine created before fork() -------------------------------------------------


def test_a_child_forked_from_an_engine_claims_under_its_own_token_and_its_parent_recovers_it_once_killed(
        db_path: str, effects: str) -> None:
    result = run_driver("fork-kill", db_path)
    child, job = result["child"], result["job"]
    stored = result["stored_owner"].split("|")
    assert result["stored_owner"] != result["parent_owner"], "the child claimed under its parent's owner token"
    assert int(stored[3]) == child, f"the claim names pid {stored[3]}, not the child's {child}"
    # The parent, still alive, judged its dead (reaped) child dead and took the job at once.
    assert result["child_state_at_recover"] == ""
    assert result["recovered"] == [job], result
    assert result["state"] == "succeeded"
    starts = [e for e in lines(effects) if e[0] == "start"]
    assert [int(e[1]) for e in starts] == [child, result["parent"]]
    assert "interrupted" in notes(db_path, job, "held")
    check_invariants(db_path, flow, job)


@pytest.mark.parametrize("mode", ["run", "recover"])
def test_two_children_forked_from_one_engine_never_run_the_same_step_twice(db_path: str, effects: str,
                                                                           mode: str) -> None:
    n = 12
    result = run_driver("fork-siblings", db_path, str(n), mode)
    assert result["codes"] == [0, 0], result
    ran = Counter((e[2], e[3]) for e in lines(effects) if e[0] in ("start", "run"))
    assert ran == Counter({(str(j), s): 1 for j in result["jobs"] for s in ("held", "after")}), \
        f"steps run more than once: {({k: v for k, v in ran.items() if v != 1})}"
    # Racing for the same jobs, a sibling may only be told that the other one holds a job.
    assert {e for s in result["siblings"] for e in s["errors"]} <= {"JobOwned"}, result
    assert set(result["states"].values()) == {"succeeded"}, result
    owners = {s["owner"] for s in result["siblings"]}
    assert len(owners) == 2 and result["parent_owner"] not in owners, result
    # Both siblings did some of the work (else they never raced).
    assert len({e[1] for e in lines(effects)}) == 2
    for job in result["jobs"]:
        check_invariants(db_path, flow, job)


def test_a_child_forked_while_its_parent_is_inside_a_write_transaction_writes_on_its_own_connection(
        db_path: str, effects: str) -> None:
    result = run_driver("fork-mid-write", db_path)
    # Inheriting the parent's connection and its write lock (held by a thread the child does not
    # have), the child would wait for that lock forever.
    assert not result["hung"], "the forked child hung on the write lock its parent held at fork()"
    assert result["code"] == 0, result
    assert result["child"]["state"] == "succeeded" and result["child"]["owner"] != result["parent_owner"]
    assert result["state"] == "succeeded"
    check_invariants(db_path, flow, result["child"]["job"])



def _renewed_lease_flow(db: str) -> Any:
    """One step that returns once the stored lease of its job has been renewed twice (60 s at most)."""
    from walstate import StepContext, Workflow

    w = Workflow("renewed", context=Ctx, phases=["p"])

    @w.step(phase="p")
    def wait_for_renewals(ctx: Ctx, step: StepContext) -> dict[str, int]:
        seen: set[float] = set()
        deadline = time.monotonic() + 60
        while len(seen) < 3 and time.monotonic() < deadline:
            conn = connect(db, timeout=10)
            try:
                seen.add(conn.execute("SELECT renewed_at FROM walstate_job WHERE id=?", (step.job_id,)).fetchone()[0])
            finally:
                conn.close()
            time.sleep(0.02)
        return {"held": len(seen)}

    return w


def _in_forked_child(work: Callable[[], int]) -> int:
    """Fork; the child runs ``work`` and exits with its code (2 if it raised); return the child's exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 2
        try:
            code = work()
        except BaseException as exc:
            print(f"forked child: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_child_forked_from_an_engine_whose_heartbeat_runs_renews_the_lease_of_the_job_it_runs(
        db_path: str) -> None:
    # The parent's heartbeat thread runs when it forks; the child's must be its own, started with its first claim.
    flow = _renewed_lease_flow(db_path)
    with Engine(db_path, lease=0.6) as engine:
        engine.register(flow)
        first = engine.submit(flow, Ctx())
        assert engine.run(first).context.held == 3  # the parent's heartbeat renews (and its thread now runs)
        second = engine.submit(flow, Ctx())

        def run_second() -> int:
            return 0 if engine.run(second).context.held == 3 else 3

        assert _in_forked_child(run_second) == 0, "the forked child's run was not renewed"
        assert engine.status(second).state == "succeeded"


# -- item 5: a killed, unreaped owner is dead --------------------------------------------------


def test_a_zombie_child_forked_from_an_engine_counts_as_dead_for_its_parent(db_path: str, effects: str) -> None:
    result = run_driver("fork-zombie", db_path)
    assert result["stored_owner"] != result["parent_owner"], "the child claimed under its parent's owner token"
    assert result["child_state_at_recover"] == "Z"
    assert result["recovered"] == [result["job"]], result
    assert result["state"] == "succeeded"
    check_invariants(db_path, flow, result["job"])


def test_a_killed_but_unreaped_owner_process_is_dead_and_its_job_is_recovered_at_once(
        db_path: str, effects: str, recoverer: Engine) -> None:
    worker = subprocess.Popen([sys.executable, "-m", "tests.proc_owner", "hold", db_path], cwd=ROOT,
                              env=env(WALSTATE_HOLD="120", WALSTATE_LEASE="60"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        poll(lambda: any(e[0] == "start" for e in lines(effects)), "the worker to start the held step")
        job = int(lines(effects)[0][2])
        assert owner_of(db_path, job) is not None
        worker.send_signal(signal.SIGKILL)
        # Not waited for: the killed worker stays a zombie until this process reaps it.
        poll(lambda: Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
             "the killed worker to become a zombie")
        report = recoverer.recover()
        assert Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        assert list(report) == [job], f"a zombie owner kept job {job} from recovery: {report}"
        assert recoverer.status(job).state == "succeeded"
        assert "interrupted" in notes(db_path, job, "held")
    finally:
        worker.kill()
        worker.wait()
    check_invariants(db_path, flow, job)


# -- items 3 and 4: another pid namespace, another host name, heartbeats ------------------------

LEASE = 2.0


def unshare(*flags: str) -> list[str]:
    """The ``unshare`` command line for ``flags``, or skip the test with the reason it cannot run."""
    try:
        probe = subprocess.run(["unshare", *flags, "true"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("the unshare command (util-linux) is not installed")
    if probe.returncode != 0:
        pytest.skip(f"unshare {' '.join(flags)} is not permitted here (needs root or user namespaces): "
                    f"{probe.stderr.strip()}")
    return ["unshare", *flags]


def hold_worker(prefix: list[str], **environ: str) -> subprocess.Popen[str]:
    """A worker running the held job under ``prefix`` (unshare ...), in a process group of its own."""
    return subprocess.Popen([*prefix, sys.executable, "-m", "tests.proc_owner", "hold", environ.pop("db")],
                            cwd=ROOT, env=env(**environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def kill_group(worker: subprocess.Popen[str]) -> None:
    """SIGKILL the worker and everything it started; return once none of them can write any more."""
    try:
        children = [int(p) for p in Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()]
    except OSError:
        children = []
    try:
        os.killpg(worker.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    worker.communicate(timeout=30)
    for pid in children:
        poll(lambda: proc_state(pid) in ("", "Z"), f"process {pid} to die")


def first_start(effects: str) -> tuple[int, int]:
    """``(job, pid)`` of the first execution of the held step."""
    poll(lambda: any(e[0] == "start" for e in lines(effects)), "the worker to start the held step")
    line = next(e for e in lines(effects) if e[0] == "start")
    return int(line[2]), int(line[1])


def test_a_live_run_in_another_pid_namespace_keeps_its_job_by_heartbeat_and_loses_it_only_after_its_lease(
        db_path: str, effects: str, recoverer: Engine) -> None:
    prefix = unshare("--pid", "--fork", "--mount-proc")
    worker = hold_worker(prefix, db=db_path, WALSTATE_HOLD="120", WALSTATE_LEASE=str(LEASE))
    try:
        job, inner_pid = first_start(effects)
        _, owner, epoch, first_lease = job_row(db_path, job)
        assert owner is not None and first_lease is not None
        boot, pid_ns, host = owner.split("|")[:3]
        # The premise: the same boot and host name, another pid namespace (whose pids mean nothing here).
        assert pid_ns != str(os.stat("/proc/self/ns/pid").st_ino) and host == os.uname().nodename
        assert boot == Path("/proc/sys/kernel/random/boot_id").read_text().strip()

        # For three leases, recovery from this namespace must leave the live run alone.
        leases = [first_lease]
        until = time.monotonic() + 3 * LEASE
        while time.monotonic() < until:
            report = recoverer.recover()
            assert job not in report, f"recover() took job {job} from a live run {leases[-1] - time.time():.2f}s " \
                                      "before its lease expired"
            state, now_owner, now_epoch, lease = job_row(db_path, job)
            assert (state, now_owner, now_epoch) == ("running", owner, epoch)
            assert lease is not None
            leases.append(lease)
            time.sleep(0.05)  # pacing the recovery loop, not waiting for anything
        # The heartbeat kept renewing it all along.
        assert leases[-1] > first_lease + LEASE, leases
        assert [e[0] for e in lines(effects)] == ["start"]

        kill_group(worker)
        _, _, _, expires = job_row(db_path, job)
        assert expires is not None
        refused_in_lease = 0
        deadline = time.time() + 3 * LEASE + 10
        while True:
            report = recoverer.recover()
            after = time.time()
            if job in report:
                break
            if after < expires:
                refused_in_lease += 1
            assert after < deadline, f"job {job} was not recovered {after - expires:.1f}s after its lease expired"
            time.sleep(0.02)
        assert after >= expires, "the job of a killed owner in another pid namespace was taken before its lease expired"
        assert refused_in_lease > 0
    finally:
        kill_group(worker)
    assert recoverer.status(job).state == "succeeded"
    assert [(e[0], int(e[1])) for e in lines(effects) if e[0] == "start"] == [("start", inner_pid),
                                                                              ("start", os.getpid())]
    assert "interrupted" in notes(db_path, job, "held")
    check_invariants(db_path, flow, job)


def test_a_dead_owner_with_another_host_name_in_this_pid_namespace_is_judged_by_pid_and_recovered_at_once(
        db_path: str, effects: str, recoverer: Engine) -> None:
    prefix = unshare("--uts")
    worker = hold_worker(prefix, db=db_path, WALSTATE_HOLD="120", WALSTATE_LEASE="60",
                         WALSTATE_HOSTNAME="walstate-other-host")
    try:
        job, pid = first_start(effects)
        _, owner, _, _ = job_row(db_path, job)
        assert owner is not None
        parts = owner.split("|")
        assert parts[2] == "walstate-other-host" != os.uname().nodename and int(parts[3]) == pid == worker.pid
        # Alive: its pid says so, whatever its host name.
        assert job not in recoverer.recover()
        kill_group(worker)
        # Dead, with 60 s of lease left: taken at once.
        report = recoverer.recover()
        assert list(report) == [job], f"a dead owner named by another host name kept job {job}: {report}"
    finally:
        kill_group(worker)
    assert recoverer.status(job).state == "succeeded"
    check_invariants(db_path, flow, job)


def test_a_handler_running_three_leases_in_another_pid_namespace_is_never_taken_over_by_recovery_loops(
        db_path: str, effects: str, recoverer: Engine) -> None:
    prefix = unshare("--pid", "--fork", "--mount-proc")
    lease = 1.5  # a heartbeat every 0.5 s: a margin of 1 s on a loaded machine
    worker = hold_worker(prefix, db=db_path, WALSTATE_HOLD=str(3 * lease), WALSTATE_LEASE=str(lease))
    try:
        job, _ = first_start(effects)
        deadline = time.monotonic() + 60
        while worker.poll() is None:
            assert job not in recoverer.recover(), "recover() took over a job whose handler was still running"
            assert time.monotonic() < deadline, "the worker did not finish"
            time.sleep(0.05)  # pacing the recovery loop
        out, err = worker.communicate(timeout=30)
    finally:
        kill_group(worker)
    assert worker.returncode == 0, err
    assert json.loads(out.splitlines()[-1])["state"] == "succeeded", out + err
    ran = Counter((e[0], e[3]) for e in lines(effects))
    assert ran == Counter({("start", "held"): 1, ("end", "held"): 1, ("run", "after"): 1}), ran
    conn = connect(db_path)
    claims = conn.execute("SELECT count(*) FROM walstate_journal "
                          "WHERE job_id=? AND step IS NULL AND to_state='running'", (job,)).fetchone()[0]
    conn.close()
    assert claims == 1, "the job was claimed again while its handler ran"
    check_invariants(db_path, flow, job)


# -- the load test: 3 processes x 8 threads on one file ----------------------------------------

LOAD_PROCESSES = 3
LOAD_JOBS_PER_THREAD = 20 if PROFILE == "deep" else 3  # x 8 threads x 3 processes: 72 jobs in ci
LOAD_KILLS = 10 if PROFILE == "deep" else 2
LOAD_STEPS = ("p0", "p1", "p2", "q0")  # the steps with an outside call; "tx" inserts a row instead


def running_step_owners(db: str) -> set[int]:
    """The pids of the owners of jobs with a sub-step running right now."""
    conn = connect(db, timeout=10)
    try:
        owners = conn.execute("SELECT DISTINCT j.owner FROM walstate_step s JOIN walstate_job j ON j.id = s.job_id "
                              "WHERE s.state = 'running' AND j.owner IS NOT NULL").fetchall()
    finally:
        conn.close()
    return {int(owner.split("|")[3]) for (owner,) in owners}


def run_load(db: str, effects: str, errors: str, kills: int, seed: int) -> int:
    """Run the load processes to their end, SIGKILLing (and restarting) ``kills`` of them; return the kills."""
    rng = random.Random(seed)
    conn = connect(db)
    conn.execute("CREATE TABLE app_rows (job_id INTEGER, step TEXT, pid INTEGER)")
    conn.close()
    environ = env(WALSTATE_EFFECTS=effects, WALSTATE_ERRORS=errors)

    def start(slot: int) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "tests.proc_load", db, str(slot), str(LOAD_JOBS_PER_THREAD)],
                                cwd=ROOT, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    procs = {slot: start(slot) for slot in range(LOAD_PROCESSES)}
    expected = LOAD_PROCESSES * proc_load.THREADS * LOAD_JOBS_PER_THREAD * len(LOAD_STEPS)
    # Each kill comes once the outside calls reach a random share of all of them.
    targets = sorted(rng.uniform(0.05, 0.7) * expected for _ in range(kills))
    done = 0
    for target in targets:
        poll(lambda: len(lines(effects)) >= target or all(p.poll() is not None for p in procs.values()),
             f"{target:.0f} outside calls", timeout=120)
        running = [slot for slot, p in procs.items() if p.poll() is None]
        if not running:
            break
        # Preferably a process with a step in flight, so that the kill interrupts an attempt.
        busy = [slot for slot in running if procs[slot].pid in running_step_owners(db)]
        slot = rng.choice(busy or running)
        procs[slot].send_signal(signal.SIGKILL)
        procs[slot].communicate(timeout=30)
        procs[slot] = start(slot)
        done += 1
    for slot, p in procs.items():
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"load process {slot} failed: {err}"
    return done


def load_figures(db: str, effects: str) -> tuple[list[int], Counter[tuple[int, str]], dict[tuple[int, str], int]]:
    """The jobs, how often each (job, step) made its outside call, and how often each was interrupted."""
    conn = connect(db)
    jobs = [j for (j,) in conn.execute("SELECT id FROM walstate_job ORDER BY id")]
    interrupted = {(j, s): n for j, s, n in conn.execute(
        "SELECT job_id, step, count(*) FROM walstate_journal WHERE note='interrupted' GROUP BY job_id, step")}
    conn.close()
    calls = Counter((int(e[0]), e[1]) for e in lines(effects))
    return jobs, calls, interrupted


def check_load_database(db: str, jobs: list[int]) -> None:
    conn = connect(db)
    if not is_postgres_url(db):
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    states = Counter(state for (state,) in conn.execute("SELECT state FROM walstate_job"))
    rows = Counter(j for (j,) in conn.execute("SELECT job_id FROM app_rows"))
    conn.close()
    assert len(jobs) == LOAD_PROCESSES * proc_load.THREADS * LOAD_JOBS_PER_THREAD
    assert states == Counter({"succeeded": len(jobs)}), states
    # The transactional step's row exists exactly once per job.
    assert rows == Counter({j: 1 for j in jobs}), {j: n for j, n in rows.items() if n != 1}
    for job in jobs:
        check_invariants(db, proc_load.flow, job)  # attempts 1, 2, 3... never going down, per step


def caller_errors(errors: str) -> Counter[tuple[str, str]]:
    """What reached callers: ``(where, exception type)`` counts, ``JobOwned`` (someone else runs it) left out."""
    return Counter((e[1], e[2]) for e in lines(errors) if e[2] != "JobOwned")


def test_three_processes_of_eight_threads_recovering_each_other_run_every_step_exactly_once(
        db_path: str, effects: str, tmp_path: Path) -> None:
    errors = str(tmp_path / "errors.log")
    run_load(db_path, effects, errors, kills=0, seed=0)
    jobs, calls, interrupted = load_figures(db_path, effects)
    # No process died, so no caller lost a claim: not one StaleState or LeaseLost (or anything else).
    assert caller_errors(errors) == Counter()
    assert interrupted == {}
    repeated = {k: n for k, n in calls.items() if n != 1}
    assert calls == Counter({(j, s): 1 for j in jobs for s in LOAD_STEPS}), f"repeated outside calls: {repeated}"
    # Every job is terminal without any further recovery.
    check_load_database(db_path, jobs)
    print(f"load without kills: {len(jobs)} jobs, {sum(calls.values())} outside calls, 0 repeated, "
          f"{sum(1 for e in lines(errors))} JobOwned told to callers")


def test_three_processes_of_eight_threads_sigkilled_at_random_repeat_only_calls_a_kill_interrupted(
        db_path: str, effects: str, tmp_path: Path) -> None:
    errors = str(tmp_path / "errors.log")
    seed = int(os.environ.get("WALSTATE_LOAD_SEED", random.randrange(1 << 32)))
    kills = run_load(db_path, effects, errors, kills=LOAD_KILLS, seed=seed)
    assert kills == LOAD_KILLS, f"seed {seed}: the processes finished before all kills were made"
    with Engine(db_path, workers=2) as engine:
        engine.register(proc_load.flow)
        engine.recover()
    jobs, calls, interrupted = load_figures(db_path, effects)
    where = f"seed {seed} (replay with WALSTATE_LOAD_SEED={seed})"
    # A killed process's callers are gone; the living ones never lost a claim.
    assert caller_errors(errors) == Counter(), where
    assert {k for k, n in calls.items() if n == 0} == set()
    assert set(calls) == {(j, s) for j in jobs for s in LOAD_STEPS}, where
    # An outside call repeats only for a step whose attempt a kill interrupted, once per interruption at most.
    beyond = {k: (n, interrupted.get(k, 0)) for k, n in calls.items() if n > 1 + interrupted.get(k, 0)}
    assert beyond == {}, f"{where}: outside calls repeated without an interruption: {beyond}"
    check_load_database(db_path, jobs)
    repeated = sum(n - 1 for n in calls.values())
    print(f"load with kills ({where}): {len(jobs)} jobs, {kills} SIGKILLs, {sum(interrupted.values())} "
          f"interrupted attempts, {repeated} repeated outside calls")


FORK_WHILE_CONNECTING = """
import os, sys, threading, time
from pydantic import BaseModel
from walstate import Engine, Workflow

class C(BaseModel):
    n: int = 0

flow = Workflow("w", context=C, phases=["p"])
flow.step(phase="p", name="one")(lambda ctx, step: None)
engine = Engine(sys.argv[1], workers=1)
engine.register(flow)
held, release = threading.Event(), threading.Event()

def connecting() -> None:
    # As a thread of the parent opening its connection at the moment of fork() does.
    with engine.store.db._lock:
        held.set()
        release.wait()

t = threading.Thread(target=connecting)
t.start()
held.wait()
child = os.fork()
if child == 0:
    try:
        engine.run(engine.submit(flow, C()))
        os._exit(0)
    except BaseException:
        os._exit(1)
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    done, status = os.waitpid(child, os.WNOHANG)
    if done:
        break
    time.sleep(0.01)
else:
    os.kill(child, 9)
    os.waitpid(child, 0)
    status = 1 << 8
release.set()
t.join()
print("child exit", os.waitstatus_to_exitcode(status))
"""


def test_a_child_forked_while_a_parent_thread_opens_its_connection_opens_its_own(db_path: str) -> None:
    done = subprocess.run([sys.executable, "-c", FORK_WHILE_CONNECTING, db_path], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip() == "child exit 0", done.stdout + done.stderr
