"""The job runtime: a worker that claims runnable jobs from the file and runs them in the background.

A :class:`Worker` belongs to one :class:`~walstate.Engine`. Its loop claims
runnable jobs (pending; unfinished with a dead owner or an expired lease) of
the workflows registered on the engine, up to its free concurrency, with one
atomic claim (``WritePath.claim_runnable``), and runs each on a thread of its
own. Workers of several processes on one file share the work; the claim and
its epoch make sure no job runs twice.

An idle worker sleeps until something may have changed, never busy-polls:

* in this process, :meth:`Worker.wake` (a submit, a started job, a job that
  ended and freed a slot) notifies its condition at once;
* from other processes, ``PRAGMA data_version`` changes on every commit to
  the file; reading it costs a few microseconds, done every ``poll`` seconds
  (20 ms by default); only a change leads to a (cheap, read-only) look for
  runnable jobs, and only a hit to a claim that takes the write lock;
* dead owners and expired leases need no commit to appear, so every
  ``scan`` seconds (0.5 s) the worker also checks the owners of unfinished
  jobs (by pid on this host, by lease elsewhere);
* a parked job (its steps wait) becomes due at its wake-up time: the worker
  keeps the earliest one (re-read when the file changes) and claims when it
  has come, so a timer is late by at most about ``poll``. Waiting jobs hold
  no thread and no claim.

:class:`JobHandle` is what :meth:`Engine.start` returns: the job's id, its
status, and its result when it ends (in this process or any other).
"""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Any, Generic

from . import checks, log, ownership
from .storage.errors import ConfigurationError
from .storage.types import TERMINAL_JOB_STATES
from .workflow import C

if TYPE_CHECKING:
    from .engine import Engine, JobStatus


