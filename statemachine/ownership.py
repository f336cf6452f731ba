"""Who runs a job: owner tokens, and whether the owner is still alive.

A token is ``host|pid|process-start|engine-id``. A job whose owner is alive is
never taken over: on this host we can tell exactly (the pid exists and started
when the token says; in this process, the engine is running that job right
now); for another host or pid namespace we fall back to the lease.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

_HOST = socket.gethostname()
_live_runs: set[tuple[str, int]] = set()
_live_lock = threading.Lock()


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot, or '' where /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode()
    except OSError:
        return ""
    # Field 22, counted after the parenthesised command name (which may hold spaces).
    return stat.rsplit(")", 1)[1].split()[19]


_PID = os.getpid()
_PID_START = _start_time(_PID)


def new_token() -> str:
    """A fresh owner token for one engine in this process."""
    pid = os.getpid()
    start = _PID_START if pid == _PID else _start_time(pid)
    return f"{_HOST}|{pid}|{start}|{uuid.uuid4().hex[:12]}"


class LiveRun:
    """Context manager marking (owner, job) as being run by this process right now."""

    def __init__(self, owner: str, job_id: int) -> None:
        self.key = (owner, job_id)

    def __enter__(self) -> None:
        with _live_lock:
            _live_runs.add(self.key)

    def __exit__(self, *exc: object) -> None:
        with _live_lock:
            _live_runs.discard(self.key)


def owner_alive(owner: str | None, job_id: int, lease_expires: float | None) -> bool:
    """Whether the process named by ``owner`` may still be running job ``job_id``."""
    if owner is None:
        return False
    parts = owner.split("|")
    if len(parts) != 4 or parts[0] != _HOST:
        return lease_expires is not None and lease_expires > time.time()
    pid = int(parts[1])
    if pid == os.getpid():
        with _live_lock:
            return (owner, job_id) in _live_runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    started = _start_time(pid)
    # A reused pid started at another time: the owner is gone.
    return not (started and parts[2] and started != parts[2])
