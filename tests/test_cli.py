"""The `walstate` console script, run for real against files made by real jobs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
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
    assert any(" good " in l and "succeeded" in l and l.endswith("2/2 ok") for l in lines)
    # A failed job's steps are counted by outcome, not all as "done".
    assert any(" broken " in l and "failed" in l and l.endswith("0/2 ok, 1 failed, 1 cancelled") for l in lines)
    assert any(" crashed " in l and "running" in l for l in lines)
    assert all(len(l) <= 100 for l in lines)
    assert not any(l.startswith("more jobs") for l in lines)

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
    page = json.loads(walstate("jobs", db, "--json").stdout)
    assert (page["offset"], page["limit"], page["next_offset"]) == (0, 50, None)
    jobs = page["jobs"]
    assert {j["key"]: j["state"] for j in jobs} == {"good": "succeeded", "broken": "failed", "crashed": "running"}
    broken = next(j for j in jobs if j["key"] == "broken")
    assert broken["steps"] == {"failed": 1, "cancelled": 1} and broken["total"] == 2 and broken["phase"] == "pay"
    assert "card declined" in broken["error"]
    show = json.loads(walstate("show", db, "1", "--json").stdout)
    assert show["context"] == {"name": "good", "paid": True, "shipped": True}
    assert [p["name"] for p in show["phases"]] == ["pay", "ship"]
    hist = json.loads(walstate("history", db, "1", "--json").stdout)
    assert [(h["step"], h["to"]) for h in hist][:2] == [(None, "running"), ("charge", "running")]
    assert json.loads(walstate("jobs", db, "--json", "--state", "failed").stdout)["jobs"][0]["key"] == "broken"
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
    states = {j["key"]: j["state"] for j in json.loads(walstate("jobs", db, "--json").stdout)["jobs"]}
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


def _diagram_types(text: str) -> list[str]:
    """The Mermaid diagram declarations in ``text``: a document that renders as is has exactly one, first."""
    kinds = ("stateDiagram", "flowchart", "graph", "sequenceDiagram", "classDiagram")
    return [l.split()[0] for l in text.splitlines() if l.strip() and l.split()[0].startswith(kinds)]


def test_diagram_prints_one_mermaid_document_the_machine_or_the_workflow() -> None:
    plain = walstate("diagram")
    assert plain.returncode == 0
    assert plain.stdout.splitlines()[0] == "stateDiagram-v2" and _diagram_types(plain.stdout) == ["stateDiagram-v2"]
    assert "running --> succeeded: succeed" in plain.stdout and "[*] --> pending" in plain.stdout
    app = walstate("diagram", "--app", "tests.cli_app:flow")
    assert app.returncode == 0
    assert app.stdout.splitlines()[0] == "flowchart LR" and _diagram_types(app.stdout) == ["flowchart"]
    # Generated ids, quoted labels: a step named like a Mermaid keyword cannot break the document.
    assert 'subgraph p0["pay"]' in app.stdout and 's0["charge"]' in app.stdout and "p0 --> p1" in app.stdout
    assert app.stdout.count("subgraph") == app.stdout.count("    end") == 2
    machine = walstate("diagram", "--app", "tests.cli_app:flow", "--kind", "machine")
    assert machine.stdout == plain.stdout
    lonely = walstate("diagram", "--kind", "workflow")
    assert lonely.returncode == 1 and "needs --app" in lonely.stderr


def test_watch_follows_a_job_to_its_end_and_exits_with_its_outcome(db: str, tmp_path: Path) -> None:
    done = walstate("watch", db, "1", "--interval", "0.05", "--timeout", "10")
    assert done.returncode == 0
    assert "succeeded" in done.stdout and "pay 1/1" in done.stdout and "\r" not in done.stdout
    broken = str(tmp_path / "b.db")
    assert run_job(broken, "broken") == 0
    failed = walstate("watch", broken, "1", "--interval", "0.05", "--timeout", "10")
    assert failed.returncode == 1 and "job 1 failed: 0/2 ok, 1 failed, 1 cancelled" in failed.stdout


def test_watch_never_shows_a_failed_phase_like_a_finished_one(tmp_path: Path) -> None:
    broken = str(tmp_path / "b.db")
    assert run_job(broken, "broken") == 0
    failed = walstate("watch", broken, "1", "--interval", "0.05", "--timeout", "10")
    assert failed.returncode == 1
    # Per phase: sub-steps that succeeded out of all, then those that failed or were cancelled.
    assert "pay 0/1 (1 failed)  ship 0/1 (1 cancelled)" in failed.stdout, failed.stdout


def test_app_searches_the_current_directory_after_the_installed_packages_not_before(tmp_path: Path) -> None:
    from tests.cli_app import make_engine

    installed, here = tmp_path / "site", tmp_path / "project"
    installed.mkdir()
    here.mkdir()
    (installed / "shadowme.py").write_text("WHO = 'installed'\n")
    (here / "shadowme.py").write_text("WHO = 'a stray file of the current directory'\n")
    (here / "pathapp.py").write_text(
        "import os, shadowme\n"
        "from tests.cli_app import make_engine as make\n"
        "open(os.environ['SEEN'], 'w').write(shadowme.WHO)\n")
    db = str(tmp_path / "p.db")
    make_engine(db).close()
    seen = tmp_path / "seen"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), str(ROOT)]), "SEEN": str(seen)}
    listed = subprocess.run([str(WALSTATE), "jobs", db, "--app", "pathapp:make"], capture_output=True, text=True,
                            timeout=60, cwd=here, env=env)
    assert listed.returncode == 0, listed.stderr
    assert seen.read_text() == "installed"  # the app itself was found in the current directory
    missing = subprocess.run([str(WALSTATE), "jobs", db, "--app", "nowhere_app:make"], capture_output=True,
                             text=True, timeout=60, cwd=here, env=env)
    assert missing.returncode == 1 and f"then in the current directory {here}" in missing.stderr


def test_watch_of_a_finished_job_stamps_it_with_when_it_ended_not_the_current_time(tmp_path: Path) -> None:
    db = _job_db(tmp_path / "old.db", ["old"])
    ended = 1_000_000_000.0  # the job ended in September 2001
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE walstate_job SET updated_at=? WHERE id=1", (ended,))
    conn.close()
    [line] = walstate("watch", db, "1", "--json").stdout.splitlines()
    assert json.loads(line)["at"] == ended
    text = walstate("watch", db, "1").stdout
    assert text.startswith(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ended)) + "  succeeded "), text


def test_watch_json_streams_one_flushed_json_line_per_change_until_the_job_ends(tmp_path: Path) -> None:
    db = str(tmp_path / "w.db")
    gate = tmp_path / "ship-may-end"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WALSTATE_CLI_SHIP_GATE": str(gate)}
    job = subprocess.Popen([sys.executable, "-m", "tests.cli_app", db, "slow"], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 30
        while walstate("show", db, "1").returncode != 0:  # the job is stored once the file shows it
            assert time.monotonic() < deadline, "the job never appeared"
            time.sleep(0.02)
        with subprocess.Popen([str(WALSTATE), "watch", db, "1", "--json", "--interval", "0.02"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env) as watch:
            assert watch.stdout is not None
            first = json.loads(watch.stdout.readline())
            # Read while the job still runs (its last step waits for the gate): the line was
            # flushed, not held in a pipe buffer until exit.
            assert job.poll() is None and first["state"] in ("pending", "running")
            rest = []
            while not any(l["steps"].get("running") for l in [first, *rest]):
                rest.append(json.loads(watch.stdout.readline()))  # until it shows the step in flight
            gate.touch()
            rest += [json.loads(line) for line in watch.stdout]
            assert watch.wait(timeout=30) == 0
    finally:
        job.kill() if job.poll() is None else None
        job.wait(timeout=30)
    lines = [first, *rest]
    assert lines[-1]["state"] == "succeeded" and lines[-1]["steps"] == {"succeeded": 2}
    assert lines[-1]["phases"] == [{"name": "pay", "steps": {"succeeded": 1}, "total": 1},
                                   {"name": "ship", "steps": {"succeeded": 1}, "total": 1}]
    assert all({"at", "id", "state", "phase", "steps", "progress"} <= set(l) for l in lines)
    changes = [{k: v for k, v in l.items() if k != "at"} for l in lines]
    assert all(a != b for a, b in zip(changes, changes[1:]))  # one line per change, no repeats
    assert any(l["steps"].get("running") for l in lines)  # it saw the slow step in flight


def _job_db(path: Path, keys: list[str]) -> str:
    """A file holding real jobs of the CLI's app, run in this process, one per key, oldest first."""
    from tests.cli_app import Shop, make_engine

    e = make_engine(str(path))
    for key in keys:
        e.run(e.submit("shop", Shop(name=key), key=key))
    e.close()
    return str(path)


