"""The chaos run and the history checker (walstate.testing.run_chaos / check_history), and their negative controls.

A small run on each backend must have no violation on today's code; each negative control puts a
known defect back in the worker processes (tests/chaos_app.py, ``WALSTATE_CHAOS_BREAK``) and the
checker must name it. The PostgreSQL restarts and the worker stopped for good failed before issue 26's
fixes of busy writes (items 1, 8) and hung owners (item 7). ``make chaos`` runs the big version (tests/chaos_run.py).

``make test`` runs the small runs on both backends and one negative control per defect, on the backend
where it is quicker; the tests (or backends) marked ``chaos`` run only under ``make chaos`` (or
``pytest -m chaos tests/test_chaos.py``): the default options deselect them.
"""

from __future__ import annotations

import os
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import chaos_app, pgserver
from walstate.testing import ChaosJob, HistoryReport, Nemeses, Workload, run_chaos

pytestmark = [pytest.mark.slow]


def backends(*, quick: str | None = None) -> pytest.MarkDecorator:
    """Run on both backends; with ``quick``, only that one outside ``make chaos`` (the other is marked ``chaos``)."""
    return pytest.mark.parametrize("backend", [
        pytest.param(b, id=b, marks=[*([pytest.mark.postgres] if b == "postgres" else []),
                                     *([pytest.mark.chaos] if quick not in (None, b) else [])])
        for b in ("sqlite", "postgres")])

APP = "tests.chaos_app:make_engine"


def workload(n: int, flow: Any = None) -> Workload:
    """``n`` jobs: two of three are orders (an outside call, a transactional step, a message), one is capped.

    With ``flow``, ``n`` jobs of that workflow.
    """
    jobs = [ChaosJob(flow, {"n": i}) if flow is not None else ChaosJob(chaos_app.capped, {"n": i}) if i % 3 == 2 else
            ChaosJob(chaos_app.order, {"n": i}, messages=(("go", {"m": i}),)) for i in range(n)]
    return Workload(jobs)


@pytest.fixture(scope="module")
def chaos_server() -> Iterator[Any]:
    """A PostgreSQL server of this module's own, which its runs may stop and restart."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed")
    if pgserver.find_bindir() is None:
        pytest.skip("no PostgreSQL server binaries")
    server = pgserver.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def target(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[str, Any]:
    """(database, server control): a SQLite file, or a new database on this module's server."""
    if backend == "sqlite":
        return str(tmp_path / "chaos.db"), None
    import psycopg

    server = request.getfixturevalue("chaos_server")
    name = f"chaos_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # a name made here, not input
    return urllib.parse.urlsplit(server.url)._replace(path=f"/{name}").geturl(), chaos_app.PgServer(server)


def chaos(target: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, breaks: str = "",
          jobs: int = 18, seed: int = 1, flow: Any = None, **kw: Any) -> HistoryReport:
    monkeypatch.setenv("WALSTATE_CHAOS_BREAK", breaks)
    for name in ("WALSTATE_CHAOS_FOREIGN", "WALSTATE_CHAOS_LEASE", "WALSTATE_CHAOS_SLOW"):
        if name in kw:
            monkeypatch.setenv(name, str(kw.pop(name)))
    db, server = target
    kw.setdefault("duration", 15.0)
    kw.setdefault("settle", 90.0)
    kw.setdefault("concurrency", 2)
    before = _library_state()
    report = run_chaos(APP, db, workload(jobs, flow), tmp_path / "run", workers=3, seed=seed, server=server, **kw)
    # The breakages are the worker processes' own: this process's library is as it was.
    assert _library_state() == before
    return report


def _library_state() -> tuple[Any, ...]:
    """What the breakages of tests/chaos_app.py patch, as this process has it."""
    from walstate import ownership
    from walstate.runtime import Worker
    from walstate.storage.postgres import PgWritePath
    from walstate.storage.writepath import WritePath
    from walstate.substep import SubStep

    return (SubStep.succeed, WritePath._RUNNABLE, PgWritePath._RUNNABLE, Worker._claim, ownership.owner_alive,
            ownership.identity())


