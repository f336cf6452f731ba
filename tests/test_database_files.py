"""Opening files: WAL and pragmas checked, bad files give typed errors naming the path."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from walstate import ConfigurationError, DatabaseUnavailable, NotADatabase, SchemaTooNew
from walstate.storage import Store


@pytest.mark.parametrize("durability,expected", [("normal", 1), ("full", 2)])
def test_database_opens_in_wal_with_the_requested_synchronous_level(db_path: str, durability: str, expected: int) -> None:
    store = Store(db_path, durability=durability)  # type: ignore[arg-type]
    conn = store.db.connection()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == expected
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    store.close()


def test_an_in_memory_database_is_refused_because_it_cannot_use_wal() -> None:
    with pytest.raises(ConfigurationError, match="refused WAL"):
        Store(":memory:")


def test_an_unknown_durability_is_a_configuration_error(db_path: str) -> None:
    with pytest.raises(ConfigurationError, match="durability"):
        Store(db_path, durability="paranoid")  # type: ignore[arg-type]


def test_a_file_that_is_not_sqlite_raises_not_a_database_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are my notes, not a database\n" * 200)
    with pytest.raises(NotADatabase) as err:
        Store(str(path))
    assert str(path) in str(err.value)
    assert path.read_bytes().startswith(b"these are my notes")  # untouched


def test_a_corrupt_database_raises_not_a_database(db_path: str) -> None:
    Store(db_path).close()
    sqlite3.connect(db_path).execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(Path(db_path).read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # wipe the schema page, keep the header
    Path(db_path).write_bytes(bytes(data))
    with pytest.raises(NotADatabase, match="corrupt"):
        Store(db_path)


def test_a_database_from_a_newer_schema_raises_schema_too_new(db_path: str) -> None:
    Store(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE walstate_meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaTooNew, match="schema version 99") as err:
        Store(db_path)
    assert db_path in str(err.value)


def test_a_missing_directory_raises_database_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "x.db"
    with pytest.raises(DatabaseUnavailable, match="does not exist"):
        Store(str(path))
    assert not path.parent.exists()


def test_a_read_only_directory_raises_database_unavailable(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # Root ignores permission bits; /proc refuses to create files for anyone.
        directory = Path("/proc")
    else:
        directory = tmp_path / "locked"
        directory.mkdir()
        directory.chmod(0o555)
    path = directory / "walstate-test.db"
    with pytest.raises(DatabaseUnavailable) as err:
        Store(str(path))
    assert str(path) in str(err.value) and "writable" in str(err.value)
    assert not path.exists()


def test_a_sqlite_file_without_walstate_tables_is_refused_when_read_only(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t(x)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(NotADatabase, match="not a walstate database"):
        Store(str(path), readonly=True)
    assert path.read_bytes() == before


def test_walstate_adds_its_tables_to_an_application_database_and_leaves_user_version_alone(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE menus(tenant TEXT)")
    conn.execute("PRAGMA user_version=7")
    conn.commit()
    conn.close()
    Store(str(path)).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 7
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"menus", "walstate_job", "walstate_step", "walstate_journal", "walstate_once"} <= names
    conn.close()
