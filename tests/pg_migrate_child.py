"""Open a PostgreSQL database in a child process, on a signal, and print what the open did.

``python -m tests.pg_migrate_child URL DIR``: writes ``DIR/ready-PID``, waits for ``DIR/go``, runs
``ensure_pg_schema`` with walstate's migrations plus a last one that records which server backend
ran it and holds the transaction a moment (so the other opener is sure to arrive while the schema
is being created), and prints ``{"applied": [...], "database_id": ..., "backend": PID}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg

from walstate.storage.pg_schema import PG_MIGRATIONS, ensure_pg_schema

SLOW: Sequence[str] = [
    "CREATE TABLE probe_created_by (backend INTEGER NOT NULL)",
    "INSERT INTO probe_created_by VALUES (pg_backend_pid())",
    # Widen the window in which the other process finds the creation under way.
    "SELECT pg_sleep(0.3)",
]


def main(url: str, folder: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        backend = conn.info.backend_pid
        Path(folder, f"ready-{os.getpid()}").touch()
        deadline = time.monotonic() + 30
        while not Path(folder, "go").exists():
            if time.monotonic() > deadline:
                sys.exit("no go signal")
            time.sleep(0.001)
        state = ensure_pg_schema(conn, url, migrations={**PG_MIGRATIONS, max(PG_MIGRATIONS) + 1: SLOW})
    print(json.dumps({"applied": list(state.applied), "database_id": state.database_id, "backend": backend}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
