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

**The asyncio API.** Every :class:`Engine` operation that touches the
database has an awaitable form named after it with ``_async``:
``submit_async``, ``send_async``, ``status_async``, ``cancel_async``,
``retry_async``, ``jobs_async``, ``history_async``, ``recover_async``,
``migrate_jobs_async``, ``prune_async``, ``handle_async``,
``stop_worker_async``, ``close_async``, ``run_async`` and ``start_async``;
on a :class:`JobHandle`, ``status_async``, ``done_async`` and
``result_async``. Each takes the same arguments, returns the same value and
raises the same errors as its blocking form, which it runs in a worker
thread of the loop's default executor (``asyncio.to_thread``: a bounded
pool, and the caller's ``contextvars`` go with it) while the loop only
awaits its future: another process holding the file's write lock, or a
``busy_timeout`` wait, never stalls the loop. Cancelling the awaiting task
abandons the wait, not the operation: a ``send`` already under way still
completes (or not) as one transaction, and a job awaited is not cancelled.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable, Coroutine
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

from . import checks
from .context import StepContext

if TYPE_CHECKING:
    from pydantic import BaseModel

    from .engine import Engine, JobId, JobStatus, MigrationReport, RecoveryReport, TransitionRecord
    from .runtime import JobHandle
    from .views import JobPage
    from .workflow import Workflow

T = TypeVar("T")
M = TypeVar("M", bound="BaseModel")


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
    def db(self) -> Any:
        """The job database (peewee, for SQL stores), as :attr:`StepContext.db`."""
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
        stored = self._sc._stored(name)  # also checks the claim before fn is called
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
    if timeout is not None:
        timeout = checks.seconds(timeout, "result_async(timeout=)", zero=True)
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        done = await asyncio.to_thread(handle.done)
        if done:
            return await asyncio.to_thread(handle.result, 0)
        if deadline is not None and loop.time() >= deadline:
            raise TimeoutError(f"{handle.engine.path}: job {handle.id} has not ended within {timeout:g}s; it goes on")
        await asyncio.sleep(poll)


class EngineAsyncAPI:
    """The awaitable forms of :class:`Engine`'s operations (``engine.send_async(...)`` and so on).

    Each runs its blocking namesake in a worker thread (``asyncio.to_thread``)
    and awaits it: same arguments, same result, same errors; the event loop
    is never blocked by the database (a lock another process holds, a busy
    wait). :class:`Engine` inherits these; see the module docstring.
    """

    __slots__ = ()

    def _engine(self) -> Engine:
        return cast("Engine", self)

    @overload
    async def submit_async(self, workflow: Workflow[M], context: M | dict[str, Any], *, key: str | None = None,
                           version: int | None = None) -> JobId[M]: ...

    @overload
    async def submit_async(self, workflow: str, context: BaseModel | dict[str, Any], *, key: str | None = None,
                           version: int | None = None) -> JobId[Any]: ...

    async def submit_async(self, workflow: Workflow[Any] | str, context: BaseModel | dict[str, Any], *,
                           key: str | None = None, version: int | None = None) -> JobId[Any]:
        """:meth:`Engine.submit`, awaitable: the commit happens in a worker thread."""
        submit = cast(Any, self._engine().submit)
        job_id: JobId[Any] = await asyncio.to_thread(submit, workflow, context, key=key, version=version)
        return job_id

    async def send_async(self, job_id: int, topic: str, payload: Any, *, key: str | None = None) -> bool:
        """:meth:`Engine.send`, awaitable (same return value: see there what ``True`` means)."""
        return await asyncio.to_thread(self._engine().send, job_id, topic, payload, key=key)

    @overload
    async def status_async(self, job_id: JobId[M]) -> JobStatus[M]: ...

    @overload
    async def status_async(self, job_id: int) -> JobStatus[Any]: ...

    async def status_async(self, job_id: int) -> JobStatus[Any]:
        """:meth:`Engine.status`, awaitable."""
        return await asyncio.to_thread(self._engine().status, job_id)

    async def cancel_async(self, job_id: int, *, wait: float = 30.0) -> list[str]:
        """:meth:`Engine.cancel`, awaitable (its ``wait`` for the run to stop happens off the loop too)."""
        return await asyncio.to_thread(self._engine().cancel, job_id, wait=wait)

    async def retry_async(self, job_id: int, step: str | None = None) -> list[str]:
        """:meth:`Engine.retry`, awaitable."""
        return await asyncio.to_thread(self._engine().retry, job_id, step)

    async def jobs_async(self, state: str | None = None, workflow: str | None = None, limit: int = 50,
                         offset: int = 0) -> JobPage:
        """:meth:`Engine.jobs`, awaitable."""
        return await asyncio.to_thread(self._engine().jobs, state, workflow, limit, offset)

    async def history_async(self, job_id: int, step: str | None = None) -> list[TransitionRecord]:
        """:meth:`Engine.history`, awaitable."""
        return await asyncio.to_thread(self._engine().history, job_id, step)

    async def recover_async(self) -> RecoveryReport:
        """:meth:`Engine.recover`, awaitable (the jobs it resumes run in the worker thread)."""
        return await asyncio.to_thread(self._engine().recover)

    async def migrate_jobs_async(self, workflow: str | None = None) -> MigrationReport:
        """:meth:`Engine.migrate_jobs`, awaitable."""
        return await asyncio.to_thread(self._engine().migrate_jobs, workflow)

    async def prune_async(self, older_than: float | timedelta, states: Sequence[str] = ("succeeded", "cancelled"),
                          **options: Any) -> int:
        """:meth:`Engine.prune`, awaitable (``batch=``, ``dry_run=`` as there)."""
        return await asyncio.to_thread(self._engine().prune, older_than, states, **options)

    async def handle_async(self, job_id: int) -> JobHandle[Any]:
        """:meth:`Engine.handle`, awaitable (it reads the job to check that it exists)."""
        return await asyncio.to_thread(self._engine().handle, job_id)

    async def stop_worker_async(self, *, drain: bool = True, grace: float = 30.0) -> None:
        """:meth:`Engine.stop_worker`, awaitable (the drain is waited for off the loop)."""
        await asyncio.to_thread(self._engine().stop_worker, drain=drain, grace=grace)

    async def close_async(self, grace: float = 30.0) -> None:
        """:meth:`Engine.close`, awaitable (runs in flight are waited for off the loop)."""
        await asyncio.to_thread(self._engine().close, grace)
