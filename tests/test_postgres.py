"""What is PostgreSQL's own: the URL that selects it, its errors, its races, NOTIFY wake-ups, lost connections.

Everything else (jobs, crashes, the sweep, SIGKILLs, the runtime, waits) is the same contract and runs
on both backends through the ``backends`` marker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from walstate import DatabaseUnavailable, Engine, StepContext, Workflow
from walstate.storage import faults, open_store
from walstate.storage.postgres import PgReader, PgStore, PgWritePath, is_postgres_url, qmark_to_format, redact
from walstate.storage.store import Store
from walstate.storage.writepath import Change

from .helpers import new_step, query

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parent.parent


class Ctx(BaseModel):
    n: int = 0


def noop_flow() -> Workflow[Ctx]:
    flow = Workflow("w", context=Ctx, phases=["p"])
    flow.step(phase="p", name="one")(lambda ctx, step: {"n": ctx.n + 1})
    return flow


def test_a_postgresql_url_selects_postgres_and_a_path_selects_sqlite(pg_database: str, tmp_path: Path) -> None:
    pg = open_store(pg_database)
    lite = open_store(str(tmp_path / "a.db"))
    try:
        assert isinstance(pg, PgStore) and isinstance(lite, Store)
        assert is_postgres_url("postgres://u@h/db") and not is_postgres_url("postgresql.db")
    finally:
        pg.close()
        lite.close()


def test_a_wrong_password_is_a_typed_error_that_never_shows_the_password(pg_database: str) -> None:
    parts = urllib.parse.urlsplit(pg_database)
    # The test server trusts every local user: ask for a database that does not exist instead,
    # with a password in the URL, and check what the error says.
    url = parts._replace(netloc=f"walstate:s3cret-pw@{parts.hostname}:{parts.port}", path="/no_such_db").geturl()
    with pytest.raises(DatabaseUnavailable) as caught:
        Engine(url)
    assert "s3cret-pw" not in str(caught.value) and "***" in str(caught.value)
    assert redact(url).count("***") == 1 and "s3cret-pw" not in redact(url)


def test_step_execute_takes_question_marks_on_postgres_and_leaves_quoted_ones_alone(pg_database: str) -> None:
    assert qmark_to_format("SELECT '?', x FROM t WHERE a=? AND b LIKE 'a%'") == (
        "SELECT '?', x FROM t WHERE a=%s AND b LIKE 'a%%'")
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p", transactional=True)
    def write(ctx: Ctx, step: StepContext) -> None:
        step.execute("CREATE TABLE IF NOT EXISTS notes (body TEXT, mark TEXT)")
        step.execute("INSERT INTO notes VALUES (?, '?%')", ("hello",))

    with Engine(pg_database) as e:
        e.register(flow)
        assert e.run(e.submit(flow, Ctx())).state == "succeeded"
    assert query(pg_database, "SELECT body, mark FROM notes") == [("hello", "?%")]


def test_two_engines_submitting_one_key_at_the_same_moment_make_one_job(pg_database: str) -> None:
    flow = noop_flow()
    engines = [Engine(pg_database), Engine(pg_database)]
    for e in engines:
        e.register(flow)
    try:
        for round_ in range(20):
            start = threading.Barrier(2)
            got: list[Any] = []

            def submit(e: Engine) -> None:
                start.wait()
                try:
                    got.append(e.submit(flow, Ctx(n=round_), key=f"k{round_}"))
                except BaseException as exc:  # what reached the caller, to report
                    got.append(exc)

            threads = [threading.Thread(target=submit, args=(e,)) for e in engines]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(got) == 2 and got[0] == got[1], got
        assert query(pg_database, "SELECT count(*) FROM walstate_job") == [(20,)]
    finally:
        for e in engines:
            e.close()


def test_another_engines_submit_wakes_an_idle_reader_through_notify_not_the_polling_fallback(
        pg_database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PgReader, "FALLBACK", 3600.0)  # only a notification can change data_version now
    flow = noop_flow()
    with Engine(pg_database) as idle, Engine(pg_database) as other:
        for e in (idle, other):
            e.register(flow)
        before = idle.store.read.data_version()
        other.submit(flow, Ctx())
        deadline = time.monotonic() + 10
        while idle.store.read.data_version() == before:
            assert time.monotonic() < deadline, "no notification reached the idle reader"
            time.sleep(0.005)


def test_step_changes_send_no_notification_only_new_released_and_messaged_jobs_do(pg_database: str) -> None:
    import psycopg

    store = open_store(pg_database)
    listener = psycopg.connect(pg_database.replace("postgres://", "postgresql://"), autocommit=True)
    try:
        listener.execute('LISTEN "walstate:public"')  # the channel of walstate's tables in schema public
        step = new_step(store, owner="me")  # creates a job (one notification) and claims it (none)
        assert len(list(listener.notifies(timeout=2, stop_after=1))) == 1
        step.start()  # step changes: no notification
        step.succeed()
        store.write.create_job("wf", None, "{}", [("s", "p", 0)])  # a new job: one
        time.sleep(0.2)  # every notification of the commits above has arrived by now
        assert len(list(listener.notifies(timeout=0.5))) == 1
    finally:
        listener.close()
        store.close()


class _DropConnection(faults.Injector):
    """At the n-th ``before_commit``, the server ends the writer's session (as a failover or restart would)."""

    def __init__(self, store: Any, admin_url: str) -> None:
        super().__init__()
        self.store = store
        self.admin_url = admin_url
        self.armed = True

    def hit(self, name: str) -> None:
        if name == "before_commit" and self.armed:
            import psycopg

            self.armed = False
            pid = self.store.db.raw().conn.info.backend_pid  # this thread is the writer
            with psycopg.connect(self.admin_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_session_lost_before_commit_is_written_again_on_a_new_one_and_the_caller_never_sees_it(
        pg_database: str) -> None:
    store = open_store(pg_database)
    try:
        step = new_step(store, owner="me")
        change = Change("step", step.id, step.job.id, "s", "pending", "running", attempt=1, owner="me",
                        epoch=step.job.epoch)
        with _DropConnection(store, pg_database) as dropped:
            store.write.commit([change])
        assert not dropped.armed  # the session was ended inside the commit
        assert query(pg_database, "SELECT state FROM walstate_step WHERE id=?", (step.id,)) == [("running",)]
        assert query(pg_database, "SELECT count(*) FROM walstate_journal WHERE step='s' AND to_state='running'") == [(1,)]
    finally:
        store.close()


def test_a_session_lost_for_longer_than_reconnect_says_the_change_was_not_written(
        pg_database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PgWritePath, "RECONNECT", 0.0)
    store = open_store(pg_database)
    try:
        step = new_step(store, owner="me")
        change = Change("step", step.id, step.job.id, "s", "pending", "running", attempt=1, owner="me",
                        epoch=step.job.epoch)
        with _DropConnection(store, pg_database), pytest.raises(DatabaseUnavailable) as caught:
            store.write.commit([change])
        assert "it was not written" in str(caught.value)
        assert query(pg_database, "SELECT state FROM walstate_step WHERE id=?", (step.id,)) == [("pending",)]
        store.write.commit([change])  # a new session, the same change: now it is written
        assert query(pg_database, "SELECT state FROM walstate_step WHERE id=?", (step.id,)) == [("running",)]
    finally:
        store.close()


def test_the_cli_lists_and_upgrades_a_postgres_database(pg_database: str) -> None:
    flow = noop_flow()
    with Engine(pg_database) as e:
        e.register(flow)
        e.run(e.submit(flow, Ctx(), key="one"))
    env = {"PYTHONPATH": str(ROOT)}

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "walstate", *args], capture_output=True, text=True, timeout=60,
                              env={**__import__("os").environ, **env})
        assert done.returncode == 0, done.stderr
        return done.stdout

    rows = json.loads(cli("jobs", pg_database, "--json"))["jobs"]
    assert [(r["key"], r["state"]) for r in rows] == [("one", "succeeded")]
    assert "already at schema" in cli("upgrade", pg_database)


