"""Threads for parallel sub-steps: each run gets the threads it needs, reused when idle.

A fixed engine-wide pool couples jobs: a short job waits behind two long
ones, and a handler that runs a child job can starve the pool and hang. So
every run gets its own ``workers`` threads for its parallel phases, and
threads are cached: one that finishes its task waits a while for the next
before it exits, so many small jobs do not pay for thread creation each time.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from collections.abc import Callable


class Task:
    """One submitted call; :meth:`wait` returns when it has run (its exceptions are the caller's business)."""

    __slots__ = ("fn", "_done")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self._done = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the call to have run; False if ``timeout`` passed first."""
        return self._done.wait(timeout)


class ThreadCache:
    """Runs each submitted call on an idle cached thread, or on a new one if none is idle."""

    def __init__(self, idle_timeout: float = 30.0, name: str = "walstate") -> None:
        self.idle_timeout = idle_timeout
        self.name = name
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._closed = False

    def submit(self, fn: Callable[[], None]) -> Task:
        task = Task(fn)
        with self._lock:
            if self._closed:
                raise RuntimeError("thread cache is closed")
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            worker = _Worker(self)
            worker.give(task)
            worker.thread.start()
        else:
            worker.give(task)
        return task

    def _park(self, worker: _Worker) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._idle.append(worker)
            return True

    def _leave(self, worker: _Worker) -> bool:
        """An idle worker's wait timed out: leave unless a task was handed over meanwhile."""
        with self._lock:
            if worker in self._idle:
                self._idle.remove(worker)
                return True
            return False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.give(None)


class _Worker:
    __slots__ = ("cache", "thread", "_cv", "_task", "_given")

    def __init__(self, cache: ThreadCache) -> None:
        self.cache = cache
        self._cv = threading.Condition(threading.Lock())
        self._task: Task | None = None
        self._given = False
        self.thread = threading.Thread(target=self._loop, name=cache.name, daemon=True)

    def give(self, task: Task | None) -> None:
        with self._cv:
            self._task, self._given = task, True
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                if not self._given:
                    self._cv.wait(self.cache.idle_timeout)
                if not self._given:
                    if self.cache._leave(self):
                        return
                    while not self._given:  # handed a task just as the wait timed out
                        self._cv.wait()
                task, self._task, self._given = self._task, None, False
            if task is None:
                return
            try:
                task.fn()
            finally:
                task._done.set()
            if not self.cache._park(self):
                return


def _nothing() -> None:
    pass


class Deadline:
    """One registered deadline: :meth:`cancel` before it fires, and learn whether it did."""

    __slots__ = ("at", "fn", "_lock", "_fired", "_cancelled")

    def __init__(self, at: float, fn: Callable[[], None]) -> None:
        self.at = at
        self.fn = fn
        self._lock = threading.Lock()
        self._fired = False
        self._cancelled = False

    def fire(self) -> None:
        with self._lock:  # cancel() waits for a call in progress, so it reports it
            if self._cancelled:
                return
            self._fired = True
            self.fn()

    def cancel(self) -> bool:
        """Make sure it will not fire; return whether it already has."""
        with self._lock:
            self._cancelled = True
            self.fn = _nothing  # what it would have called is not kept alive until its time
            return self._fired


class Deadlines:
    """One thread per process that calls each registered function when its time (``time.monotonic()``) comes.

    Step timeouts use it: the handler runs in its run's own thread, and this
    thread only tells it (``step.cancelled``) when its time is up, so a timeout
    costs no thread of its own. The functions must be quick and must not raise.
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, Deadline]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, delay: float, fn: Callable[[], None]) -> Deadline:
        """Call ``fn`` in ``delay`` seconds unless the returned deadline is cancelled first."""
        deadline = Deadline(time.monotonic() + delay, fn)
        with self._cv:
            heapq.heappush(self._heap, (deadline.at, next(self._seq), deadline))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="walstate-deadlines", daemon=True)
                self._thread.start()
            self._cv.notify()
        return deadline

    def _loop(self) -> None:
        while True:
            with self._cv:
                while True:
                    while self._heap and self._heap[0][2]._cancelled:
                        heapq.heappop(self._heap)  # returned in time: nothing to do
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        due = heapq.heappop(self._heap)[2]
                        break
                    self._cv.wait(None if not self._heap else self._heap[0][0] - now)
            due.fire()


#: The process's deadline thread (started at the first deadline).
deadlines = Deadlines()