def test_jobs_shows_a_scheduled_jobs_key_as_its_schedule_and_slot(tmp_path: Path) -> None:
    from tests.cli_app import Shop, flow, make_engine

    db = str(tmp_path / "s.db")
    e = make_engine(db)
    e.schedule(flow, cron="* * * * *", context=Shop(name="hourly"), name="nightly-shop")
    with e.start_worker(1):  # its first check of the schedule submits the latest slot's job
        deadline = time.monotonic() + 60
        while not e.jobs():
            assert time.monotonic() < deadline, "the schedule submitted no job"
            time.sleep(0.02)
    e.submit("shop", Shop(name="plain"), key="plain")
    [_, scheduled] = e.jobs()
    e.close()
    slot = scheduled.key[len("schedule:nightly-shop:"):]  # type: ignore[index]
    assert scheduled.key == f"schedule:nightly-shop:{slot}" and slot.endswith("Z")
    lines = walstate("jobs", db).stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "WORKFLOW", "KEY"]
    assert any(f" shop       schedule nightly-shop @ {slot} " in l for l in lines), lines
    assert any(" plain " in l for l in lines) and all(len(l) <= 120 for l in lines)
    page = json.loads(walstate("jobs", db, "--json").stdout)
    assert {j["key"] for j in page["jobs"]} == {scheduled.key, "plain"}  # --json keeps the key as stored


