"""Schema migrations: a file written by the first release (tests/fixtures/schema1.db) opens and upgrades in place."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from walstate import Engine, MigrationFailed, SchemaTooOld, StepContext, Workflow
from walstate.storage import SCHEMA_VERSION, Store, open_database
from walstate.storage.migrations import MIGRATIONS, Migration, latest
from walstate.storage.schema import bind_models, ensure_schema

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "schema1.db"
TABLES = ("walstate_job", "walstate_step", "walstate_journal", "walstate_once", "walstate_meta")


# The fixture's workflow, as tests/fixtures/make_schema1.py declared it (same names, steps, context).
class Order(BaseModel):
    n: int
    fail: bool = False
    die: bool = False
    prepared: str | None = None
    account: str | None = None
    notified: bool = False


flow = Workflow("fixture", context=Order, phases=["one", "two"])
calls: list[str] = []


@flow.step(phase="one")
def prepare(ctx: Order, step: StepContext) -> dict[str, Any]:
    return {"prepared": step.once("token", lambda: f"tok-{ctx.n}")}


@flow.step(phase="two")
def charge(ctx: Order, step: StepContext) -> dict[str, Any]:
    # A new account would show that the first release's once() record was lost.
    calls.append(f"charge {ctx.n}")
    return {"account": step.once("account", lambda: f"new-acct-{ctx.n}")}


@flow.step(phase="two", after=["charge"])
def notify(ctx: Order, step: StepContext) -> dict[str, Any]:
    return {"notified": True}


@pytest.fixture
def old_db(tmp_path: Path) -> str:
    """A private copy of the schema-1 fixture (opening the fixture itself would change it)."""
    path = tmp_path / "old.db"
    shutil.copyfile(FIXTURE, path)
    return str(path)


def dump(path: str) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(path)
    rows = {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in TABLES}
    conn.close()
    return rows


def schema_of(path: str) -> dict[str, Any]:
    """walstate's tables as SQLite sees them: columns, foreign keys, indexes (normalised SQL)."""
    conn = sqlite3.connect(path)
    shape: dict[str, Any] = {}
    for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND name LIKE 'walstate_%'"):
        shape[table] = {
            "columns": conn.execute(f"PRAGMA table_xinfo({table})").fetchall(),
            "foreign_keys": conn.execute(f"PRAGMA foreign_key_list({table})").fetchall(),
            # Schema 7: AUTOINCREMENT is in the table's text only (PRAGMA table_xinfo does not show it).
            "autoincrement": "AUTOINCREMENT" in conn.execute(
                "SELECT upper(sql) FROM sqlite_master WHERE name=?", (table,)).fetchone()[0],
        }
    for name, table, sql in conn.execute(
        "SELECT name, tbl_name, sql FROM sqlite_master WHERE type='index' AND tbl_name LIKE 'walstate_%'"
    ):
        text = None if sql is None else re.sub(r"\s+", " ", sql.replace("IF NOT EXISTS ", "")).strip()
        shape[f"index {name}"] = (table, text)
    conn.close()
    return shape


def test_the_fixture_was_written_by_the_first_release_at_schema_1() -> None:
    conn = sqlite3.connect(f"{FIXTURE.as_uri()}?mode=ro&immutable=1", uri=True)
    assert conn.execute("SELECT value FROM walstate_meta WHERE key='schema_version'").fetchone() == ("1",)
    states = dict(conn.execute("SELECT id, state FROM walstate_job").fetchall())
    conn.close()
    assert states == {1: "succeeded", 2: "succeeded", 3: "failed", 4: "running", 5: "pending", 6: "cancelled"}


def test_opening_a_schema_1_file_upgrades_it_in_place_and_keeps_every_row(old_db: str) -> None:
    before = dump(old_db)
    store = Store(old_db)
    assert store.migrated == tuple(range(2, SCHEMA_VERSION + 1))
    store.close()
    after = dump(old_db)
    for table in TABLES[:-1]:
        # Every old column keeps its value; migrations only add columns at the end.
        assert [row[:len(old)] for row, old in zip(after[table], before[table])] == before[table], table
        assert len(after[table]) == len(before[table]), table
    old_meta, new_meta = dict(before["walstate_meta"]), dict(after["walstate_meta"])
    assert new_meta["database_id"] == old_meta["database_id"]
    assert new_meta["schema_version"] == str(SCHEMA_VERSION)


def test_each_applied_migration_is_journalled_in_walstate_meta(old_db: str) -> None:
    started = time.time()
    Store(old_db).close()
    meta = dict(dump(old_db)["walstate_meta"])
    for version in range(2, SCHEMA_VERSION + 1):
        assert started <= float(meta[f"migrated_at_{version}"]) <= time.time()


def test_a_current_file_is_opened_without_migrating_again(old_db: str) -> None:
    Store(old_db).close()
    meta = dump(old_db)["walstate_meta"]
    store = Store(old_db)
    assert store.migrated == ()
    store.close()
    assert dump(old_db)["walstate_meta"] == meta


