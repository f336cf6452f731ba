"""Compile the shim, run a workload under it, and hand the log to the checker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

from .checker import Checker, raw_facts, read_log, walstate_facts
from .workloads import DB_NAME

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def unavailable() -> str | None:
    """Why the harness cannot run here (``None`` if it can)."""
    if not sys.platform.startswith("linux"):
        return f"the LD_PRELOAD shim needs Linux (this is {sys.platform})"
    if shutil.which(os.environ.get("CC", "cc")) is None:
        return "no C compiler (cc) to build the LD_PRELOAD shim"
    return None


def build_shim(directory: Path) -> Path:
    """Compile shim.c into ``directory``; raises CalledProcessError with the compiler's message."""
    out = directory / "shim.so"
    subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", "-O2", "-o", str(out), str(HERE / "shim.c"),
                    "-ldl", "-lpthread"], check=True, capture_output=True, text=True)
    return out


@dataclass
class Run:
    directory: str
    log: str
    checker: Checker


def record(shim: Path, base: Path, workload: str, *, durability: str = "full", sync_interval: float | None = None,
           jobs: int = 4, pace: float = 0.0) -> Run:
    """Run ``workload`` in a child process under the shim; return its log and a checker for it."""
    base.mkdir(parents=True, exist_ok=True)
    directory = os.path.realpath(base / "db")
    os.mkdir(directory)
    log, ack = str(base / "fs.log"), str(base / "acks")
    env = {**os.environ, "LD_PRELOAD": str(shim), "PL_DIR": directory, "PL_LOG": log, "PL_ACK": ack,
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    interval = "none" if sync_interval is None else repr(sync_interval)
    subprocess.run([sys.executable, "-m", "tests.powerloss.workloads", workload, directory, ack, durability,
                    interval, str(jobs), repr(pace)], env=env, check=True, cwd=ROOT, timeout=120)
    # Images are opened thousands of times: on tmpfs when there is one (4x faster here).
    shm = "/dev/shm"
    scratch = tempfile.mkdtemp(prefix="walstate-images-", dir=shm if os.access(shm, os.W_OK) else str(base))
    facts = raw_facts if workload.startswith("raw-") else walstate_facts
    checker = Checker(read_log(log), DB_NAME, facts, scratch)
    weakref.finalize(checker, shutil.rmtree, scratch, True)
    return Run(directory, log, checker)


def recover_image(files: dict[str, bytes], directory: Path) -> int:
    """Open an image with walstate, ``recover()`` its jobs, check every invariant; return how many jobs.

    Raises :class:`walstate.testing.InvariantViolation` (or a walstate error) on a violation.
    """
    from walstate import Engine
    from walstate.testing import check_invariants

    from .workloads import FLOWS

    directory.mkdir(parents=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    path = str(directory / DB_NAME)
    with Engine(path, durability="full", workers=2, sync_interval=None) as engine:
        for flow in FLOWS.values():
            engine.register(flow)
        engine.recover()
        jobs = [(j.workflow, j.id) for j in map(engine.status, _job_ids(path))]
    for workflow, job_id in jobs:
        check_invariants(path, FLOWS[workflow], job_id)
    return len(jobs)


def _job_ids(path: str) -> list[int]:
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return [r[0] for r in conn.execute("SELECT id FROM walstate_job")] if "walstate_job" in tables else []
    finally:
        conn.close()
