"""Retention: engine.prune and `walstate prune` delete old finished jobs and nothing else."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from walstate import ConfigurationError, Engine, StepContext, Workflow
from walstate.cli import duration
from walstate.storage import Store, retention

from .conftest import trace
from walstate.testing import connect

DAY = 86400.0


class Ctx(BaseModel):
    fail: bool = False
    token: str | None = None


flow = Workflow("keep", context=Ctx, phases=["p"])


@flow.step(phase="p")
def work(ctx: Ctx, step: StepContext) -> dict[str, Any]:
    token = step.once("token", lambda: f"t{step.job_id}")
    if ctx.fail:
        raise ValueError("no")
    return {"token": token}


def engine_on(path: str, **kw: Any) -> Engine:
    engine = Engine(path, workers=1, **kw)
    engine.register(flow)
    return engine


def age(path: str, job_ids: list[int], seconds: float) -> None:
    """Make jobs look as if their last change was ``seconds`` ago (a real file, an older clock)."""
    conn = connect(path)
    with conn:
        conn.executemany("UPDATE walstate_job SET updated_at=? WHERE id=?",
                         [(time.time() - seconds, j) for j in job_ids])
    conn.close()


def rows_of(path: str, job_id: int) -> dict[str, int]:
    conn = connect(path)
    counts = {t: conn.execute(f"SELECT count(*) FROM walstate_{t} WHERE {'id' if t == 'job' else 'job_id'}=?",
                              (job_id,)).fetchone()[0] for t in ("job", "step", "journal", "once")}
    conn.close()
    return counts


def fill_finished(path: str, n: int, state: str = "succeeded", finished_ago: float = 2 * DAY) -> None:
    """``n`` finished jobs with one step, two journal rows and a once() record each, by raw SQL."""
    Store(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    first = (conn.execute("SELECT max(id) FROM walstate_job").fetchone()[0] or 0) + 1
    ids = range(first, first + n)
    when = time.time() - finished_ago
    conn.executemany("INSERT INTO walstate_job (id, workflow, state, context, initial_context, created_at, updated_at) "
                     "VALUES (?, 'keep', ?, '{}', '{}', ?, ?)", ((i, state, when, when) for i in ids))
    conn.executemany("INSERT INTO walstate_step (job_id, name, phase, position, state, attempt, updated_at) "
                     "VALUES (?, 'work', 'p', 0, ?, 1, ?)", ((i, state, when) for i in ids))
    conn.executemany("INSERT INTO walstate_journal (job_id, step, from_state, to_state, attempt, at) "
                     "VALUES (?, 'work', ?, ?, 1, ?)",
                     ((i, a, b, when) for i in ids for a, b in (("pending", "running"), ("running", state))))
    conn.executemany("INSERT INTO walstate_once (job_id, step, name, result, at) VALUES (?, 'work', 'token', '1', ?)",
                     ((i, when) for i in ids))
    conn.execute("COMMIT")
    conn.close()


@pytest.mark.backends
def test_prune_deletes_old_finished_jobs_with_every_row_and_leaves_unfinished_failed_and_newer_ones(db_path: str) -> None:
    with engine_on(db_path) as engine:
        old_ok = engine.submit("keep", Ctx())
        old_cancelled = engine.submit("keep", Ctx())
        old_failed = engine.submit("keep", Ctx(fail=True))
        new_ok = engine.submit("keep", Ctx())
        pending = engine.submit("keep", Ctx())
        running = engine.submit("keep", Ctx())
        for job in (old_ok, new_ok):
            engine.run(job)
        with pytest.raises(Exception, match="failed"):
            engine.run(old_failed)
        from walstate import operator

        operator.cancel(engine.store, old_cancelled)
        conn = connect(db_path)
        with conn:
            conn.execute("UPDATE walstate_job SET state='running' WHERE id=?", (running,))
        conn.close()
        age(db_path, [old_ok, old_cancelled, old_failed, pending, running], 2 * DAY)
        kept = {j: rows_of(db_path, j) for j in (old_failed, new_ok, pending, running)}
        assert rows_of(db_path, old_ok)["once"] == 1 and rows_of(db_path, old_ok)["journal"] > 0

        assert engine.prune(timedelta(days=1)) == 2

        for gone in (old_ok, old_cancelled):
            assert rows_of(db_path, gone) == {"job": 0, "step": 0, "journal": 0, "once": 0}
        assert {j: rows_of(db_path, j) for j in kept} == kept
        assert engine.status(new_ok).state == "succeeded"
        # Failed jobs go only when asked for by name.
        assert engine.prune(DAY, states=("failed",)) == 1
        assert rows_of(db_path, old_failed)["job"] == 0
        assert engine.status(pending).state == "pending"


@pytest.mark.parametrize("states", [("pending",), ("succeeded", "running"), ()])
def test_prune_refuses_states_that_are_not_finished(db_path: str, states: tuple[str, ...]) -> None:
    with engine_on(db_path) as engine, pytest.raises(ConfigurationError, match="finished"):
        engine.prune(0, states=states)


@pytest.mark.backends
def test_prune_refuses_a_negative_age_and_an_empty_batch(db_path: str) -> None:
    with engine_on(db_path) as engine:
        with pytest.raises(ConfigurationError, match=">= 0"):
            engine.prune(-1)
        with pytest.raises(ConfigurationError, match="batch"):
            engine.prune(0, batch=0)


def file_bytes(path: str) -> tuple[bytes, ...]:
    return tuple(Path(p).read_bytes() if Path(p).exists() else b"" for p in (path, path + "-wal"))


def test_a_dry_run_counts_the_jobs_and_changes_no_byte_of_the_file(db_path: str) -> None:
    fill_finished(db_path, 30)
    with engine_on(db_path) as engine:
        before = file_bytes(db_path)
        assert engine.prune(DAY, dry_run=True) == 30
        assert file_bytes(db_path) == before
        assert engine.prune(DAY, dry_run=True) == 30


def test_prune_deletes_in_batches_each_in_its_own_short_transaction(db_path: str) -> None:
    fill_finished(db_path, 25)
    with engine_on(db_path) as engine:
        log = trace(engine.store.db)
        assert engine.prune(DAY, batch=10) == 25
        begins = [i for i, s in enumerate(log.statements) if s.startswith("BEGIN")]
        assert len(begins) == 3 and log.count("COMMIT") == 3
        # Distinct statements: SQLite traces each foreign-key action as another run of the parent DELETE.
        per_transaction = [
            len({s for s in log.statements[a:b] if s.startswith("DELETE FROM walstate_job WHERE")})
            for a, b in zip(begins, begins[1:] + [len(log.statements)])
        ]
        assert per_transaction == [10, 10, 5]


def test_finding_finished_jobs_searches_the_finished_at_index_instead_of_scanning_the_table(store: Store) -> None:
    conn = store.db.connection()
    plan = conn.execute("EXPLAIN QUERY PLAN " + retention._PICK, (1.0, 0.0, '["succeeded"]', 10)).fetchall()
    detail = " | ".join(str(row[-1]) for row in plan)
    assert "SEARCH walstate_job USING INDEX job_finished_at" in detail, detail
    assert "SCAN walstate_job" not in detail, detail
    plan = conn.execute("EXPLAIN QUERY PLAN " + retention._COUNT, (1.0, '["succeeded"]')).fetchall()
    assert "USING INDEX job_finished_at" in " | ".join(str(row[-1]) for row in plan)


def test_prune_while_a_worker_keeps_committing_never_makes_the_worker_wait_out_its_busy_timeout(db_path: str) -> None:
    fill_finished(db_path, 3000)
    errors: list[BaseException] = []
    finished: list[int] = []
    stop = threading.Event()

    def worker() -> None:
        # Its own engine, as another process would have; a short busy timeout
        # makes any long hold of the write lock surface as DatabaseBusy.
        with engine_on(db_path, busy_timeout=1.0) as other:
            while not stop.is_set():
                try:
                    finished.append(other.run(other.submit("keep", Ctx())).id)
                except BaseException as exc:  # noqa: BLE001 - any error fails the test
                    errors.append(exc)
                    return

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not finished:  # the worker is committing before the prune starts
            assert time.monotonic() < deadline and not errors, errors
            time.sleep(0.001)
        with engine_on(db_path) as engine:
            assert engine.prune(DAY, batch=100) == 3000
            during = len(finished)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert during > 1
    with engine_on(db_path) as engine:
        assert all(engine.status(j).state == "succeeded" for j in finished)


@pytest.mark.parametrize("text, seconds", [("30d", 30 * DAY), ("12h", 43200), ("15m", 900), ("90s", 90),
                                           ("1d12h", 1.5 * DAY), ("0s", 0)])
def test_durations_read_days_hours_minutes_and_seconds(text: str, seconds: float) -> None:
    assert duration(text) == seconds


def test_walstate_prune_deletes_old_finished_jobs_and_a_dry_run_leaves_the_file_alone(db_path: str) -> None:
    from tests.test_cli import walstate

    fill_finished(db_path, 7)
    fill_finished(db_path, 3, finished_ago=60)
    data = hashlib.sha256(Path(db_path).read_bytes()).hexdigest()
    dry = walstate("prune", db_path, "--older-than", "1d", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["jobs"] == 7 and json.loads(dry.stdout)["dry_run"] is True
    assert hashlib.sha256(Path(db_path).read_bytes()).hexdigest() == data
    done = walstate("prune", db_path, "--older-than", "1d")
    assert done.returncode == 0 and "deleted 7 succeeded/cancelled job(s)" in done.stdout
    refused = walstate("prune", db_path, "--older-than", "1d", "--states", "succeeded,pending")
    assert refused.returncode == 1 and "'pending' is not a finished state" in refused.stderr
    bad = walstate("prune", db_path, "--older-than", "30 days")
    assert bad.returncode == 2 and "not a duration" in bad.stderr
    assert json.loads(walstate("prune", db_path, "--older-than", "0s", "--json").stdout)["jobs"] == 3


keyed = Workflow("keyed", context=Ctx, phases=["p"])


@keyed.step(phase="p")
def charge(ctx: Ctx, step: StepContext) -> dict[str, Any]:
    return {"token": step.idempotency_key}


@pytest.mark.backends
def test_pruning_the_newest_job_never_hands_its_id_or_idempotency_key_to_a_later_job(db_path: str) -> None:
    # A provider that deduplicates by key (as payment APIs do) would answer bob's charge with
    # alice's, and an operator's `cancel 1` or a late webhook would reach the wrong job.
    seen_ids: set[int] = set()
    seen_keys: set[str | None] = set()
    for _ in range(3):  # a new engine each time: the rule survives reopening the database
        with Engine(db_path, workers=1) as engine:
            engine.register(keyed)
            job = engine.submit(keyed, Ctx())
            key = engine.run(job).context.token
            assert job not in seen_ids and key not in seen_keys
            seen_ids.add(job)
            seen_keys.add(key)
            age(db_path, [job], 2 * DAY)
            assert engine.prune(DAY) == 1  # the newest job, and with it the highest id in the table
    assert len(seen_ids) == 3


def test_a_schema_1_file_upgraded_in_place_never_reuses_a_pruned_jobs_id(tmp_path: Path) -> None:
    import shutil

    from .test_migrations import FIXTURE

    path = str(tmp_path / "old.db")
    shutil.copyfile(FIXTURE, path)
    with Engine(path, workers=1) as engine:  # upgrades it, rebuilding walstate_job with every row
        assert [r.id for r in engine.store.read.jobs()][:1] == [6]
        engine.register(keyed)
        job = engine.submit(keyed, Ctx())
        engine.run(job)
        age(path, [job], 2 * DAY)
        engine.prune(DAY)  # the fixture's old finished jobs go too; 3, 4 and 5 (unfinished or failed) stay
        assert engine.store.read.job(job) is None
        assert engine.submit(keyed, Ctx()) == job + 1
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    # The rebuild cascaded into no child row: the kept jobs still have their steps and journal.
    assert conn.execute("SELECT count(DISTINCT job_id) FROM walstate_step WHERE job_id IN (3, 4, 5)").fetchone() == (3,)
    assert conn.execute("SELECT count(DISTINCT job_id) FROM walstate_journal WHERE job_id IN (3, 4)").fetchone() == (2,)
    conn.close()
