"""walstate's tables on PostgreSQL: the same schema as SQLite's, created once, upgraded like SQLite's."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from walstate import MigrationFailed, SchemaTooNew, SchemaTooOld
from walstate.storage import SCHEMA_VERSION, Store
from walstate.storage.pg_schema import PG_MIGRATIONS, ensure_pg_schema, lock_key, redact

if TYPE_CHECKING:
    import psycopg

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "schema1.db"
#: SQLite's declared types and the PostgreSQL types that stand for them (ids: BIGINT, see below).
TYPES = {"INTEGER": {"integer", "bigint"}, "REAL": {"double precision"}, "TEXT": {"text"}}


@pytest.fixture
def pg(pg_database: str) -> Iterator[psycopg.Connection[Any]]:
    import psycopg

    with psycopg.connect(pg_database, autocommit=True) as conn:
        yield conn


def sqlite_shape(path: str) -> dict[str, Any]:
    """walstate's tables in a SQLite file: columns, primary key, foreign keys, indexes."""
    conn = sqlite3.connect(path)
    shape: dict[str, Any] = {}
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE 'walstate_%' ORDER BY name")]
    for table in tables:
        info = conn.execute(f"PRAGMA table_info({table})").fetchall()
        indexes = {}
        for _, name, unique, origin, partial in conn.execute(f"PRAGMA index_list({table})").fetchall():
            if origin == "pk":
                continue  # compared as the primary key
            columns = [r[2] for r in conn.execute(f"PRAGMA index_info({name})").fetchall()]
            sql = conn.execute("SELECT sql FROM sqlite_master WHERE name=?", (name,)).fetchone()[0]
            where = sql.split(" WHERE ", 1)[1] if partial else None
            indexes[name] = (bool(unique), columns, where)
        shape[table] = {
            "columns": [(name, type_, bool(notnull), default) for _, name, type_, notnull, default, _ in info],
            "primary_key": [r[1] for r in sorted(info, key=lambda r: r[5]) if r[5]],
            "foreign_keys": sorted((r[3], r[2], r[4], r[6]) for r in conn.execute(f"PRAGMA foreign_key_list({table})")),
            "indexes": indexes,
        }
    conn.close()
    return shape


def pg_shape(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """The same description, read from PostgreSQL's catalogs."""
    shape: dict[str, Any] = {}
    tables = [r[0] for r in conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE 'walstate%' "
        "ORDER BY tablename")]
    for table in tables:
        columns = conn.execute(
            "SELECT column_name, data_type, is_nullable = 'NO', column_default FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position", (table,)).fetchall()
        keyed = conn.execute(
            "SELECT i.indisprimary, c.relname, i.indisunique, "
            "       array(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(n, o) "
            "             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n ORDER BY k.o), "
            "       pg_get_expr(i.indpred, i.indrelid) "
            "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = %s::regclass", (table,)
        ).fetchall()
        fks = conn.execute(
            "SELECT array(SELECT a.attname FROM unnest(f.conkey) k(n) JOIN pg_attribute a "
            "             ON a.attrelid = f.conrelid AND a.attnum = k.n), "
            "       f.confrelid::regclass::text, "
            "       array(SELECT a.attname FROM unnest(f.confkey) k(n) JOIN pg_attribute a "
            "             ON a.attrelid = f.confrelid AND a.attnum = k.n), f.confdeltype "
            "FROM pg_constraint f WHERE f.contype = 'f' AND f.conrelid = %s::regclass", (table,)).fetchall()
        shape[table] = {
            "columns": [(n, t, notnull, None if d is None else re.sub(r"::[a-z ]+$", "", d)) for n, t, notnull, d in columns],
            "primary_key": next(list(cols) for primary, _, _, cols, _ in keyed if primary),
            "foreign_keys": sorted(
                (src[0], dst, ref[0], {"c": "CASCADE"}.get(action, action)) for src, dst, ref, action in fks),
            "indexes": {name: (unique, list(cols), where) for primary, name, unique, cols, where in keyed if not primary},
        }
    return shape


def as_postgres_spells_it(conn: psycopg.Connection[Any], table: str, column: str, where: str) -> str:
    """A SQLite index's WHERE as PostgreSQL deparses it: a scratch index made with it, rolled back."""
    import psycopg
    from psycopg import sql

    with conn.transaction():
        conn.execute(sql.SQL("CREATE INDEX walstate_probe ON {} ({}) WHERE {}").format(
            sql.Identifier(table), sql.Identifier(column), sql.SQL(where)))
        row = conn.execute("SELECT pg_get_expr(indpred, indrelid) FROM pg_index "
                           "WHERE indexrelid = 'walstate_probe'::regclass").fetchone()
        assert row is not None
        spelled = str(row[0])
        raise psycopg.Rollback()  # leaves the block quietly, the scratch index undone
    return spelled