@backends()
def test_a_small_chaos_run_of_kills_stops_clock_jumps_and_prunes_breaks_no_rule(
        target: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # duration bounds the nemeses; they end sooner once all are applied (on a fast machine, long before).
    report = chaos(target, tmp_path, monkeypatch, nemeses=Nemeses(kills=6, stops=2, clock_jumps=2, prune_every=1.0))
    report.raise_on_violation()
    assert report.counts["kills"] >= 1 and report.counts["jobs"] == 18, str(report)
    assert report.counts["jobs succeeded"] == 18, str(report)
    assert report.counts["prunes"] >= 1 and report.counts["scheduled jobs"] >= 1, str(report)


# -- negative controls: a broken build must be caught -------------------------------------------


@backends(quick="sqlite")
def test_the_checker_catches_a_completion_write_found_busy_and_run_again(target: tuple[str, Any], tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # One step per job: each process's first completion of it is given up and taken again (a few seconds each).
    report = chaos(target, tmp_path, monkeypatch, breaks="rerun-on-busy", flow=chaos_app.capped, jobs=3, duration=3.0,
                   nemeses=Nemeses())
    assert "re-run-after-return" in report.rules_broken(), str(report)


@backends(quick="sqlite")
def test_the_checker_catches_a_claim_that_ignores_the_epoch(target: tuple[str, Any], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Slow handlers and free slots: the job a stale scan takes is still running, and another worker can take it.
    report = chaos(target, tmp_path, monkeypatch, breaks="claim-ignores-epoch", jobs=18, concurrency=4,
                   nemeses=Nemeses(kills=10), WALSTATE_CHAOS_SLOW=0.5)
    # The live run it was taken from was still in its handler (two live runs), or had returned (run again).
    assert report.rules_broken() & {"two-live-runs", "re-run-after-return"}, str(report)


@pytest.mark.chaos
@backends()
def test_a_slow_dead_owner_scan_alone_breaks_no_rule(target: tuple[str, Any], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The control of the control above: the same slow scan with the epoch checked is harmless."""
    if target[1] is not None:
        pytest.skip("one backend is enough for the control of a control")
    chaos(target, tmp_path, monkeypatch, breaks="slow-scan", jobs=18, concurrency=4, nemeses=Nemeses(kills=10),
          WALSTATE_CHAOS_SLOW=0.5).raise_on_violation()


@backends(quick="sqlite")
def test_the_checker_reports_the_jobs_a_hung_owner_keeps(target: tuple[str, Any], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    report = chaos(target, tmp_path, monkeypatch, breaks="pid-liveness", jobs=9, duration=9.0, settle=12.0,
                   nemeses=Nemeses(hang=True), WALSTATE_CHAOS_LEASE=1)
    assert report.counts["hang"] == 1, str(report)
    assert "job-stuck" in report.rules_broken(), str(report)


@backends(quick="postgres")
def test_the_checker_catches_a_job_id_handed_out_again_after_a_prune(target: tuple[str, Any], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # The schedule's jobs (one a second, quick) are pruned before the next is made: each would get the same id.
    report = chaos(target, tmp_path, monkeypatch, breaks="reuse-ids", jobs=3, duration=4.0,
                   nemeses=Nemeses(prune_every=0.2))
    assert "job-id-reused" in report.rules_broken(), str(report)


@backends(quick="sqlite")
def test_the_checker_catches_a_once_record_stored_by_a_run_that_lost_its_claim(
        target: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A run stopped in its work past its lease is taken over; continued, it reaches once() before the new run
    # (whose work is longer): unfenced, it calls the function and stores its record.
    report = chaos(target, tmp_path, monkeypatch, breaks="unfenced-once", flow=chaos_app.late, jobs=3,
                   duration=8.0, nemeses=Nemeses(stops=2, stop_for=3.0, gap=(0.2, 0.5), target_step="late_charge"),
                   WALSTATE_CHAOS_LEASE=1, WALSTATE_CHAOS_FOREIGN=1)
    assert report.counts["stops"] >= 1, str(report)
    assert report.rules_broken() & {"superseded-write-committed", "once-called-twice"}, str(report)


@pytest.mark.chaos
@backends()
def test_a_run_stopped_past_its_lease_before_once_calls_nothing(target: tuple[str, Any], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The control of the control above: with once() fenced, the stale run gets LeaseLost and calls nothing."""
    chaos(target, tmp_path, monkeypatch, flow=chaos_app.late, jobs=3, duration=8.0,
          nemeses=Nemeses(stops=2, stop_for=3.0, gap=(0.2, 0.5), target_step="late_charge"),
                   WALSTATE_CHAOS_LEASE=1, WALSTATE_CHAOS_FOREIGN=1).raise_on_violation()


@backends(quick="postgres")
def test_the_checker_catches_a_schedule_slot_made_again_after_its_job_was_pruned(
        target: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = chaos(target, tmp_path, monkeypatch, breaks="forget-schedule-progress", jobs=3, duration=6.0,
                   nemeses=Nemeses(kills=2, stops=1, prune_every=0.2))
    assert report.counts["scheduled jobs"] >= 1, str(report)
    assert "schedule-slot-twice" in report.rules_broken(), str(report)


# -- runs that the fixes of issue 26 made pass (items 1, 7, 8) ----------------------------------------


@pytest.mark.chaos
@backends()
def test_postgresql_restarts_and_killed_sessions_break_no_rule(target: tuple[str, Any], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    if target[1] is None:
        pytest.skip("server restarts and session kills are PostgreSQL's")
    chaos(target, tmp_path, monkeypatch, duration=25.0,
          nemeses=Nemeses(kills=3, restarts=2, terminations=15, gap=(0.3, 1.2))).raise_on_violation()


@pytest.mark.chaos
@backends()
def test_a_worker_stopped_for_good_loses_its_jobs_to_the_others(target: tuple[str, Any], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    if target[1] is None:
        pytest.skip("on SQLite a process stopped inside a write transaction stops every writer (issue 26 item 15)")
    chaos(target, tmp_path, monkeypatch, jobs=9, duration=9.0, settle=40.0, nemeses=Nemeses(hang=True),
          WALSTATE_CHAOS_LEASE=1).raise_on_violation()


def test_a_report_names_its_seed_counts_and_evidence(tmp_path: Path) -> None:
    from walstate.testing import Violation

    report = HistoryReport(7, "x.db")
    report.counts.update({"kills": 3, "jobs": 2})
    assert str(report) == "chaos history of x.db (seed 7): jobs 2, kills 3\nno violation"
    report.violations.append(Violation("job-stuck", "job 1 is still 'running'", ("ledger {}",)))
    with pytest.raises(AssertionError, match=r"(?s)seed 7.*\[job-stuck\] job 1 is still 'running'\n    ledger \{\}"):
        report.raise_on_violation()
    assert os.environ.get("WALSTATE_CHAOS_BREAK", "") == ""
