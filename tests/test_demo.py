"""`walstate demo`: kills its worker mid-phase and resumes, and never deletes a file it did not make."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from walstate import Engine, Workflow



def demo(db: Path) -> subprocess.CompletedProcess[str]:
    # A path relative to the working directory, as a user types it (the first line names it).
    return subprocess.run([sys.executable, "-m", "walstate", "demo", "--db", db.name], cwd=db.parent,
                          capture_output=True, text=True, timeout=120)


class Ctx(BaseModel):
    n: int = 0


def _real_database(path: Path) -> None:
    flow = Workflow("registration", context=Ctx, phases=["one"])
    flow.step(phase="one")(lambda ctx, step: {"n": ctx.n + 1})
    with Engine(path) as engine:
        for i in range(3):
            engine.run(engine.submit(flow, Ctx(n=i)))


@pytest.mark.parametrize("kind", ["walstate database", "python file", "stray wal file"])
def test_the_demo_refuses_a_file_it_did_not_make_and_leaves_it_byte_identical(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "target.db"
    if kind == "walstate database":
        _real_database(tmp_path / "real.db")
        shutil.copy(tmp_path / "real.db", target)
        kept = target
    elif kind == "python file":
        target = tmp_path / "app.py"
        target.write_text("print('my app')\n")
        kept = target
    else:
        kept = tmp_path / "target.db-wal"
        kept.write_bytes(b"not ours")
    before = kept.read_bytes()
    listing = sorted(os.listdir(tmp_path))
    done = demo(target)
    assert done.returncode == 1
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and "refusing" in done.stderr, done.stderr
    assert kept.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == listing


@pytest.mark.slow
def test_the_demo_kills_its_worker_resumes_and_replaces_its_own_previous_database(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    for run in (1, 2):  # the second run replaces the first run's database
        done = demo(db)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SIGKILLed the worker" in done.stdout
        assert "job 1: succeeded" in done.stdout, f"run {run}: {done.stdout}"
        assert "menu rows written by the transactional step: 3" in done.stdout
        too_wide = [line for line in done.stdout.splitlines() if len(line) > 100]
        assert too_wide == []
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM walstate_job").fetchone()[0] == 1
    conn.close()


def test_the_demos_closing_words_report_what_the_database_says_happened(tmp_path: Path) -> None:
    # The report is built from the run's database; a fake "run" where one step was retried after a
    # real failure and none was interrupted must say exactly that.
    from walstate import demo as demo_module

    db = str(tmp_path / "demo.db")
    demo_module.claim_path(db)
    with demo_module.engine(db) as e:
        e.run(e.submit("registration", demo_module.Onboarding(tenant="t")))
    at_kill = {name: (d.phase, "succeeded" if d.phase == "setup" else "pending", 1 if d.phase == "setup" else 0)
               for name, d in demo_module.flow.steps.items()}
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert demo_module._print_report(db, at_kill) == 0
    text = out.getvalue()
    assert "- retried after a failed attempt: servicesConfig" in text
    assert "- cut short by the kill, journalled as interrupted and run again: none" in text
    assert "- finished before the kill, not run again after it: codeGeneration, createOnboardingUser" in text
    assert "outside work that completed more than once: servicesConfig (2x)" in text
    assert max(len(line) for line in text.splitlines()) <= 100