@pytest.mark.postgres
def test_postgres_and_sqlite_schemas_have_the_same_tables_columns_and_indexes(
    pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    sqlite_file = str(tmp_path / "fresh.db")
    Store(sqlite_file).close()
    ensure_pg_schema(pg, "test")
    lite, post = sqlite_shape(sqlite_file), pg_shape(pg)
    assert sorted(post) == sorted(lite)
    for table in lite:
        for (name, type_, notnull, default), (pname, ptype, pnotnull, pdefault) in zip(
            lite[table]["columns"], post[table]["columns"], strict=True
        ):
            assert (pname, pnotnull, pdefault) == (name, notnull, default), f"{table}.{name}"
            assert ptype in TYPES[type_], f"{table}.{name}: {type_} -> {ptype}"
            # Ids grow past 2**31 on a busy server; SQLite's INTEGER is 64-bit too.
            assert ptype == "bigint" or name not in ("id", "job_id"), f"{table}.{name}"
        assert post[table]["primary_key"] == lite[table]["primary_key"], table
        assert post[table]["foreign_keys"] == lite[table]["foreign_keys"], table
        assert sorted(post[table]["indexes"]) == sorted(lite[table]["indexes"]), table
        for index, (unique, columns, where) in lite[table]["indexes"].items():
            spelled = None if where is None else as_postgres_spells_it(pg, table, columns[0], where)
            assert post[table]["indexes"][index] == (unique, columns, spelled), index


def test_postgres_migrations_are_numbered_like_sqlites() -> None:
    assert sorted(PG_MIGRATIONS) == list(range(1, SCHEMA_VERSION + 1))


@pytest.mark.postgres
def test_two_processes_opening_a_new_postgres_database_at_once_create_its_schema_once(
    pg_database: str, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    children = [subprocess.Popen([sys.executable, "-m", "tests.pg_migrate_child", pg_database, str(tmp_path)],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    try:
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("ready-*"))) < 2:
            assert time.monotonic() < deadline, "children did not start"
            time.sleep(0.005)
        (tmp_path / "go").touch()
        outcomes = [child.communicate(timeout=60) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.communicate()
    results = []
    for child, (out, err) in zip(children, outcomes):
        assert child.returncode == 0, err.decode()
        results.append(json.loads(out))
    assert results[0]["database_id"] == results[1]["database_id"]
    assert [r["applied"] for r in results] == [[], []]  # a new database is created, not upgraded
    created_by = pg.execute("SELECT backend FROM probe_created_by").fetchall()
    assert len(created_by) == 1 and created_by[0][0] in {r["backend"] for r in results}


def with_password(url: str, password: str) -> str:
    parts = urllib.parse.urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{user}:{password}@{host}").geturl()


@pytest.mark.postgres
def test_a_postgres_database_of_a_newer_walstate_is_refused(pg_database: str, pg: psycopg.Connection[Any]) -> None:
    ensure_pg_schema(pg, pg_database)
    pg.execute("UPDATE walstate_meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    where = with_password(pg_database, "sekret")  # the test server trusts: the password is only carried
    for create in (True, False):
        with pytest.raises(SchemaTooNew) as refused:
            ensure_pg_schema(pg, where, create=create)
        message = str(refused.value)
        assert f"schema version {SCHEMA_VERSION + 1}" in message and "upgrade walstate" in message
        assert redact(where) in message and "sekret" not in message and refused.value.path == redact(where)


@pytest.mark.postgres
def test_an_older_postgres_database_opened_read_only_is_refused_and_left_unchanged(pg: psycopg.Connection[Any]) -> None:
    ensure_pg_schema(pg, "db", migrations={1: PG_MIGRATIONS[1]})
    with pytest.raises(SchemaTooOld, match="schema version 1"):
        ensure_pg_schema(pg, "db", create=False)
    assert pg.execute("SELECT value FROM walstate_meta WHERE key = 'schema_version'").fetchone() == ("1",)


@pytest.mark.postgres
def test_a_failed_postgres_migration_rolls_back_and_names_the_version(pg_database: str, pg: psycopg.Connection[Any]) -> None:
    where = with_password(pg_database, "sekret")
    broken = {**PG_MIGRATIONS, SCHEMA_VERSION + 1: [
        "ALTER TABLE walstate_job ADD COLUMN half_done INTEGER",
        "SELECT no_such_column FROM walstate_job",
    ]}
    # Creating a new database: nothing of it remains.
    with pytest.raises(MigrationFailed) as failed:
        ensure_pg_schema(pg, where, migrations=broken)
    assert f"creating walstate's tables failed at schema {SCHEMA_VERSION + 1}" in str(failed.value)
    assert pg.execute("SELECT to_regclass('walstate_job')").fetchone() == (None,)
    # Upgrading a current database: it stays at its version, without the half-done change.
    state = ensure_pg_schema(pg, where)
    with pytest.raises(MigrationFailed) as failed:
        ensure_pg_schema(pg, where, migrations=broken)
    message = str(failed.value)
    assert f"from schema {SCHEMA_VERSION} to {SCHEMA_VERSION + 1}" in message and "no_such_column" in message
    assert redact(where) in message and "sekret" not in message
    assert pg.execute("SELECT count(*) FROM information_schema.columns WHERE column_name = 'half_done'").fetchone() == (0,)
    meta = dict(pg.execute("SELECT key, value FROM walstate_meta").fetchall())
    assert meta == {"schema_version": str(SCHEMA_VERSION), "database_id": state.database_id}
    # The lock went with the rolled-back transaction: another session can take it at once.
    import psycopg

    with psycopg.connect(pg_database, autocommit=True) as other:
        key = lock_key("schema", "public")
        assert other.execute("SELECT pg_try_advisory_xact_lock(%s)", (key,)).fetchone() == (True,)


@pytest.mark.postgres
def test_a_schema_1_postgres_database_upgrades_to_the_same_rows_as_the_sqlite_fixture(
    pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    from psycopg import sql

    # The first release's rows, in both databases.
    ensure_pg_schema(pg, "db", migrations={1: PG_MIGRATIONS[1]})
    pg.execute("DELETE FROM walstate_meta")
    old = sqlite3.connect(FIXTURE)
    tables = ("walstate_meta", "walstate_job", "walstate_step", "walstate_journal", "walstate_once")
    for table in tables:
        cursor = old.execute(f"SELECT * FROM {table}")
        names = [d[0] for d in cursor.description]
        insert = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, names)),
            sql.SQL(", ").join(sql.Placeholder() * len(names)))
        with pg.cursor() as cur:
            cur.executemany(insert, cursor.fetchall())
    old.close()
    copy = tmp_path / "old.db"
    shutil.copyfile(FIXTURE, copy)

    started = time.time()
    state = ensure_pg_schema(pg, "db")
    Store(str(copy)).close()

    assert state.applied == tuple(range(2, SCHEMA_VERSION + 1))
    lite = sqlite3.connect(copy)
    for table in tables:
        order = "key" if table == "walstate_meta" else "1, 2, 3"
        query = f"SELECT * FROM {table} ORDER BY {order}"
        got = sorted((tuple(r) for r in pg.execute(query.encode()).fetchall()), key=repr)
        expected = sorted(lite.execute(query).fetchall(), key=repr)
        if table == "walstate_meta":  # the migration times differ; both journal every version
            # SQLite's lease clock anchor (see storage/leaseclock.py) is SQLite's own: PostgreSQL has the server's clock.
            expected = [r for r in expected if r[0] != "lease_clock"]
            assert sorted(k for k, _ in got) == sorted(k for k, _ in expected)
            assert all(started <= float(v) <= time.time() for k, v in got if k.startswith("migrated_at_"))
            got, expected = ([r for r in rows if not r[0].startswith("migrated_at_")] for rows in (got, expected))
        assert got == expected, table
    lite.close()


def test_redact_removes_passwords_from_urls_and_connection_strings() -> None:
    assert redact("postgresql://app:s3cr:et@db.example:5432/jobs?sslmode=require") == (
        "postgresql://app:***@db.example:5432/jobs?sslmode=require")
    assert redact("postgresql://app@h/db?password=s3cret&application_name=w") == (
        "postgresql://app@h/db?password=***&application_name=w")
    assert redact("host=h user=app password='s3 cret' dbname=jobs") == "host=h user=app password=*** dbname=jobs"
    assert redact("postgresql://h/db") == "postgresql://h/db"


def redundant_indexes(shape: dict[str, Any]) -> list[str]:
    """Non-unique, non-partial indexes whose columns are the leading columns of another index or the primary key."""
    found = []
    for table, info in shape.items():
        wider = [cols for _, cols, where in info["indexes"].values() if where is None] + [info["primary_key"]]
        for name, (unique, cols, where) in info["indexes"].items():
            if not unique and where is None and any(len(w) > len(cols) and w[:len(cols)] == cols for w in wider):
                found.append(f"{table}.{name}")
    return sorted(found)


def test_no_sqlite_index_repeats_the_leading_columns_of_another_in_a_fresh_or_upgraded_file(tmp_path: Path) -> None:
    # journal_job_id and step_job_id cost 17% of a file of 1M jobs for nothing (issue 27.14).
    fresh, old = str(tmp_path / "fresh.db"), str(tmp_path / "old.db")
    shutil.copyfile(FIXTURE, old)
    for path in (fresh, old):
        Store(path).close()
        assert redundant_indexes(sqlite_shape(path)) == [], path


@pytest.mark.postgres
def test_no_postgres_index_repeats_the_leading_columns_of_another(pg: psycopg.Connection[Any]) -> None:
    ensure_pg_schema(pg, "test")
    assert redundant_indexes(pg_shape(pg)) == []
