"""``walstate worker`` on SIGTERM (issue 26.9): a signal can never deadlock its shutdown.

The old handler called ``Event.set()``, which takes the lock the main thread
holds for a moment inside ``Event.wait()``: a signal landing in that moment
hung the worker for good (about 1 in 50 SIGTERMs). Now the handler only sets a
flag and the wake-up fd wakes the main thread. Real processes, real signals,
at random moments of the worker's loop; each must finish its shutdown and exit
within a generous deadline.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from walstate import Engine

from . import busy_app
from .helpers import query

ROOT = Path(__file__).resolve().parent.parent
#: Workers SIGTERMed per run; more (WALSTATE_SIGTERM_WORKERS=200) to hunt a rare hang.
WORKERS = int(os.environ.get("WALSTATE_SIGTERM_WORKERS", "16"))
BATCH = 4


def start_worker(db: str, out: Path) -> tuple[subprocess.Popen[bytes], Path]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with out.open("wb") as o:
        p = subprocess.Popen([sys.executable, "-m", "walstate", "worker", db, "--app", "tests.busy_app:make_engine",
                              "--concurrency", "2", "--grace", "1", "--log-level", "off"], cwd=ROOT, env=env, stdout=o,
                             stderr=subprocess.STDOUT)
    return p, out


def wait_for(predicate: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterms_at_random_moments_always_stop_real_walstate_workers(tmp_path: Path) -> None:
    db = str(tmp_path / "w.db")
    engine = busy_app.make_engine(db)
    try:
        run_batches(engine, db, tmp_path)
    finally:
        engine.close()


def run_batches(engine: Engine, db: str, tmp_path: Path) -> None:
    rng = random.Random(26_9)
    hung: list[str] = []
    for first in range(0, WORKERS, BATCH):
        procs = [start_worker(db, tmp_path / f"worker{n}.out") for n in range(first, min(first + BATCH, WORKERS))]
        try:
            for p, out in procs:
                # Its loop runs (and its handler is installed) once it has said so.
                wait_for(lambda: "worker on" in out.read_text() or p.poll() is not None, f"worker {p.pid} to start")
                assert p.poll() is None, out.read_text()
            # Busy workers (the bad moment comes when a busy thread holds the GIL as the main thread wakes).
            for _ in range(2 * len(procs)):
                engine.submit(busy_app.flow, busy_app.Spin())
            wait_for(lambda: query(db, "SELECT count(*) FROM walstate_job WHERE owner IS NOT NULL")[0][0] >= len(procs),
                     "the workers to run the busy jobs")
            for p, _ in procs:
                time.sleep(rng.uniform(0, 0.25))  # anywhere in its 0.2 s wait loop (old code)
                for _ in range(rng.randint(1, 3)):  # an impatient supervisor sends more than one
                    p.send_signal(signal.SIGTERM)
            for p, out in procs:
                try:
                    code = p.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    hung.append(f"worker {p.pid} still running 120 s after SIGTERM: {out.read_text()[-300:]}")
                    continue
                text = out.read_text()
                # Exit 0. Or, with a second SIGTERM sent after the shutdown had finished ("worker stopped"),
                # killed by it on the way out (the interpreter restores the default action as it exits).
                assert code == 0 or (code == -signal.SIGTERM and "worker stopped" in text), (code, text)
                assert "worker stopped" in text
        finally:
            for p, _ in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=30)
    assert not hung, hung
