"""The `walstate` console script, run for real against files made by real jobs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WALSTATE = Path(sys.executable).parent / "walstate"


def walstate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert WALSTATE.exists(), f"console script missing at {WALSTATE}: install the project (make test does)"
    return subprocess.run([str(WALSTATE), *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def run_job(db: str, name: str, kill_at: str | None = None) -> int:
    args = [sys.executable, "-m", "tests.cli_app", db, name] + ([kill_at] if kill_at else [])
    return subprocess.run(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60).returncode


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Three real jobs: 1 succeeded, 2 failed, 3 killed by SIGKILL in the middle."""
    path = str(tmp_path_factory.mktemp("cli") / "shop.db")
    assert run_job(path, "good") == 0
    assert run_job(path, "broken") == 0
    assert run_job(path, "crashed", "after_commit:4") == -signal.SIGKILL
    return path


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_read_commands_print_key_lines_and_leave_the_file_unchanged(db: str) -> None:
    before = digest(db)
    jobs = walstate("jobs", db)
    assert jobs.returncode == 0
    lines = jobs.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "WORKFLOW", "KEY", "STATE"]
    assert any(" good " in l and "succeeded" in l and "2/2" in l for l in lines)
    assert any(" broken " in l and "failed" in l for l in lines)
    assert any(" crashed " in l and "running" in l for l in lines)
    assert all(len(l) <= 80 for l in lines)

    show = walstate("show", db, "2")
    assert show.returncode == 0
    assert "last error: ValueError: card declined" in show.stdout
    assert "ship" in show.stdout and "cancelled" in show.stdout

    hist = walstate("history", db, "2", "--step", "charge")
    assert hist.returncode == 0
    assert "pending -> running" in hist.stdout and "running -> failed" in hist.stdout
    assert digest(db) == before


def test_every_json_output_parses_and_has_no_colour(db: str) -> None:
    before = digest(db)
    jobs = json.loads(walstate("jobs", db, "--json").stdout)
    assert {j["key"]: j["state"] for j in jobs} == {"good": "succeeded", "broken": "failed", "crashed": "running"}
    show = json.loads(walstate("show", db, "1", "--json").stdout)
    assert show["context"] == {"name": "good", "paid": True, "shipped": True}
    assert [p["name"] for p in show["phases"]] == ["pay", "ship"]
    hist = json.loads(walstate("history", db, "1", "--json").stdout)
    assert [(h["step"], h["to"]) for h in hist][:2] == [(None, "running"), ("charge", "running")]
    assert json.loads(walstate("jobs", db, "--json", "--state", "failed").stdout)[0]["key"] == "broken"
    assert "\033[" not in walstate("jobs", db).stdout  # not a TTY: no colour
    assert digest(db) == before


@pytest.mark.parametrize("args,message", [
    (["show", "{db}", "99"], "no job 99"),
    (["history", "{db}", "1", "--step", "nope"], "has no step 'nope'"),
    (["show", "{missing}", "1"], "no such file"),
    (["jobs", "{other}"], "not a walstate database"),
    (["jobs", "{text}"], "not a SQLite database"),
])
def test_bad_input_is_one_line_on_stderr_with_a_nonzero_exit(db: str, tmp_path: Path, args: list[str],
                                                             message: str) -> None:
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t(x)").connection.commit()
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 500)
    missing = tmp_path / "missing.db"
    done = walstate(*[a.format(db=db, missing=missing, other=other, text=text) for a in args])
    assert done.returncode == 1
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not missing.exists()


def test_recover_resumes_the_crashed_job_and_retry_reruns_the_failed_one(db: str, tmp_path: Path) -> None:
    rec = walstate("recover", db, "--app", "tests.cli_app:make_engine")
    assert rec.returncode == 0, rec.stderr
    assert "resumed 1 job(s): 3" in rec.stdout
    states = {j["key"]: j["state"] for j in json.loads(walstate("jobs", db, "--json").stdout)}
    assert states["crashed"] == "succeeded"

    illegal = walstate("retry", db, "1")  # succeeded jobs cannot be retried
    assert illegal.returncode == 1 and "'succeeded'" in illegal.stderr and "requeue" in illegal.stderr

    fixed = tmp_path / "fixed"
    fixed.write_text("card replaced")
    again = walstate("retry", db, "2", "charge")
    assert again.returncode == 0 and "requeued: charge" in again.stdout
    rec = walstate("recover", db, "--app", "tests.cli_app:make_engine", env={"WALSTATE_CLI_FIXED": str(fixed)})
    assert rec.returncode == 0, rec.stderr
    show = json.loads(walstate("show", db, "2", "--json").stdout)
    assert show["state"] == "succeeded" and show["context"]["shipped"] is True
    hist = [(h["step"], h["from"], h["to"]) for h in json.loads(walstate("history", db, "2", "--json").stdout)]
    assert ("charge", "failed", "retrying") in hist and (None, "failed", "pending") in hist


def test_cancel_is_journalled_and_refuses_nothing_twice(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    # A job that dies before shipping: cancel it instead of recovering it.
    assert run_job(db, "doomed", "after_commit:4") == -signal.SIGKILL
    done = walstate("cancel", db, "1")
    assert done.returncode == 0 and "cancelled" in done.stdout
    show = json.loads(walstate("show", db, "1", "--json").stdout)
    assert show["state"] == "cancelled" and show["owner"] is None
    assert {s["state"] for p in show["phases"] for s in p["steps"]} <= {"succeeded", "cancelled"}
    assert walstate("cancel", db, "1").returncode == 0  # already cancelled: nothing to do, nothing written
    hist = json.loads(walstate("history", db, "1", "--json").stdout)
    assert sum(h["note"] == "cancelled by an operator" for h in hist) >= 2


def test_diagram_prints_the_machine_and_the_workflow_as_mermaid() -> None:
    plain = walstate("diagram")
    assert plain.returncode == 0
    assert "stateDiagram-v2" in plain.stdout and "running --> succeeded: succeed" in plain.stdout
    app = walstate("diagram", "--app", "tests.cli_app:flow")
    assert "flowchart LR" in app.stdout and "subgraph phase0[pay]" in app.stdout and "phase0 --> phase1" in app.stdout


def test_watch_follows_a_job_to_its_end_and_exits_with_its_outcome(db: str) -> None:
    done = walstate("watch", db, "1", "--interval", "0.05", "--timeout", "10")
    assert done.returncode == 0
    assert "succeeded" in done.stdout and "pay 1/1" in done.stdout and "\r" not in done.stdout
