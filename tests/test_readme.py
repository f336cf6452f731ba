"""The README's examples run, so they cannot rot."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from walstate.testing import crash_test

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_the_readme_usage_example_runs() -> None:
    exec(compile(BLOCKS[0], "README.md", "exec"), {"__name__": "readme"})


def test_the_readme_background_example_runs() -> None:
    exec(compile(next(b for b in BLOCKS if "start_worker" in b), "README.md", "exec"), {"__name__": "readme"})


def test_the_readme_waits_example_runs() -> None:
    exec(compile(next(b for b in BLOCKS if "wait_for" in b), "README.md", "exec"), {"__name__": "readme"})


def test_the_readme_async_example_runs() -> None:
    exec(compile(next(b for b in BLOCKS if "start_async" in b), "README.md", "exec"), {"__name__": "readme"})


def test_the_readme_memory_store_example_runs() -> None:
    exec(compile(next(b for b in BLOCKS if "memory://" in b), "README.md", "exec"), {"__name__": "readme"})


def test_the_readme_backfill_example_writes_once(tmp_path: Path) -> None:
    scope: dict[str, object] = {"__name__": "readme"}
    exec(compile(next(b for b in BLOCKS if "guarded_update" in b), "README.md", "exec"), scope)
    conn = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    conn.execute("CREATE TABLE tenant (id INTEGER PRIMARY KEY, onboarding_phase TEXT, completed_steps INT)")
    conn.execute("INSERT INTO tenant VALUES (1, NULL, 9)")
    updates: list[str] = []
    conn.set_trace_callback(lambda sql: updates.append(sql) if sql.startswith("UPDATE") else None)
    for _ in range(50):
        assert scope["effective_phase"](conn, 1) == "COMPLETED"  # type: ignore[operator]
    assert len(updates) == 1


def test_the_readme_backfill_example_stores_the_row_on_a_default_sqlite3_connection(tmp_path: Path) -> None:
    scope: dict[str, object] = {"__name__": "readme"}
    exec(compile(next(b for b in BLOCKS if "guarded_update" in b), "README.md", "exec"), scope)
    setup = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    setup.execute("CREATE TABLE tenant (id INTEGER PRIMARY KEY, onboarding_phase TEXT, completed_steps INT)")
    setup.execute("INSERT INTO tenant VALUES (1, NULL, 9)")
    setup.close()
    conn = sqlite3.connect(tmp_path / "t.db")  # Python's default: a transaction opens before each UPDATE
    for _ in range(3):
        assert scope["effective_phase"](conn, 1) == "COMPLETED"  # type: ignore[operator]
    other = sqlite3.connect(tmp_path / "t.db")
    assert other.execute("SELECT onboarding_phase FROM tenant WHERE id=1").fetchone()[0] == "COMPLETED"
    other.close()
    conn.close()


def test_the_readme_worked_example_finds_a_doubled_row_and_the_fix_passes(tmp_path: Path) -> None:
    scope: dict[str, object] = {"__name__": "readme"}
    exec(compile(BLOCKS[0], "README.md", "exec"), scope)  # "Use it": flow, Onboarding, StepContext
    # Found by what they say, not where they stand: the crash_test example, the duplicate it
    # finds (a block that imports what it uses), then the fix.
    test, doubled, fix = (next(b for b in BLOCKS if marker in b) for marker in (
        "def test_registration_resumes_exactly_once", "expected a doubled row", "import_menu_once"))
    exec(compile(test, "README.md", "exec"), scope)
    # The README's test as written, with its 200 examples cut to 30 here (the crash suite goes deep).
    scope["crash_test"] = lambda *args, **kwargs: crash_test(*args, **{**kwargs, "max_examples": 30})
    scope["test_registration_resumes_exactly_once"](tmp_path)  # type: ignore[operator]
    exec(compile(doubled, "README.md", "exec"), {**scope, "crash_test": None})  # needs no earlier import
    exec(compile(doubled, "README.md", "exec"), scope)
    exec(compile(fix, "README.md", "exec"), scope)


def test_the_readme_migration_moves_an_in_flight_job_of_version_1_onto_version_2(tmp_path: Path) -> None:
    """The declaration as the README writes it is one a real in-flight job can take, not a refused one."""
    from walstate import Engine

    scope: dict[str, object] = {"__name__": "readme"}
    exec(compile(next(b for b in BLOCKS if ".migrate(1" in b), "README.md", "exec"), scope)
    path = str(tmp_path / "old.db")
    with Engine(path) as old:  # an app still on version 1 submits a job and stops before running it
        job = old.submit(scope["signup_v1"], {"email": "c@example.com"})  # type: ignore[arg-type]
    with Engine(path) as new:  # the next release has version 2 only: the job migrates as it is claimed
        new.register(scope["signup_v2"])  # type: ignore[arg-type]
        status = new.run(job)
    assert status.version == 2 and status.state == "succeeded"
    assert set(status.steps) == {"make_account", "send_localised_mail"}
    assert status.context.locale == "en"


def test_importing_walstate_defers_sqlite_peewee_and_transitions_until_the_engine_is_used() -> None:
    import subprocess
    import sys

    code = (
        "import sys, walstate\n"
        "assert 'peewee' not in sys.modules and 'transitions' not in sys.modules, sorted(sys.modules)\n"
        "walstate.Engine\n"
        "assert 'transitions' in sys.modules and 'peewee' not in sys.modules\n"
        "import os, tempfile\n"
        "walstate.Engine(os.path.join(tempfile.mkdtemp(), 'app.db')).close()\n"
        "assert 'peewee' in sys.modules  # the SQLite store loads it when it opens a file\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=60)
    assert done.returncode == 0, done.stderr
