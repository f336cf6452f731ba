"""Async handlers, and the asyncio face of the engine.

**Async handlers.** A step declared with ``async def handler(ctx, step)``
gets an :class:`AsyncStepContext`: ``await step.once(name, fn)`` (``fn`` may
be sync or async), ``await step.sleep(seconds)``, ``await
step.sleep_until(ts)`` and ``await step.wait_for(topic, timeout=None)``, with
exactly the semantics of the sync ones (durable records, suspension,
``WaitTimeout``); ``step.execute`` and ``step.db`` as for sync handlers.
Each attempt runs on an event loop of its own, in the thread the runner
gives the step: whatever the handler does on the database happens off the
application's loop, and a transactional async step runs inside the
transaction that records its completion, on that same thread. Parallel async
steps of a phase all run at once (each on its own thread and loop, not
limited by ``workers``), so a hundred steps that each ``await
asyncio.sleep(0.05)`` take about 0.05 s together. Sync and async steps mix
freely in one workflow.

Cancelling the job (``engine.cancel``), a lost claim or a step ``timeout``
cancels the handler's task: it sees ``asyncio.CancelledError`` at its next
``await``, and the attempt is recorded as cancelled.

**The asyncio API.** :func:`run_async`, :func:`start_async` and
:func:`result_async` (also as ``engine.run_async``, ``engine.start_async``
and ``handle.result_async``) never block the calling loop: every SQLite
operation runs in a worker thread (``asyncio.to_thread``) and the loop
awaits its future. Cancelling the asyncio task that awaits a job does not
cancel the job.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from . import checks
from .context import StepContext

if TYPE_CHECKING:
    import peewee

    from .engine import Engine, JobStatus
    from .runtime import JobHandle

T = TypeVar("T")


class AsyncStepContext:
    """What an ``async def`` handler receives: :class:`StepContext` with awaitable waits and ``once``."""

    __slots__ = ("_sc",)

    def __init__(self, sc: StepContext) -> None:
        self._sc = sc

    @property
    def job_id(self) -> int:
        return self._sc.job_id

    @property
    def step(self) -> str:
        return self._sc.step

    @property
    def attempt(self) -> int:
        return self._sc.attempt

    @property
    def idempotency_key(self) -> str:
        return self._sc.idempotency_key

    @property
    def db(self) -> peewee.Database:
        return self._sc.db

    @property
    def cancelled(self) -> threading.Event:
        return self._sc.cancelled

    def execute(self, sql: str, params: Any = ()) -> Any:
        """As :meth:`StepContext.execute` (in a transactional step, part of its completion's transaction)."""
        return self._sc.execute(sql, params)

    async def once(self, name: str, fn: Callable[[], T] | Callable[[], Awaitable[T]]) -> T:
        """As :meth:`StepContext.once`; ``fn`` may be a coroutine function."""
        holder: list[Any] = []

        async def produce() -> None:
            value = fn()
            holder.append(await value if inspect.isawaitable(value) else value)

        checks.text(name, f"step {self._sc.step!r} of job {self._sc.job_id}: once()'s name")
        stored = self._sc._reader.once(self._sc.job_id, self._sc.step, name)
        if stored is None:
            await produce()
        result: T = self._sc.once(name, lambda: holder[0])
        return result

    async def sleep(self, seconds: float) -> float:
        """As :meth:`StepContext.sleep`: durable; suspends the step until the time has come."""
        return self._sc.sleep(seconds)

    async def sleep_until(self, timestamp: float) -> float:
        return self._sc.sleep_until(timestamp)

    async def wait_for(self, topic: str, timeout: float | None = None) -> Any:
        """As :meth:`StepContext.wait_for`."""
        return self._sc.wait_for(topic, timeout)


class AsyncAttempt:
    """One attempt of an async handler, on a private event loop in the calling thread; cancellable from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.task: asyncio.Task[Any] | None = None
        self._lock = threading.Lock()
        self._cancel = False

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            with self._lock:
                self.task = self.loop.create_task(coro)
                if self._cancel:
                    self.task.cancel()
            result: T = self.loop.run_until_complete(self.task)
            return result
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def cancel(self) -> None:
        """Cancel the handler's task (from any thread): ``CancelledError`` at its next ``await``."""
        with self._lock:
            self._cancel = True
            task = self.task
        if task is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop closed meanwhile: the attempt is over
                pass


# -- the asyncio API -------------------------------------------------------------


async def run_async(engine: Engine, job_id: int) -> JobStatus[Any]:
    """``await``-able :meth:`Engine.run`: the run happens in a thread; the loop only awaits it."""
    return await asyncio.to_thread(engine.run, job_id)


async def start_async(engine: Engine, workflow: Any, context: Any, *, key: str | None = None) -> JobHandle[Any]:
    """``await``-able :meth:`Engine.start` (the submit's commit happens in a thread)."""
    return await asyncio.to_thread(engine.start, workflow, context, key=key)


async def result_async(handle: JobHandle[Any], timeout: float | None = None, *, poll: float = 0.02) -> JobStatus[Any]:
    """Wait for the job to end without blocking the loop; as :meth:`JobHandle.result` (same errors).

    Cancelling the awaiting task does not cancel the job.
    """
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        done = await asyncio.to_thread(handle.done)
        if done:
            return await asyncio.to_thread(handle.result, 0)
        if deadline is not None and loop.time() >= deadline:
            raise TimeoutError(f"{handle.engine.path}: job {handle.id} has not ended within {timeout:g}s; it goes on")
        await asyncio.sleep(poll)
