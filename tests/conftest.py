"""Shared fixtures: fresh databases, statement counting, Hypothesis profiles."""

from __future__ import annotations

import atexit
import os
import sqlite3
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from walstate.storage import Storage, open_store

from . import pgserver

# `ci` keeps the whole suite within a few minutes on two cores; `deep` is for
# long local runs: WALSTATE_HYPOTHESIS_PROFILE=deep make test (or make test-deep).
settings.register_profile("ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# `mutation` is for `make mutmut`, which reruns the covering tests once per
# mutant: fewer generated examples, the same fixed sweeps and named cases.
settings.register_profile("mutation", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("WALSTATE_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
#: SIGKILL examples start real processes (~1 s each): few in CI, many in the deep profile.
#: In-process crash examples with 3 worker threads (threads make each example slower).
PARALLEL_EXAMPLES = {"deep": 500, "mutation": 10}.get(PROFILE, 40)
SIGKILL_EXAMPLES = int(os.environ.get("WALSTATE_SIGKILL_EXAMPLES", {"deep": "150", "mutation": "2"}.get(PROFILE, "6")))


class StatementLog:
    """Every SQL statement a sqlite3 connection runs, via its trace callback."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def __call__(self, sql: str) -> None:
        self.statements.append(sql.strip())

    def clear(self) -> None:
        self.statements.clear()

    def count(self, prefix: str) -> int:
        return sum(1 for s in self.statements if s.upper().startswith(prefix))

    @property
    def writes(self) -> list[str]:
        return [s for s in self.statements if s.upper().startswith(("UPDATE", "INSERT", "DELETE", "REPLACE"))]


def trace(conn: sqlite3.Connection | Any) -> StatementLog:
    """Log every statement of ``conn``; given a walstate database, of this thread's connection and of its writer.

    walstate's own writes run on the database's shared writer connection
    (``WalstateDatabase.writer``), reads on the calling thread's.
    """
    log = StatementLog()
    if isinstance(conn, sqlite3.Connection):
        conn.set_trace_callback(log)
    else:
        conn.connection().set_trace_callback(log)
        conn.writer().set_trace_callback(log)
    return log


#: The two backends of the storage contract. A test module (or test) marked
#: ``backends`` runs once per backend: its ``db_path`` is a SQLite file path for
#: ``sqlite`` and a fresh database's URL for ``postgres``, and it must not care
#: which (no file operations on it). Unmarked tests are about SQLite only.
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marked = metafunc.definition.get_closest_marker("backends")
    if "backend" in metafunc.fixturenames and marked and not metafunc.definition.get_closest_marker("sqlite_only"):
        metafunc.parametrize("backend", BACKENDS)


#: Hypothesis examples of a test on PostgreSQL, at most: each example there makes its databases
#: on the server (tens of ms each). The exhaustive sweeps are not Hypothesis tests: they run in
#: full on both backends; the random crash plans run their whole count on SQLite.
POSTGRES_EXAMPLES = {"deep": 400, "mutation": 5}.get(PROFILE, 30)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Cap a Hypothesis test's examples at ``POSTGRES_EXAMPLES`` on its PostgreSQL run only."""
    callspec = getattr(item, "callspec", None)
    test = getattr(item, "obj", None)
    inner = getattr(test, "_hypothesis_internal_use_settings", None)
    if callspec is None or callspec.params.get("backend") != "postgres" or inner is None:
        yield
        return
    # Both backends' runs share one function object: its settings are swapped for this call only.
    test._hypothesis_internal_use_settings = settings(  # type: ignore[union-attr]
        inner, max_examples=min(inner.max_examples, POSTGRES_EXAMPLES))
    try:
        yield
    finally:
        test._hypothesis_internal_use_settings = inner  # type: ignore[union-attr]


@pytest.fixture
def backend() -> str:
    """The backend a test runs on: "sqlite" unless the test is marked ``backends`` (then both, in turn)."""
    return "sqlite"


@pytest.fixture
def db_path(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> str:
    """Where the test's walstate database lives: a file in ``tmp_path``, or (backend postgres) a fresh database URL."""
    if backend == "postgres":
        return str(request.getfixturevalue("pg_database"))
    return str(tmp_path / "walstate.db")


#: ``new_db("name")``: another database on the test's backend.
NewDb = Callable[[str], str]


@pytest.fixture
def new_db(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[NewDb]:
    """Makes more databases on the test's backend: ``new_db("name")`` is a new file, or a new PostgreSQL database."""
    made: list[str] = []

    def make(name: str) -> str:
        if backend == "postgres":
            made.append(create_database(request.getfixturevalue("_pg_admin")))
        else:
            # Unique per call: a Hypothesis test asks for "reference" once per example.
            made.append(str(tmp_path / f"{name}-{len(made)}.db"))
        return made[-1]

    yield make
    if backend == "postgres":
        for url in made:
            drop_database(request.getfixturevalue("_pg_admin"), url)


@pytest.fixture
def store(db_path: str) -> Iterator[Storage]:
    s = open_store(db_path)
    yield s
    s.close()


# PostgreSQL: one real server per session, one fresh database per test.
#: A base URL of a running server to use instead of starting one (.ci/run sets it).
POSTGRES_URL_ENV = "WALSTATE_TEST_POSTGRES"
#: "1": a missing server fails the PostgreSQL tests instead of skipping them (.ci/run sets it).
REQUIRE_POSTGRES_ENV = "WALSTATE_REQUIRE_POSTGRES"


def _no_postgres(reason: str) -> None:
    if os.environ.get(REQUIRE_POSTGRES_ENV) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_POSTGRES_ENV}=1 requires one", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """Base URL (the ``postgres`` database, as a superuser) of a real PostgreSQL server.

    ``WALSTATE_TEST_POSTGRES`` if set; else a throwaway cluster started for this session
    (tests/pgserver.py) when the server binaries are installed; else the test is skipped
    (failed when ``WALSTATE_REQUIRE_POSTGRES=1``).
    """
    try:
        import psycopg  # noqa: F401  (the PostgreSQL tests need the driver)
    except ImportError:
        _no_postgres("psycopg is not installed: pip install -e '.[test]'")
    given = os.environ.get(POSTGRES_URL_ENV)
    if given:
        yield given
        return
    if pgserver.find_bindir() is None:
        _no_postgres(f"no PostgreSQL server: install Debian's postgresql or set {POSTGRES_URL_ENV}")
    # The watchdog stops the cluster should this process die without its teardown (SIGKILL).
    server = pgserver.start(watchdog=True)
    session = os.getpid()
    # Also at exit, should the session end without its teardown; not in a forked child.
    atexit.register(lambda: os.getpid() == session and server.stop())
    try:
        yield server.url
    finally:
        server.stop()


def database_url(base: str, name: str) -> str:
    """``base`` (a server URL) with its database replaced by ``name``."""
    return urllib.parse.urlsplit(base)._replace(path=f"/{name}").geturl()


class _Admin:
    """One autocommit connection to the server's maintenance database, for the whole session.

    Creating and dropping each test's database through it saves two connections per test;
    it reconnects if a test broke it (for example by restarting or killing backends).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: Any = None

    def execute(self, statement: Any) -> None:
        import psycopg

        if self.conn is None or self.conn.closed:
            self.conn = psycopg.connect(self.url, autocommit=True)
        try:
            self.conn.execute(statement)
        except psycopg.OperationalError:
            self.conn.close()
            self.conn = psycopg.connect(self.url, autocommit=True)
            self.conn.execute(statement)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


@pytest.fixture(scope="session")
def _pg_admin(postgres_url: str) -> Iterator[_Admin]:
    admin = _Admin(postgres_url)
    yield admin
    admin.close()


def create_database(admin: _Admin) -> str:
    """Create a new, empty database on the admin's server; return its URL."""
    from psycopg import sql

    name = f"walstate_t_{uuid.uuid4().hex[:16]}"
    # template0: never touched by anyone, so the copy is always empty and clean.
    admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    return database_url(admin.url, name)


def drop_database(admin: _Admin, url: str) -> None:
    """Drop the database ``url`` names."""
    from psycopg import sql

    name = urllib.parse.urlsplit(url).path.lstrip("/")
    # FORCE: a connection the test left open (or a killed child's) must not keep it alive.
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def pg_database(_pg_admin: _Admin) -> Iterator[str]:
    """URL of a new, empty PostgreSQL database for this test alone, dropped after it."""
    url = create_database(_pg_admin)
    try:
        yield url
    finally:
        drop_database(_pg_admin, url)