def test_a_server_that_does_not_answer_is_database_unavailable_naming_the_url() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://walstate:pw@127.0.0.1:{port}/jobs"
    with pytest.raises(DatabaseUnavailable) as caught:
        Engine(url, busy_timeout=1.0)
    assert f"127.0.0.1:{port}/jobs" in str(caught.value) and "pw@" not in str(caught.value)


def test_without_the_driver_a_postgres_url_says_which_extra_to_install(pg_database: str) -> None:
    code = ("import sys; sys.modules['psycopg'] = None\n"  # as if walstate[postgres] were not installed
            "from walstate import Engine, ConfigurationError\n"
            f"try:\n    Engine({pg_database!r})\nexcept ConfigurationError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install 'walstate[postgres]'" in done.stdout, done.stderr


def test_every_session_ended_mid_step_as_by_a_server_restart_costs_the_run_a_wait_not_a_second_attempt(
        pg_database: str, postgres_url: str) -> None:
    import psycopg

    name = urllib.parse.urlsplit(pg_database).path.lstrip("/")
    flow = Workflow("w", context=Ctx, phases=["p", "q"])
    calls: list[int] = []

    @flow.step(phase="p")
    def first(ctx: Ctx, step: StepContext) -> dict[str, int]:
        calls.append(step.attempt)
        with psycopg.connect(postgres_url, autocommit=True) as admin:  # from outside: every session of the job's
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
        return {"n": 1}

    flow.step(phase="q", name="second")(lambda ctx, step: {"n": ctx.n + 1})
    with Engine(pg_database, workers=1) as e:
        e.register(flow)
        status = e.run(e.submit(flow, Ctx()))
    assert status.state == "succeeded" and status.context.n == 2
    assert calls == [1]  # the completion waited for a new session; the step did not run again
    assert query(pg_database, "SELECT count(*) FROM walstate_journal WHERE note='interrupted'") == [(0,)]


def test_a_url_chooses_the_schema_and_the_application_name_through_its_own_parameters(pg_database: str) -> None:
    import psycopg

    with psycopg.connect(pg_database, autocommit=True) as admin:
        admin.execute("CREATE SCHEMA jobs")
    url = pg_database + "?options=-csearch_path%3Djobs&application_name=billing"
    flow = noop_flow()
    with Engine(url) as e:
        e.register(flow)
        assert e.run(e.submit(flow, Ctx())).state == "succeeded"
        names = {n for (n,) in query(pg_database, "SELECT application_name FROM pg_stat_activity "
                                                  "WHERE datname = current_database()")}
        assert "billing" in names
    tables = query(pg_database, "SELECT table_schema FROM information_schema.tables WHERE table_name = 'walstate_job'")
    assert tables == [("jobs",)]


def test_a_refused_login_and_a_missing_database_say_so_rather_than_unreachable(pg_database: str) -> None:
    parts = urllib.parse.urlsplit(pg_database)
    missing = parts._replace(path="/no_such_db").geturl()
    with pytest.raises(DatabaseUnavailable, match="no such database"):
        Engine(missing)
    unknown_role = parts._replace(netloc=f"nobody_here:pw@{parts.hostname}:{parts.port}").geturl()
    with pytest.raises(DatabaseUnavailable, match="refused the login|no such database|does not exist") as caught:
        Engine(unknown_role)
    assert "pw@" not in str(caught.value)


def test_an_unreachable_postgresql_url_is_one_typed_line_naming_it_without_its_password(tmp_path: Path) -> None:
    # Port 1 of the loopback: nothing listens there, the refusal is immediate.
    url = "postgresql://bob:s3cret@127.0.0.1:1/shop"
    with pytest.raises(DatabaseUnavailable) as caught:
        Engine(url)
    message = str(caught.value)
    assert "\n" not in message and "s3cret" not in message
    assert message.startswith("postgresql://bob:***@127.0.0.1:1/shop: cannot connect to the PostgreSQL server (")
    assert "check the URL's host and port" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no psycopg traceback under it
    cli = subprocess.run([sys.executable, "-m", "walstate", "jobs", url], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert cli.returncode == 1 and cli.stdout == ""
    assert cli.stderr.count("\n") == 1 and cli.stderr == f"walstate: error: {message}\n"


def test_a_role_that_may_not_create_tables_is_told_which_grant_it_needs(pg_database: str) -> None:
    import uuid

    import psycopg

    role = f"limited_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_database, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')  # a generated name, not data
    try:
        parts = urllib.parse.urlsplit(pg_database)
        url = parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}").geturl()
        with pytest.raises(DatabaseUnavailable, match="GRANT CREATE ON SCHEMA"):
            Engine(url)
        assert query(pg_database, "SELECT count(*) FROM information_schema.tables "
                                  "WHERE table_name LIKE 'walstate%'") == [(0,)]
    finally:
        with psycopg.connect(pg_database, autocommit=True) as admin:
            admin.execute(f'DROP ROLE "{role}"')


def two_schemas(pg_database: str) -> tuple[str, str]:
    import psycopg

    with psycopg.connect(pg_database, autocommit=True) as admin:
        admin.execute("CREATE SCHEMA app_a")
        admin.execute("CREATE SCHEMA app_b")
    return (pg_database + "?options=-csearch_path%3Dapp_a", pg_database + "?options=-csearch_path%3Dapp_b")


def test_a_submit_in_one_schema_wakes_no_worker_of_an_app_in_another_schema_of_the_database(
        pg_database: str) -> None:
    # LISTEN/NOTIFY channels are per database: apps in two schemas woke each other's workers.
    import psycopg

    url_a, url_b = two_schemas(pg_database)
    flow = noop_flow()
    with Engine(url_a) as a, Engine(url_b) as b:
        a.register(flow)
        b.store.read.data_version()  # b's listener is connected and listening
        side: Any = getattr(b.store, "_side")
        with side.lock:
            (listened,) = side.conn.execute("SELECT pg_listening_channels()").fetchone()
        a.submit(flow, Ctx())  # committed: its notification (if any reached b) is queued before the probe
        with psycopg.connect(pg_database, autocommit=True) as other:
            other.execute("SELECT pg_notify(%s, 'probe')", (listened,))
        with side.lock:
            got = [n.payload for n in side.conn.notifies(timeout=30, stop_after=1)]
            while got[-1] != "probe":
                got += [n.payload for n in side.conn.notifies(timeout=30, stop_after=1)]
        assert got == ["probe"], f"b, listening on {listened!r}, also got a's notification"


def test_claims_under_limits_in_one_schema_do_not_wait_for_those_of_an_app_in_another_schema(
        pg_database: str) -> None:
    # Advisory locks are per database: one app's claim lock made the other's claims wait.
    url_a, url_b = two_schemas(pg_database)
    a, b = open_store(url_a), open_store(url_b, busy_timeout=1.0)
    try:
        with a.db.atomic():
            a.write._lock_claims(a.db.raw())  # a's limited claim holds its lock, in a's transaction
            got = b.write.claim_runnable(owner="me", lease_expires=time.time() + 60, limit=1, workflows=["w"],
                                         now=time.time(), limits={"w": 1})
        assert got == []  # b's claim went ahead (with one shared key it waited, then failed busy)
    finally:
        a.close()
        b.close()


def test_schema_creation_in_one_schema_does_not_wait_for_another_schemas_upgrade(pg_database: str) -> None:
    import psycopg

    from walstate.storage.pg_schema import lock_key

    url_a, url_b = two_schemas(pg_database)
    with psycopg.connect(url_a.replace("?options=-csearch_path%3Dapp_a", ""), autocommit=True) as holder:
        with holder.transaction():
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("schema", "app_a"),))
            store = open_store(url_b, busy_timeout=1.0)  # creates app_b's tables at once
            store.close()
