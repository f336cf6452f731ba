"""The PostgreSQL test fixtures: a real server, and an empty database of its own for every test."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.postgres

#: The database URLs the test below was given, to check that no two runs share one.
seen: list[str] = []


@pytest.mark.parametrize("turn", [1, 2])
def test_the_postgres_fixture_gives_each_test_an_empty_database_on_a_real_server(
    pg_database: str, postgres_url: str, turn: int
) -> None:
    import psycopg

    assert pg_database not in seen
    with psycopg.connect(pg_database) as conn:
        version = conn.execute("SELECT version()").fetchone()
        assert version is not None and str(version[0]).startswith("PostgreSQL ")
        name = conn.execute("SELECT current_database()").fetchone()
        assert name is not None and pg_database.endswith("/" + str(name[0]))
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
        assert tables == []
        # Each test may change its database freely: the next one gets another.
        conn.execute("CREATE TABLE left_behind (x int)")
    with psycopg.connect(postgres_url) as admin:
        # The databases of earlier tests were dropped after them.
        names = {str(r[0]) for r in admin.execute("SELECT datname FROM pg_database").fetchall()}
    assert {url.rsplit("/", 1)[1] for url in seen}.isdisjoint(names)
    seen.append(pg_database)


def test_the_session_admin_connection_reconnects_after_a_test_terminates_it(_pg_admin: Any, postgres_url: str) -> None:
    import psycopg

    _pg_admin.execute("SELECT 1")
    with psycopg.connect(postgres_url, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", (_pg_admin.conn.info.backend_pid,))
    _pg_admin.execute("SELECT 1")  # on a new connection
    assert not _pg_admin.conn.closed


def test_a_durable_server_keeps_fsync_and_synchronous_commit_on_with_its_data_on_disk() -> None:
    import psycopg

    from . import pgserver

    if pgserver.find_bindir() is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) to start a durable server with")
    settings = ("fsync", "full_page_writes", "synchronous_commit")
    server = pgserver.start(durable=True)
    try:
        with psycopg.connect(server.url) as conn:
            assert [conn.execute(f"SHOW {name}").fetchone() for name in settings] == [("on",)] * 3
            datadir = conn.execute("SHOW data_directory").fetchone()
        assert datadir is not None and not str(datadir[0]).startswith("/dev/shm")
    finally:
        server.stop()


HOLD = """
import time

import psycopg


def test_hold(postgres_url):
    with psycopg.connect(postgres_url) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    with open({report!r}, "w") as f:
        f.write(row[0])
    time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie nobody reaped: gone too
    except FileNotFoundError:
        return True


@pytest.mark.slow
def test_a_sigkilled_pytest_run_leaves_no_postgres_cluster_running(tmp_path: Any) -> None:
    # Four clusters of killed runs were found still running; the session's cluster must go
    # with the pytest process that started it, however it dies.
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from . import pgserver

    if pgserver.find_bindir() is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) to start a cluster with")
    root = Path(__file__).resolve().parent.parent
    report = tmp_path / "datadir"
    (tmp_path / "test_hold.py").write_text(HOLD.format(report=str(report)))
    env = {k: v for k, v in os.environ.items() if k != "WALSTATE_TEST_POSTGRES"}
    env["PYTHONPATH"] = str(root)
    child = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                              "--rootdir", str(tmp_path), str(tmp_path / "test_hold.py")],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (report.exists() and report.read_text()):
            assert time.monotonic() < deadline and child.poll() is None, "the child run never reached its test"
            time.sleep(0.1)
        datadir = Path(report.read_text())
        postmaster = int((datadir / "postmaster.pid").read_text().split()[0])
        assert not _gone(postmaster)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    deadline = time.monotonic() + 120
    try:
        while not (_gone(postmaster) and not datadir.parent.exists()):
            assert time.monotonic() < deadline, f"cluster {datadir} (postmaster {postmaster}) outlived its pytest run"
            time.sleep(0.1)
    finally:
        pgserver.stop(datadir.parent)  # nothing left to do when the test passes; else no cluster of ours stays