def test_a_fresh_file_has_the_same_schema_as_an_upgraded_schema_1_file(old_db: str, tmp_path: Path) -> None:
    fresh = str(tmp_path / "fresh.db")
    Store(fresh).close()
    Store(old_db).close()
    assert schema_of(fresh) == schema_of(old_db)


def test_jobs_of_a_schema_1_file_read_through_the_api_and_the_interrupted_one_recovers(old_db: str) -> None:
    calls.clear()
    with Engine(old_db, workers=1) as engine:
        engine.register(flow)
        done = engine.status(1)
        assert done.state == "succeeded" and done.context.account == "acct-1" and done.context.notified
        assert {s.state for s in done.steps.values()} == {"succeeded"}
        failed = engine.status(3)
        assert failed.state == "failed" and "card 3 declined" in (failed.steps["charge"].error or "")
        assert failed.steps["charge"].attempts == 2
        assert engine.status(6).state == "cancelled"
        assert [r.to_state for r in engine.history(2) if r.step is None] == ["running", "succeeded"]
        resumed = engine.recover()
        assert sorted(resumed) == [4, 5]
        interrupted = engine.status(4)
        assert interrupted.state == "succeeded"
        # The account came from the first release's once() record, not from a new call.
        assert interrupted.context.account == "acct-4" and interrupted.context.prepared == "tok-4"
        assert any(r.note == "interrupted" for r in engine.history(4, "charge"))
        assert engine.status(5).context.account == "new-acct-5"
        assert sorted(calls) == ["charge 4", "charge 5"]


def test_a_schema_1_file_opened_read_only_is_refused_and_left_unchanged(old_db: str) -> None:
    data = Path(old_db).read_bytes()
    with pytest.raises(SchemaTooOld, match="walstate upgrade") as err:
        Store(old_db, readonly=True)
    assert old_db in str(err.value)
    assert Path(old_db).read_bytes() == data


def broken(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE walstate_half_done (x INTEGER)")
    raise ValueError("a bug in migration 3")


def test_a_failed_migration_rolls_the_whole_upgrade_back(old_db: str, tmp_path: Path) -> None:
    pristine = str(tmp_path / "pristine.db")
    shutil.copyfile(FIXTURE, pristine)
    before = dump(old_db)
    migrations: dict[int, Migration] = {**MIGRATIONS, SCHEMA_VERSION + 1: broken}
    db = open_database(old_db)
    with pytest.raises(MigrationFailed, match=f"to {SCHEMA_VERSION + 1} failed .*a bug in migration 3.*unchanged at schema 1"):
        ensure_schema(db, bind_models(db), old_db, create=True, migrations=migrations)
    db.close()
    assert dump(old_db) == before
    assert schema_of(old_db) == schema_of(pristine)


def test_migrations_must_be_numbered_from_2_without_gaps() -> None:
    assert latest({2: [], 3: []}) == 3
    with pytest.raises(ValueError, match="without gaps"):
        latest({2: [], 4: []})


def open_at_once(db: str, folder: Path, mode: str) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = [subprocess.Popen([sys.executable, "-m", "tests.migrate_child", db, str(folder), mode], cwd=ROOT,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    deadline = time.monotonic() + 30
    while len(list(folder.glob("ready-*"))) < 2:
        assert time.monotonic() < deadline, "children did not start"
        time.sleep(0.005)
    (folder / "go").touch()
    results = []
    for child in children:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err.decode()
        results.append(json.loads(out))
    return results


def test_two_processes_opening_a_schema_1_file_at_once_both_succeed_and_it_migrates_once(old_db: str, tmp_path: Path) -> None:
    results = open_at_once(old_db, tmp_path, "real")
    assert sorted(r["applied"] for r in results) == [[], list(range(2, SCHEMA_VERSION + 1))]
    assert results[0]["database_id"] == results[1]["database_id"]
    fresh = str(tmp_path / "fresh.db")
    Store(fresh).close()
    assert schema_of(old_db) == schema_of(fresh)


def test_a_process_that_opens_a_file_during_another_ones_upgrade_waits_and_finds_it_done(old_db: str, tmp_path: Path) -> None:
    results = open_at_once(old_db, tmp_path, "slow")
    assert sorted(r["applied"] for r in results) == [[], [*range(2, SCHEMA_VERSION + 1), SCHEMA_VERSION + 1]]
    conn = sqlite3.connect(old_db)
    assert conn.execute("SELECT count(*) FROM probe_migrated_by").fetchone() == (1,)
    conn.close()


def test_walstate_upgrade_upgrades_an_old_file_that_read_commands_then_open(old_db: str) -> None:
    from tests.test_cli import walstate

    refused = walstate("jobs", old_db)
    assert refused.returncode == 1 and "walstate upgrade" in refused.stderr
    done = walstate("upgrade", old_db)
    assert done.returncode == 0, done.stderr
    assert f"upgraded to schema {SCHEMA_VERSION}" in done.stdout
    again = walstate("upgrade", old_db, "--json")
    assert json.loads(again.stdout) == {"applied": [], "schema_version": SCHEMA_VERSION}
    listed = walstate("jobs", old_db, "--json")
    assert listed.returncode == 0 and len(json.loads(listed.stdout)["jobs"]) == 6
