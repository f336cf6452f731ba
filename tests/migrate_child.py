"""Open a walstate file in a child process, on a signal, and print what the open did.

``python -m tests.migrate_child DB DIR real|slow``: writes ``DIR/ready-PID``,
waits for ``DIR/go``, opens DB and prints ``{"applied": [...], "database_id": ...}``.
``real`` opens a :class:`Store` (walstate's own migrations); ``slow`` adds a
last migration that records which process ran it and holds the lock a moment, so
the other opener is sure to arrive while the upgrade is in progress.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from pathlib import Path

from walstate.storage import Store, open_database
from walstate.storage.migrations import MIGRATIONS, Migration
from walstate.storage.schema import bind_models, ensure_schema


def slow_migration(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE probe_migrated_by (pid INTEGER)")
    conn.execute("INSERT INTO probe_migrated_by VALUES (?)", (os.getpid(),))
    # Widen the window in which the other process finds the upgrade under way.
    time.sleep(0.3)


def main(db: str, folder: str, mode: str) -> None:
    Path(folder, f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 30
    while not Path(folder, "go").exists():
        if time.monotonic() > deadline:
            sys.exit("no go signal")
        time.sleep(0.001)
    if mode == "real":
        store = Store(db)
        applied, database_id = store.migrated, store.database_id
        store.close()
    else:
        migrations: dict[int, Migration] = {**MIGRATIONS, max(MIGRATIONS) + 1: slow_migration}
        conn = open_database(db)
        state = ensure_schema(conn, bind_models(conn), db, create=True, migrations=migrations)
        applied, database_id = state.applied, state.database_id
        conn.close()
    print(json.dumps({"applied": list(applied), "database_id": database_id}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
