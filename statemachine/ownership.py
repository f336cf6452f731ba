"""Who runs a job: owner identities, liveness, claims, leases and heartbeats.

Every run of a job begins with one compare-and-set claim that bumps the job's
claim epoch (see ``WritePath.claim``); every later write of the run is
conditioned on that owner and epoch, so a superseded run can change nothing.
This module decides *when* a claim may be taken and keeps taken claims alive.

An owner token is ``boot-id|pid-namespace|host|pid|process-start|nonce``.
Whether its process still lives can be told exactly only from the same
kernel boot and the same pid namespace: then the pid must exist, not be a
zombie, and have started when the token says (a reused pid started later).
Within this very process, the owner is alive while it is running that job.
Anywhere else (another host, another container, another boot) only the
lease counts, and a heartbeat renews it every lease/3 while the run lives,
however long a handler takes.

A live pid is not enough on its own: a process that is stopped (SIGSTOP, a
debugger, a paused container) or whose heartbeat thread hangs keeps its pid
but renews nothing. An owner whose lease has been expired for
:data:`HUNG_GRACE` seconds is judged dead whatever its pid says; its claim
is taken, and its later writes are refused (fencing). Leases are set and
judged on the store's lease clock (``Storage.lease_clock``), never on an
engine's own clock, so a step of one engine's wall clock takes no live job.

A hung owner's locks go with its jobs. On PostgreSQL a process stopped inside
a transaction (a claim holding the claims' advisory lock, a renewal or a
step's compare-and-set holding its job's row) would keep those locks for as
long as it is stopped, and other workers' ``FOR UPDATE SKIP LOCKED`` claims
would pass its jobs by for good: the engine sets
``idle_in_transaction_session_timeout`` of its sessions to its lease plus
:data:`HUNG_GRACE` (``WritePath.limit_idle_transactions``), so the server ends
that transaction by the time the owner is judged hung. (On SQLite a process
stopped inside a write transaction stops every writer of the file until it
continues: nothing outside can end it.)

After ``fork()`` the child computes its own identity (``os.register_at_fork``)
and forgets the parent's live runs, so it never writes under the parent's
claims and judges the parent like any other process.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("walstate.ownership")

Clock = Callable[[], float]


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """``(state letter, start time in ticks)`` of a process, or ``None`` if it does not exist."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    # Fields counted after the parenthesised command name (which may hold spaces).
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], fields[19]


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


@dataclass(frozen=True)
class Identity:
    """This process as other processes can check it."""

    boot_id: str
    pid_ns: str
    host: str
    pid: int
    start: str

    @classmethod
    def current(cls) -> Identity:
        pid = os.getpid()
        stat = _proc_stat(pid)
        return cls(_read("/proc/sys/kernel/random/boot_id"), _pid_namespace(), socket.gethostname(), pid,
                   stat[1] if stat else "")

    def token(self, nonce: str) -> str:
        return f"{self.boot_id}|{self.pid_ns}|{self.host}|{self.pid}|{self.start}|{nonce}"


_identity = Identity.current()
# (owner token, job id) of every run live in this process right now.
_live_runs: set[tuple[str, int]] = set()
# Owner tokens of engines of this process that are claiming a batch of jobs
# right now: until each claimed job is marked live, all of the owner's jobs count as live.
_claiming: set[str] = set()
_live_lock = threading.Lock()


def identity() -> Identity:
    """This process's identity (recomputed in a forked child)."""
    return _identity


def new_nonce() -> str:
    return uuid.uuid4().hex[:12]


def _after_fork_in_child() -> None:
    global _identity, _live_lock
    _identity = Identity.current()
    # The parent's runs are not ours; the lock may have been held mid-fork.
    _live_lock = threading.Lock()
    _live_runs.clear()
    _claiming.clear()
    for heartbeat in list(_heartbeats):
        heartbeat._after_fork_in_child()


_heartbeats: weakref.WeakSet[Heartbeat] = weakref.WeakSet()
os.register_at_fork(after_in_child=_after_fork_in_child)


class Claiming:
    """Context manager: while a batch claim of ``owner`` is in flight, its jobs count as live here."""

    def __init__(self, owner: str) -> None:
        self.owner = owner

    def __enter__(self) -> None:
        with _live_lock:
            _claiming.add(self.owner)

    def __exit__(self, *exc: object) -> None:
        with _live_lock:
            _claiming.discard(self.owner)


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


#: Seconds a lease may stay expired before an owner whose process lives on this host is judged hung
#: (stopped, or its heartbeat stuck) and loses its jobs: the owner renewed nothing for its lease plus this.
HUNG_GRACE = 10.0