def test_jobs_pages_with_limit_and_offset_and_says_where_the_next_page_starts(tmp_path: Path) -> None:
    db = _job_db(tmp_path / "p.db", [f"k{i}" for i in range(1, 8)])
    first = walstate("jobs", db, "--limit", "3")
    lines = first.stdout.splitlines()
    assert [l.split()[2] for l in lines[1:4]] == ["k7", "k6", "k5"] and lines[-1] == "more jobs: --offset 3"
    last = walstate("jobs", db, "--limit", "3", "--offset", "6").stdout.splitlines()
    assert [l.split()[2] for l in last[1:]] == ["k1"]  # the last page: no "more jobs" line
    page = json.loads(walstate("jobs", db, "--limit", "3", "--offset", "3", "--json").stdout)
    assert [j["key"] for j in page["jobs"]] == ["k4", "k3", "k2"] and page["next_offset"] == 6
    assert json.loads(walstate("jobs", db, "--offset", "6", "--json").stdout)["next_offset"] is None
    bad = walstate("jobs", db, "--limit", "0")
    assert bad.returncode == 2 and "--limit" in bad.stderr


def test_jobs_json_gives_keys_whole_where_the_table_cuts_them(tmp_path: Path) -> None:
    key = "customer-4711/order-2024-000123/attempt-1"
    db = _job_db(tmp_path / "k.db", [key])
    table = walstate("jobs", db).stdout.splitlines()[1]
    assert key not in table and " customer-~ " in table
    assert json.loads(walstate("jobs", db, "--json").stdout)["jobs"][0]["key"] == key


def test_every_option_of_every_command_has_help_text() -> None:
    import argparse

    from walstate.cli import parser

    seen = 0

    def walk(p: argparse.ArgumentParser, where: str) -> None:
        nonlocal seen
        for action in p._actions:
            seen += 1
            assert action.help and action.help.strip(), f"{where}: {action.option_strings or action.dest} has no help"
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{where} {name}")

    walk(parser(), "walstate")
    assert seen > 40


