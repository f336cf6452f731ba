"""No redundant writes: the seed's lazy backfill, a bounded TTL cache, and the database guard."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from walstate import ConfigurationError, Deduper, guarded_update

from .conftest import trace


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def tenants_db(tmp_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(tmp_path / "app.db", isolation_level=None, check_same_thread=False)
    conn.execute("CREATE TABLE tenant (id INTEGER PRIMARY KEY, onboarding_phase TEXT, completed_steps INT)")
    conn.execute("INSERT INTO tenant VALUES (1, NULL, 9)")
    return conn


def handle_request(conn: sqlite3.Connection, dedup: Deduper, tenant_id: int) -> str:
    """The seed's request handler: compute the effective phase, lazily write it back."""
    stored, steps = conn.execute("SELECT onboarding_phase, completed_steps FROM tenant WHERE id=?", (tenant_id,)).fetchone()
    effective = stored or ("COMPLETED" if steps >= 9 else "IN_PROGRESS")
    if effective == "COMPLETED" and stored is None:
        dedup.run_once(("backfill", tenant_id), lambda: guarded_update(
            conn, "tenant", {"onboarding_phase": "COMPLETED"}, {"id": tenant_id, "onboarding_phase": None}))
    return effective


def test_the_seed_backfill_reaches_sqlite_once_in_a_thousand_requests(tmp_path: Path) -> None:
    conn = tenants_db(tmp_path)
    dedup = Deduper()
    log = trace(conn)
    for _ in range(1000):
        assert handle_request(conn, dedup, 1) == "COMPLETED"
    assert log.count("UPDATE") == 1
    assert conn.execute("SELECT onboarding_phase FROM tenant WHERE id=1").fetchone()[0] == "COMPLETED"


def test_stale_reads_still_fire_only_one_update(tmp_path: Path) -> None:
    # The seed's real problem: requests keep reading the old (NULL) value for a while.
    conn = tenants_db(tmp_path)
    dedup = Deduper()
    log = trace(conn)
    for _ in range(5):
        dedup.run_once(("backfill", 1), lambda: guarded_update(
            conn, "tenant", {"onboarding_phase": "COMPLETED"}, {"id": 1, "onboarding_phase": None}))
    assert log.count("UPDATE") == 1


def test_eight_racing_threads_run_the_write_once() -> None:
    dedup = Deduper()
    barrier = threading.Barrier(8)
    ran: list[int] = []
    lock = threading.Lock()
    results: list[bool] = []

    def write() -> None:
        with lock:
            ran.append(1)

    def worker() -> None:
        barrier.wait()
        r = dedup.run_once("tenant-1", write)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ran) == 1 and sorted(results) == [False] * 7 + [True]


def test_after_the_ttl_the_write_fires_again_and_the_guard_changes_nothing(tmp_path: Path) -> None:
    conn = tenants_db(tmp_path)
    clock = Clock()
    dedup = Deduper(ttl=300, clock=clock)
    changed: list[int] = []

    def backfill() -> None:
        changed.append(guarded_update(conn, "tenant", {"onboarding_phase": "COMPLETED"},
                                      {"id": 1, "onboarding_phase": None}))

    assert dedup.run_once(1, backfill) is True
    clock.now = 299.0
    assert dedup.run_once(1, backfill) is False
    clock.now = 300.5
    assert dedup.run_once(1, backfill) is True
    assert changed == [1, 0]


@given(keys=st.lists(st.integers(0, 50), max_size=300), cap=st.integers(1, 20))
def test_the_cache_never_holds_more_than_max_entries_and_evicts_oldest_first(keys: list[int], cap: int) -> None:
    dedup = Deduper(max_entries=cap, ttl=1e9)
    model: list[int] = []  # reference: keys in age order
    for k in keys:
        ran = dedup.run_once(k, lambda: None)
        assert ran == (k not in model)
        if ran:
            model.append(k)
            del model[:-cap]
        assert len(dedup) <= cap
    assert list(dedup._seen) == model


def test_fn_raising_leaves_the_key_unrecorded_so_the_next_call_retries() -> None:
    dedup = Deduper()
    calls: list[int] = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("db down")

    with pytest.raises(ConnectionError):
        dedup.run_once("k", flaky)
    assert "k" not in dedup
    assert dedup.run_once("k", flaky) is True and len(calls) == 2


def test_bounds_are_required_to_be_sane() -> None:
    with pytest.raises(ConfigurationError):
        Deduper(max_entries=0)
    with pytest.raises(ConfigurationError):
        Deduper(ttl=0)


def test_guarded_update_refuses_identifiers_that_are_not_plain_names(tmp_path: Path) -> None:
    conn = tenants_db(tmp_path)
    with pytest.raises(ConfigurationError, match="identifier"):
        guarded_update(conn, "tenant; DROP TABLE tenant", {"onboarding_phase": "x"}, {"id": 1})


def test_a_deduper_given_the_connection_records_no_key_whose_write_has_not_committed(tmp_path: Path) -> None:
    conn = tenants_db(tmp_path)
    dedup = Deduper()
    conn.execute("BEGIN")  # the caller's own transaction: guarded_update commits nothing inside it
    assert dedup.run_once(1, lambda: guarded_update(conn, "tenant", {"onboarding_phase": "COMPLETED"},
                                                    {"id": 1, "onboarding_phase": None}), conn=conn) is True
    assert 1 not in dedup  # not committed yet: not done
    conn.execute("ROLLBACK")
    assert dedup.run_once(1, lambda: guarded_update(conn, "tenant", {"onboarding_phase": "COMPLETED"},
                                                    {"id": 1, "onboarding_phase": None}), conn=conn) is True
    assert 1 in dedup
    other = sqlite3.connect(tmp_path / "app.db")
    assert other.execute("SELECT onboarding_phase FROM tenant WHERE id=1").fetchone()[0] == "COMPLETED"
    other.close()