def owner_alive(owner: str | None, job_id: int, lease_expires: float | None, now: float) -> bool:
    """Whether the run named by ``owner`` may still be running job ``job_id``.

    ``now`` is the store's lease clock (``Storage.lease_clock``). An owner
    whose process cannot be checked directly lives while its lease is
    valid; one whose process lives on this host, until its lease has been
    expired for :data:`HUNG_GRACE` seconds (a hung owner loses its jobs).
    """
    if owner is None:
        return False
    parts = owner.split("|")
    me = _identity
    lease_valid = lease_expires is not None and lease_expires > now
    if len(parts) != 6 or not parts[0] or parts[0] != me.boot_id or parts[1] != me.pid_ns:
        # Another boot, host or pid namespace (or a token from an older
        # walstate): its pid means nothing here, only its lease does.
        return lease_valid
    try:
        pid = int(parts[3])
    except ValueError:
        return lease_valid
    if pid == me.pid and parts[4] == me.start:
        with _live_lock:
            return (owner, job_id) in _live_runs or owner in _claiming
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False  # gone, or killed and not yet reaped: a zombie runs nothing
    # A reused pid started at another time: the owner is gone.
    if stat[1] and parts[4] and stat[1] != parts[4]:
        return False
    # Its process lives, but a lease nobody renewed past the grace wins over the pid: it is hung.
    return lease_expires is None or now < lease_expires + HUNG_GRACE


@dataclass(frozen=True)
class OwnerInfo:
    """Who holds a job, read from its owner token: ``host`` and ``pid`` (``None`` for a token walstate cannot read)."""

    token: str
    host: str | None
    pid: int | None


def describe_owner(owner: str) -> OwnerInfo:
    """The host and pid an owner token names."""
    parts = owner.split("|")
    if len(parts) != 6:
        return OwnerInfo(owner, None, None)
    try:
        pid: int | None = int(parts[3])
    except ValueError:
        pid = None
    return OwnerInfo(owner, parts[2] or None, pid)


class Claim:
    """One run's hold on one job: the fencing token its writes carry, and what it is told.

    ``on_signal(reason)`` is called (from the heartbeat thread) with ``"lost"``
    when the claim was taken over or the job ended elsewhere, and with
    ``"cancel"`` when an operator asked for the job to be cancelled.
    """

    __slots__ = ("job_id", "owner", "epoch", "on_signal")

    def __init__(self, job_id: int, owner: str, epoch: int, on_signal: Callable[[str], None]) -> None:
        self.job_id = job_id
        self.owner = owner
        self.epoch = epoch
        self.on_signal = on_signal


Renew = Callable[[int, str, int, float], "bool | None"]
Poll = Callable[[list[int]], "set[int]"]

#: How often a heartbeat looks for cancellation requests between renewals (one read).
POLL_INTERVAL = 0.25


class Heartbeat:
    """Renews the lease of every live claim of one engine every ``lease / 3`` seconds.

    One daemon thread per engine, started with the first claim. A renewal
    that finds the claim gone signals the run ``"lost"``, which stops it; a
    renewal, or the cheaper read ``poll`` made every :data:`POLL_INTERVAL`
    in between, that finds a cancellation request signals ``"cancel"``.
    """

    def __init__(self, lease: float, renew: Renew, clock: Clock = time.time, poll: Poll | None = None) -> None:
        self.lease = lease
        self.period = lease / 3
        self.renew = renew
        self.poll = poll
        self.clock = clock
        self._claims: dict[int, Claim] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        _heartbeats.add(self)

    def lease_expires(self) -> float:
        return self.clock() + self.lease

    def add(self, claim: Claim) -> None:
        with self._lock:
            self._claims[claim.job_id] = claim
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._loop, name="walstate-heartbeat", daemon=True)
                self._thread.start()

    def remove(self, claim: Claim) -> None:
        with self._lock:
            if self._claims.get(claim.job_id) is claim:
                del self._claims[claim.job_id]

    def beat(self) -> None:
        """Renew every claim now (the loop calls this every period)."""
        with self._lock:
            claims = list(self._claims.values())
        for claim in claims:
            try:
                result = self.renew(claim.job_id, claim.owner, claim.epoch, self.lease_expires())
            except Exception as exc:  # a busy or failing disk: try again next period
                log.warning("job %s: lease renewal failed (%s); retrying in %.1fs", claim.job_id, exc, self.period,
                            extra={"walstate_job": claim.job_id})
                continue
            if result is None:
                log.warning("job %s: claim lost (epoch %s); stopping its run", claim.job_id, claim.epoch,
                            extra={"walstate_job": claim.job_id})
                self.remove(claim)
                claim.on_signal("lost")
            elif result:
                claim.on_signal("cancel")

    def check_cancels(self) -> None:
        """Signal ``"cancel"`` to the runs whose job an operator asked to cancel."""
        if self.poll is None:
            return
        with self._lock:
            claims = dict(self._claims)
        if not claims:
            return
        try:
            wanted = self.poll(list(claims))
        except Exception:  # a busy file: the next poll or renewal sees it
            return
        for job_id in wanted:
            claims[job_id].on_signal("cancel")

    def _loop(self) -> None:
        tick = min(self.period, POLL_INTERVAL)
        next_beat = time.monotonic() + self.period
        while not self._wake.wait(tick):
            if self._closed:
                return
            if time.monotonic() >= next_beat:
                self.beat()
                next_beat = time.monotonic() + self.period
            else:
                self.check_cancels()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _after_fork_in_child(self) -> None:
        # The thread did not survive the fork, and the parent's claims are not ours.
        self._claims = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None