def test_an_app_factory_that_fails_is_one_line_error_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "badapp.py").write_text("def make(a, b):\n    return None\n")
    db = str(tmp_path / "x.db")
    from walstate.storage import Store

    Store(db).close()  # the file is checked before the app is loaded: a missing one is refused first
    done = subprocess.run([str(Path(sys.executable).parent / "walstate"), "jobs", db, "--app", "badapp:make"],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "badapp:make" in done.stderr


@pytest.mark.parametrize("level", ["warning", "off"])
def test_walstate_worker_shows_what_it_meets_on_stderr_unless_told_not_to(tmp_path: Path, level: str) -> None:
    from tests.cli_app import Shop, make_engine

    db = str(tmp_path / "jobs.db")
    engine = make_engine(db)
    job = engine.submit("shop", Shop(name="broken"))  # its charge step fails for good: a WARNING
    engine.close()
    err = tmp_path / "worker.err"
    with err.open("wb") as stderr:
        worker = subprocess.Popen([sys.executable, "-m", "walstate", "worker", db, "--app", "tests.cli_app:make_engine",
                                   "--log-level", level], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                  stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 30
            while True:
                conn = sqlite3.connect(db)
                state = conn.execute("SELECT state FROM walstate_job WHERE id=?", (job,)).fetchone()[0]
                conn.close()
                if state == "failed":
                    break
                assert time.monotonic() < deadline and worker.poll() is None, err.read_text()
                time.sleep(0.05)
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(30) == 0
    shown = err.read_text()
    assert ("card declined" in shown) == (level == "warning"), shown


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("slow", ["import", "factory"])
def test_a_worker_stopped_while_it_still_loads_its_app_exits_0_with_one_line_and_no_traceback(
        tmp_path: Path, slow: str, sig: signal.Signals) -> None:
    db, ready = tmp_path / "jobs.db", tmp_path / "loading"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WALSTATE_SLOW_APP": slow, "WALSTATE_SLOW_APP_READY": str(ready)}
    with subprocess.Popen([str(WALSTATE), "worker", str(db), "--app", "tests.slow_app:make_engine"], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as worker:
        try:
            deadline = time.monotonic() + 60
            while not ready.exists():  # the app is being loaded now, and stays so until stopped
                assert worker.poll() is None and time.monotonic() < deadline, worker.communicate()
                time.sleep(0.02)
            worker.send_signal(sig)
            out, err = worker.communicate(timeout=60)
        finally:
            worker.kill() if worker.poll() is None else None
    assert worker.returncode == 0, (out, err)
    assert err == "" and out == f"worker stopped: {sig.name} while loading tests.slow_app:make_engine, " \
                                "before claiming any job\n"
    assert not db.exists()  # nothing was started: not even the file


@pytest.mark.parametrize("command", [["retry", "{db}", "1"], ["cancel", "{db}", "1"], ["send", "{db}", "1", "paid", "{{}}"],
                                     ["prune", "{db}", "--older-than", "1d"], ["upgrade", "{db}"]])
def test_a_command_that_writes_never_creates_a_file_from_a_mistyped_path(tmp_path: Path, command: list[str],
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from walstate.cli import EXIT_ERROR, main

    missing = tmp_path / "typo.db"
    assert main([a.format(db=missing) for a in command]) == EXIT_ERROR
    assert "no such file" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == []  # no file, no -wal, no -shm


@pytest.mark.parametrize("command", [["retry", "{db}", "1"], ["cancel", "{db}", "1"], ["send", "{db}", "1", "paid", "{{}}"],
                                     ["prune", "{db}", "--older-than", "1d"]])
def test_a_command_that_changes_jobs_leaves_an_apps_own_sqlite_file_alone(tmp_path: Path, command: list[str],
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from walstate.cli import EXIT_ERROR, main

    app = tmp_path / "app.db"
    with sqlite3.connect(app) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
    conn.close()
    before = digest(str(app))
    assert main([a.format(db=app) for a in command]) == EXIT_ERROR
    assert "not a walstate database" in capsys.readouterr().err
    assert digest(str(app)) == before
    conn = sqlite3.connect(app)
    assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("orders",)]
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # not switched to WAL
    conn.close()


def test_upgrade_creates_walstate_tables_in_an_existing_database_and_says_so(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from walstate.cli import main

    app = tmp_path / "app.db"
    sqlite3.connect(app).close()  # an empty SQLite file: an owner preparing it for an app role
    assert main(["upgrade", str(app), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["created"] is True
    assert main(["upgrade", str(app)]) == 0
    assert "already at schema" in capsys.readouterr().out
    assert main(["jobs", str(app), "--json"]) == 0


def test_describe_wait_reads_as_english_for_a_sleep_a_message_and_both() -> None:
    from walstate.cli import _when, describe_wait

    at = 1_800_000_000.0
    assert describe_wait({"topic": None, "wake_at": at}) == f"sleeps until {_when(at)}"  # was "waits for until"
    assert describe_wait({"topic": "paid", "wake_at": None}) == "waits for a message on 'paid'"
    assert describe_wait({"topic": "paid", "wake_at": at}) == f"waits for a message on 'paid' or until {_when(at)}"


@pytest.mark.parametrize("command", [["jobs", "{db}"], ["show", "{db}", "1"]])
def test_a_read_command_with_an_app_never_creates_a_missing_file(tmp_path: Path, command: list[str]) -> None:
    # The app's factory opened an Engine on the path, which made the file.
    missing = tmp_path / "MISSING.db"
    done = walstate(*[a.format(db=missing) for a in command], "--app", "tests.cli_app:make_engine")
    assert done.returncode == 1 and "no such file" in done.stderr, done.stderr
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("command", [["jobs", "{db}"], ["show", "{db}", "4"]])
def test_a_read_command_with_an_app_leaves_a_schema_1_file_at_schema_1(tmp_path: Path, command: list[str]) -> None:
    import shutil

    from tests.test_migrations import FIXTURE

    old = tmp_path / "old.db"
    shutil.copyfile(FIXTURE, old)
    before = digest(str(old))
    done = walstate(*[a.format(db=old) for a in command], "--app", "tests.cli_app:make_engine")
    assert done.returncode == 1 and "walstate upgrade" in done.stderr, done.stderr
    assert digest(str(old)) == before
    assert sorted(os.listdir(tmp_path)) == ["old.db"]


def test_a_read_command_leaves_no_wal_or_shm_beside_a_closed_file(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    from tests.cli_app import make_engine

    make_engine(str(path)).close()
    assert sorted(os.listdir(tmp_path)) == ["jobs.db"]
    for command in (["jobs", str(path)], ["jobs", str(path), "--app", "tests.cli_app:make_engine"]):
        done = walstate(*command)
        assert done.returncode == 0, done.stderr
        assert sorted(os.listdir(tmp_path)) == ["jobs.db"], command


def test_upgrade_refuses_another_applications_sqlite_file_unless_told_to_create_the_tables(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from walstate.cli import EXIT_ERROR, main

    app = tmp_path / "app.db"
    with sqlite3.connect(app) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
    conn.close()
    before = digest(str(app))
    assert main(["upgrade", str(app)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "another application" in err and "orders" in err and "--create" in err, err
    assert digest(str(app)) == before
    assert main(["upgrade", "--create", str(app), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["created"] is True
    conn = sqlite3.connect(app)
    assert conn.execute("SELECT count(*) FROM orders").fetchone() == (0,)  # the app's table is kept
    assert conn.execute("SELECT value FROM walstate_meta WHERE key='schema_version'").fetchone() is not None
    conn.close()


def test_retry_of_a_job_that_is_already_pending_says_nothing_was_requeued_and_exits_non_zero(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.cli_app import Shop, make_engine
    from walstate.cli import EXIT_ERROR, main

    path = str(tmp_path / "jobs.db")
    with make_engine(path) as engine:
        job = engine.submit("shop", Shop(name="ann"))
    history = len(make_engine(path).history(job))
    assert main(["retry", path, str(job)]) == EXIT_ERROR
    captured = capsys.readouterr()
    assert "pending already" in captured.err and "nothing was requeued" in captured.err, captured
    assert "requeued:" not in captured.out
    with make_engine(path) as engine:
        assert engine.status(job).state == "pending" and len(engine.history(job)) == history


@pytest.mark.parametrize("command", [["jobs", "memory://app"], ["show", "memory://app", "1"],
                                     ["prune", "memory://app", "--older-than", "1d"], ["upgrade", "memory://app"],
                                     ["send", "memory://app", "1", "t", "{}"], ["demo", "--db", "memory://app"]])
def test_a_memory_target_is_refused_saying_its_jobs_live_in_one_process(command: list[str]) -> None:
    # Before: `jobs` answered "(no jobs)" and `upgrade` "already at schema 11", exit 0: an app's jobs looked gone.
    done = walstate(*command)
    assert done.returncode != 0, done.stdout
    assert "lives only inside the process that opened it" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
