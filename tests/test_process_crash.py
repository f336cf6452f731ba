"""Real processes: a child is SIGKILLed mid-phase and another process resumes the job exactly once."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def spawn(action: str, db: str, effects: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "WALSTATE_EFFECTS": effects, "PYTHONPATH": str(ROOT)}
    pipe = subprocess.PIPE if action == "resume" else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "tests.proc_child", action, db], cwd=ROOT, env=env,
                            stdout=pipe, stderr=pipe)


def states(db: str) -> dict[str, str]:
    if not os.path.exists(db):
        return {}
    conn = sqlite3.connect(db, timeout=10)
    try:
        return dict(conn.execute("SELECT name, state FROM walstate_step").fetchall())
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()


@pytest.mark.slow
def test_a_job_killed_with_sigkill_mid_phase_resumes_exactly_once_in_another_process(tmp_path: Path) -> None:
    db, effects = str(tmp_path / "jobs.db"), str(tmp_path / "effects.log")
    child = spawn("run", db, effects)
    deadline = time.monotonic() + 60
    killed_at: dict[str, str] = {}
    while time.monotonic() < deadline and child.poll() is None:
        now = states(db)
        two = {k: v for k, v in now.items() if k.startswith("two_")}
        if any(v == "succeeded" for v in two.values()) and any(v != "succeeded" for v in two.values()):
            child.send_signal(signal.SIGKILL)
            killed_at = now
            break
        time.sleep(0.002)
    assert child.wait(30) == -signal.SIGKILL, "the child finished before it could be killed mid-phase"
    resumer = spawn("resume", db, effects)
    out, err = resumer.communicate(timeout=60)
    assert resumer.returncode == 0, err.decode()

    conn = sqlite3.connect(db)
    final = dict(conn.execute("SELECT name, state FROM walstate_step").fetchall())
    assert conn.execute("SELECT state FROM walstate_job").fetchone()[0] == "succeeded"
    assert set(final.values()) == {"succeeded"}
    # The transactional effect exists exactly once.
    assert conn.execute("SELECT count(*) FROM effects").fetchone()[0] == 1
    # Steps that had succeeded before the kill never ran again.
    ran = Counter(line.split()[0] for line in Path(effects).read_text().splitlines())
    for name, state in killed_at.items():
        if state == "succeeded" and name != "two_0":
            assert ran[name] == 1, (name, ran)
    # Every other external effect ran at least once.
    assert all(ran[n] >= 1 for n in final if n != "two_0")
    # Journals: one `running` row per attempt, attempts strictly increasing.
    for name in final:
        attempts = [a for (a,) in conn.execute(
            "SELECT attempt FROM walstate_journal WHERE step=? AND to_state='running' ORDER BY id", (name,))]
        assert attempts == list(range(1, len(attempts) + 1))
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
