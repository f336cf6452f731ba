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


def test_a_new_database_and_its_wal_and_shm_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    # With the umask's 0644, every local user could read every context, output and message.
    from walstate import Engine

    old = os.umask(0o022)
    try:
        private, shared = str(tmp_path / "private.db"), str(tmp_path / "shared.db")
        with Engine(private) as e, Engine(shared, file_mode=None) as f:
            e.store.read.jobs()
            f.store.read.jobs()
            for suffix in ("", "-wal", "-shm"):
                assert os.stat(private + suffix).st_mode & 0o777 == 0o600, suffix
                assert os.stat(shared + suffix).st_mode & 0o777 == 0o644, suffix  # asked for: the umask's
    finally:
        os.umask(old)


def test_an_existing_file_keeps_the_mode_its_owner_gave_it(tmp_path: Path) -> None:
    path = tmp_path / "kept.db"
    Store(str(path)).close()
    path.chmod(0o640)
    Store(str(path)).close()
    assert path.stat().st_mode & 0o777 == 0o640


def test_a_read_only_open_leaves_no_wal_or_shm_behind_and_no_byte_of_the_file_changed(tmp_path: Path) -> None:
    path = str(tmp_path / "closed.db")
    Store(path).close()
    assert not os.path.exists(path + "-wal")  # cleanly closed: nothing beside it
    data, stamp = Path(path).read_bytes(), os.stat(path).st_mtime_ns
    store = Store(path, readonly=True)
    store.read.jobs()
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["closed.db"]
    assert Path(path).read_bytes() == data and os.stat(path).st_mtime_ns == stamp


def test_a_read_only_open_beside_a_live_writer_reads_its_commits_and_leaves_its_wal_alone(tmp_path: Path) -> None:
    from walstate.storage.reads import Reader  # noqa: F401  (the store's reader is what is used)

    path = str(tmp_path / "live.db")
    writer = Store(path)
    try:
        conn = sqlite3.connect(path)
        conn.execute("INSERT INTO walstate_meta (key, value) VALUES ('probe', '1')")
        conn.commit()
        conn.close()
        reader = Store(path, readonly=True)
        assert reader.read.database_id() == writer.database_id
        reader.close()
        assert os.path.exists(path + "-wal")  # the writer's: still open, still there
    finally:
        writer.close()