class Worker:
    """Claims and runs jobs for one engine until stopped (see the module docstring).

    Use :meth:`Engine.start_worker` / :meth:`Engine.stop_worker` or
    :meth:`Engine.serve` rather than building one directly.
    """

    def __init__(self, engine: Engine, concurrency: int, *, poll: float = 0.02, scan: float = 0.5) -> None:
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be >= 1, not {concurrency}")
        self.engine = engine
        self.concurrency = concurrency
        self.poll = poll
        self.scan = scan
        self._cv = threading.Condition()
        self._woken = True
        self._stopping = False
        self._inflight: dict[int, Any] = {}  # job id -> its _Active
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        #: Jobs this engine cannot run (changed definition, bad context): never claimed again here.
        self.unrunnable: dict[int, str] = {}
        self.claimed = 0

    # -- control -----------------------------------------------------------------

    def start(self) -> Worker:
        self._thread = threading.Thread(target=self._loop, name="walstate-worker", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        """Leaving the ``with`` block stops the worker, letting its jobs in flight end (drain)."""
        self.engine.stop_worker(drain=True)

    def wake(self) -> None:
        """Look for work now (something in this process may have made a job runnable or freed a slot)."""
        with self._cv:
            self._woken = True
            self._cv.notify_all()

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stopped.is_set()

    def inflight(self) -> list[int]:
        with self._cv:
            return list(self._inflight)

    def stop(self, *, drain: bool = True, grace: float = 30.0) -> None:
        """Stop claiming; let runs in flight end, then return.

        ``drain=True`` lets the jobs in flight run to their end for up to
        ``grace`` seconds; whatever still runs then (or at once with
        ``drain=False``) starts no new step, lets its steps in flight finish
        within what is left of ``grace``, and releases its job (journalled)
        for another worker.
        """
        deadline = time.monotonic() + grace
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if drain:
            self._wait_idle(deadline)
        with self._cv:
            actives = list(self._inflight.values())
        for active in actives:
            active.halt()
        self._wait_idle(deadline)
        # Grace is over: what still runs is released now (its handlers are told;
        # its steps in flight are retried by the next run, journalled as interrupted).
        with self._cv:
            left = list(self._inflight.items())
        for job_id, active in left:
            try:
                self.engine._force_release(job_id, active)
            except Exception as exc:  # a failing file: the lease expires anyway
                log.worker_error(exc)  # log

    def _wait_idle(self, deadline: float) -> None:
        with self._cv:
            while self._inflight and time.monotonic() < deadline:
                self._cv.wait(min(0.05, max(0.0, deadline - time.monotonic())))

    # -- the loop ----------------------------------------------------------------

    def _loop(self) -> None:
        read = self.engine.store
        version = -1
        next_scan = 0.0
        next_wake: float | None = None
        try:
            while True:
                with self._cv:
                    if self._stopping:
                        return
                    woken, self._woken = self._woken, False
                    free = self.concurrency - len(self._inflight)
                try:
                    changed = False
                    current = read.data_version()
                    if current != version:
                        version, changed = current, True
                    if changed or next_wake is None:
                        earliest = read.next_wake(list(self.engine._flows), self.engine._registry.claimable())
                        next_wake = math.inf if earliest is None else earliest
                    now = time.monotonic()
                    dead: list[tuple[int, int]] = []
                    scanned = now >= next_scan
                    if scanned:
                        next_scan = now + self.scan
                        self.engine._submit_due()
                        dead = self._dead_owned()
                    due = self.engine.clock() >= next_wake  # a parked job's wake-up time has come
                    if free > 0 and (woken or changed or scanned or due):
                        self._claim(free, dead)
                        if due:
                            next_wake = None
                except Exception as exc:  # a busy or failing file: keep the worker alive, try again
                    log.worker_error(exc)  # log
                with self._cv:
                    if not self._woken and not self._stopping:
                        self._cv.wait(self.poll)
        finally:
            self._stopped.set()

    def _dead_owned(self) -> list[tuple[int, int]]:
        """``(id, epoch)`` of unfinished jobs of our workflows whose owner is dead (by pid here, else by lease)."""
        engine = self.engine
        now = engine.lease_clock()
        flows = engine._flows
        # This engine's own claims: its runs give back what they stop running, so one left behind (its
        # release failed too) is taken only once its lease has run out, never while the run may live.
        me = engine.owner
        dead = [(job_id, epoch) for job_id, epoch, workflow, owner, lease in engine.store.owned_unfinished()
                if workflow in flows and job_id not in self.unrunnable
                and (owner != me or lease is None or lease <= now)
                and not ownership.owner_alive(owner, job_id, lease, now)]
        if not dead:
            return dead
        # Of versions this engine can run only (the claim would skip the others anyway: do not ask it to).
        versions = set(engine._registry.claimable())
        rows = [engine.store.job(job_id) for job_id, _ in dead]
        return [d for d, row in zip(dead, rows) if row is not None and (row.workflow, row.version) in versions]

    def _claim(self, free: int, dead: list[tuple[int, int]]) -> None:
        engine = self.engine
        if not dead and not engine.store.runnable_exists(list(engine._flows), engine.clock(), list(self.unrunnable),
                                                         engine._registry.claimable()):
            return
        self.claimed += engine._claim_batch(free, dead, self)

    def _adopt(self, job_id: int, active: Any) -> None:
        with self._cv:
            self._inflight[job_id] = active

    def _done(self, job_id: int) -> None:
        with self._cv:
            self._inflight.pop(job_id, None)
            self._woken = True
            self._cv.notify_all()


class JobHandle(Generic[C]):
    """A job submitted with :meth:`Engine.start` (or found with :meth:`Engine.handle`).

    ``id`` is the job's id; :meth:`status` reads it as stored now;
    :meth:`result` waits for it to end, wherever it runs.
    """

    def __init__(self, engine: Engine, job_id: int) -> None:
        self.engine = engine
        self.id = job_id

    def __repr__(self) -> str:
        return f"JobHandle({self.id})"

    def status(self) -> JobStatus[C]:
        """The job as stored now."""
        return self.engine.status(self.id)

    def done(self) -> bool:
        """Whether the job has ended (succeeded, failed or cancelled)."""
        return self.engine._row(self.id).state in TERMINAL_JOB_STATES

    def result(self, timeout: float | None = None) -> JobStatus[C]:
        """Wait for the job to end and return its final status.

        Raises :class:`JobFailed` or :class:`JobCancelled` when it ended so,
        and ``TimeoutError`` when it has not ended within ``timeout`` seconds
        (the job goes on). Ends run in this process are seen at once, others
        within a few tens of milliseconds. A ``timeout`` that is not a number of
        seconds >= 0 (NaN, negative, a string) raises :class:`InvalidArgument`.
        """
        if timeout is not None:  # NaN compared false with every deadline: it waited forever
            timeout = checks.seconds(timeout, "result(timeout=)", zero=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        engine = self.engine
        while True:
            row = engine._row(self.id)
            if row.state in TERMINAL_JOB_STATES:
                return engine._finished(row)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{engine.path}: job {self.id} has not ended within {timeout:g}s "
                                   f"(it is {row.state}); it goes on")
            wait = 0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic()))
            engine._wait_for_an_end(wait)

    async def status_async(self) -> JobStatus[C]:
        """:meth:`status` for asyncio apps: the read happens in a worker thread."""
        import asyncio

        return await asyncio.to_thread(self.status)

    async def done_async(self) -> bool:
        """:meth:`done` for asyncio apps: the read happens in a worker thread."""
        import asyncio

        return await asyncio.to_thread(self.done)

    async def result_async(self, timeout: float | None = None) -> JobStatus[C]:
        """:meth:`result` for asyncio apps: never blocks the loop; cancelling the awaiting task leaves the job be."""
        from .aio import result_async

        status: JobStatus[C] = await result_async(self, timeout)
        return status


__all__ = ["JobHandle", "Worker"]
