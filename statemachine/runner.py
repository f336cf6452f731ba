"""Running one job: phases in order, each phase's sub-steps in parallel, retries, failure.

The runner never writes SQL itself: every move goes through a sub-step's or
the job's machine, which commits through ``storage``'s write path first.
"""

from __future__ import annotations

import asyncio
import json
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from .storage.contract import Storage
from .storage.types import TERMINAL_STEP_STATES, Change, ContextPatch
from .storage import faults
from .storage.errors import ContextInvalid, LeaseLost, OutputNotJSON

from . import log
from .aio import AsyncAttempt, AsyncStepContext
from .context import StepContext, StepResult, Suspend, check_update_keys, context_merger, to_json
from .substep import LiveJob, SubStep
from .threads import ThreadCache, deadlines
from .workflow import StepDef, Workflow

_TERMINAL = frozenset(TERMINAL_STEP_STATES)
_SATISFIED = frozenset({"succeeded", "skipped"})


class _HandlerRaised(Exception):
    """Carries a handler's exception out through the write path's transaction."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(str(exc))
        self.exc = exc


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class JobRun:
    """One execution (first run or resume) of one job in this process, under one claim.

    The run stops starting steps when it is told to (:meth:`signal`): an
    operator's cancel (the job ends ``cancelled``), the loss of its claim
    (it writes nothing more and :meth:`execute` raises :class:`LeaseLost`),
    or the engine closing (its claim is released for another process).
    Handlers in flight see ``step.cancelled`` for the first two.
    """

    def __init__(self, store: Storage, flow: Workflow[Any], job: LiveJob, steps: dict[str, SubStep],
                 context_text: str, threads: ThreadCache | None, workers: int = 1,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.flow = flow
        self.clock = clock
        # Topics with unconsumed messages, read once per run when a step waits.
        self._topics: set[str] | None = None
        # Why steps were found running (read from the journal once, by the first such step).
        self._why_running: tuple[str, str, bool] | None = None
        self.job = job
        self.steps = steps
        self.threads = threads
        self.workers = workers
        self.failing = threading.Event()
        self.aborted = threading.Event()
        #: Set for any reason to start no new step; wakes a step waiting in backoff.
        self.stop = threading.Event()
        #: Set by a cancel or a lost claim; each attempt's ``step.cancelled`` follows it.
        self.cancelled = threading.Event()
        self._attempts: set[threading.Event] = set()
        self._async_attempts: set[AsyncAttempt] = set()
        self._attempts_lock = threading.Lock()
        self.reasons: set[str] = set()
        job.aborted = self.aborted
        if any(s.state == "failed" for s in steps.values()):
            # Resuming a job whose step had failed for good before the crash:
            # it is still failing; start nothing new.
            self._failing()
        # The context as last committed, with the commit order that produced it.
        self._ctx_lock = threading.Lock()
        self._ctx_text = context_text
        self._ctx_seq = 0
        self._merge_seq = 0
        #: The sequential loop's ready steps, dependents and unmet counts (None outside it): see _chained.
        self._chain: tuple[list[str], dict[str, list[str]], dict[str, int]] | None = None
        self._where = f"job {job.id} ({flow.name})"
        self._merger = context_merger(flow.context, self._where)

    def signal(self, reason: str) -> None:
        """Tell the run to stop: ``"cancel"``, ``"lost"`` (its claim), ``"close"`` (the engine: after the
        steps in flight) or ``"shutdown"`` (the engine's grace is over: its claim is being released)."""
        self.reasons.add(reason)
        if reason in ("cancel", "lost", "shutdown"):
            with self._attempts_lock:
                self.cancelled.set()
                for event in self._attempts:
                    event.set()
                for attempt in self._async_attempts:
                    attempt.cancel()
        self.stop.set()

    def _attempt_event(self) -> threading.Event:
        """The ``step.cancelled`` of one attempt: set by a cancel or a lost claim, or by its own timeout."""
        event = threading.Event()
        with self._attempts_lock:
            if self.cancelled.is_set():
                event.set()
            self._attempts.add(event)
        return event

    def _failing(self) -> None:
        self.failing.set()
        self.stop.set()

    # -- the job ----------------------------------------------------------------

    def execute(self) -> str:
        """Run every unfinished sub-step; return how the run ended.

        ``"finished"``: the job is now succeeded, failed or cancelled (and its
        claim released in the same commit). ``"parked"``: a step waits (see
        :meth:`waits`) and nothing else can run before it. ``"released"``: the engine is
        closing and the job is left unfinished for another run. Raises
        :class:`LeaseLost` when the claim was lost: nothing more was written.
        """
        for step in self.steps.values():
            if step.state == "running":
                self._interrupted(step)
        for phase in self.flow.phases:
            if self.stop.is_set():
                break
            self._run_phase(phase)
            if any(self.steps[d.name].state == "waiting" for d in self.flow.phase_steps(phase)):
                break  # this phase is not over: the job parks until a wait of it is due
        if self.job.state == "succeeded":
            # Its last step's success ended it (see _ending): nothing more to write, whatever
            # was signalled since (its claim is released, so the heartbeat may report it lost).
            return "finished"
        if "lost" in self.reasons:
            raise LeaseLost(f"{self.store.path}: {self._where}: this run lost its claim on the job (another run "
                            "took it over after its lease expired); it stopped and wrote nothing more")
        if "cancel" in self.reasons:
            for step in self.steps.values():
                if step.state not in _TERMINAL:
                    step.cancel(note="the job was cancelled")
            self.job.fire("cancel", note="cancelled by an operator", release=True)
            return "finished"
        if self.failing.is_set():
            for step in self.steps.values():
                if step.state not in _TERMINAL:
                    # One that had tried (it waited to retry) did run: say what it was denied.
                    step.cancel(note="job failed before this sub-step could run" if step.attempt == 0
                                else f"job failed; attempt {step.attempt + 1} of this sub-step was not made")
        elif "close" in self.reasons and any(s.state not in _TERMINAL for s in self.steps.values()):
            return "released"
        elif any(s.state == "waiting" for s in self.steps.values()):
            return "parked"
        unfinished = {n: s for n, s in self.steps.items() if s.state not in _SATISFIED}
        if unfinished:
            # A job succeeds only when every step did (or was skipped): a step an
            # operator cancelled fails the job too.
            # A failed step's own error; a cancelled one is just that (its error field still holds
            # an earlier attempt's error, which did not fail the job).
            why = [f"{n}: {s.error}" if s.state == "failed" and s.error else f"{n}: {s.state}"
                   for n, s in unfinished.items()]
            self.job.fire("fail", error="; ".join(why), release=True)
        else:
            self.job.fire("succeed", release=True)
        return "finished"

    def waits(self) -> tuple[float, list[str]]:
        """When a parked job is due: the earliest wake-up of its waiting steps (inf: none), and their topics."""
        waiting = [s for s in self.steps.values() if s.state == "waiting"]
        wake_at = min((s.wake_at if s.wake_at is not None else math.inf) for s in waiting)
        return wake_at, sorted({s.wait_topic for s in waiting if s.wait_topic is not None})

    def _due(self, step: SubStep) -> bool:
        """Whether a waiting step's time has come or a message for its topic is there."""
        if step.wake_at is not None and step.wake_at <= self.clock():
            return True
        if step.wait_topic is None:
            return False
        if self._topics is None:
            self._topics = self.store.message_topics(self.job.id)
        return step.wait_topic in self._topics

    def context(self) -> BaseModel:
        with self._ctx_lock:
            text = self._ctx_text
        model: BaseModel = self.flow.context.model_validate_json(text)
        return model

    def _left_running(self) -> tuple[str, str, bool]:
        """Why this job's steps were left ``running``, from its journal: (for the step's error, for the log, a crash?).

        This run's claim is the job's last journal row: "claimed from ..." when the previous owner
        was found dead; a plain "claimed" follows a release, whose note says why it was given up.
        """
        notes = [r.note or "" for r in self.store.journal(self.job.id) if r.step is None]
        if not notes or notes[-1].startswith("claimed from"):
            return "was interrupted (the process running it died)", "was interrupted (its process died)", True
        before = notes[-2] if len(notes) > 1 else ""
        if before.startswith("released"):
            what = f"was cut short ({before})"
            return what, what, "shut down" not in before  # a run that stopped on an error is no graceful stop
        what = "was interrupted (its run ended before it finished)"
        return what, what, True

    def _interrupted(self, step: SubStep) -> None:
        """A sub-step left ``running`` by a dead process (or a run released unfinished): journal it and let it retry."""
        retry = self.flow.steps[step.name].retry
        if self._why_running is None:
            self._why_running = self._left_running()
        stored, logged, crash = self._why_running
        message = f"attempt {step.attempt} {stored}"
        giving_up = step.interruptions + 1 > retry.max_interruptions
        log.step_interrupted(self.job.id, self.flow.name, step.name, step.attempt, giving_up, logged, crash)  # log
        if giving_up:
            step.fail(error=f"{message}; interrupted {step.interruptions + 1} times, giving up", note="interrupted",
                      interrupted=True)
            self._failing()
        else:
            step.retry(error=message, note="interrupted", interrupted=True)

    # -- one phase --------------------------------------------------------------

    def _run_phase(self, phase: str) -> None:
        todo = {d.name: d for d in self.flow.phase_steps(phase) if self.steps[d.name].state not in _TERMINAL}
        if not todo:
            return
        # Dependency counting: each completion touches only its dependents, so a
        # long `after` chain costs O(n), not a rescan of every waiting step.
        dependents: dict[str, list[str]] = {}
        unmet: dict[str, int] = {}
        for name, d in todo.items():
            unmet[name] = sum(self.steps[x].state not in _SATISFIED for x in d.after)
            for x in d.after:
                dependents.setdefault(x, []).append(name)
        ready = [n for n in todo if unmet[n] == 0]
        for name, d in todo.items():
            if any(self.steps[x].state in _TERMINAL and self.steps[x].state not in _SATISFIED for x in d.after):
                self._dependency_failed(name, todo, dependents)

        def settle(name: str) -> None:
            if self.steps[name].state == "waiting":
                return  # its dependents stay blocked until it resumes and succeeds
            if self.steps[name].state not in _SATISFIED:
                for dep in dependents.get(name, ()):
                    self._dependency_failed(dep, todo, dependents)
                return
            for dep in dependents.get(name, ()):
                unmet[dep] -= 1
                if unmet[dep] == 0 and self.steps[dep].state not in _TERMINAL:
                    ready.append(dep)

        if self.threads is None or min(len(todo), self.workers + sum(d.is_async for d in todo.values())) < 2:
            # A step's success may start the next ready one in the same commit
            # (see _chained): that one is in flight and runs even if told to stop.
            self._chain = (ready, dependents, unmet)
            try:
                while ready and (not self.stop.is_set() or self.steps[ready[0]].state == "running"):
                    name = ready.pop(0)
                    self._run_step(todo[name])
                    settle(name)
            finally:
                self._chain = None
            return
        self._run_parallel(todo, ready, settle)

    def _run_parallel(self, todo: dict[str, StepDef], ready: list[str], settle: Callable[[str], None]) -> None:
        """Run ``ready`` steps (and those they unlock) on long-lived worker loops.

        Each loop settles what it finished and takes the next ready step itself,
        so a step costs no hand-off to a scheduler thread; the calling thread is
        one of the loops. A crash in any loop stops the others at their next
        write; the first error is re-raised once all loops have stopped.
        """
        lock = threading.Lock()
        work: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        # Async steps each hold a thread only to drive their own event loop:
        # they do not count against `workers`, so all of them run at once.
        loops = min(len(todo), self.workers + sum(d.is_async for d in todo.values()))
        errors: list[BaseException] = []
        in_flight = 0

        def take() -> str | None:
            """Under ``lock``: keep one ready step for this loop, queue the rest; stop all when done."""
            nonlocal in_flight
            if self.stop.is_set() or errors:
                ready.clear()
            mine = ready.pop(0) if ready else None
            for name in ready:
                work.put(name)
            in_flight += len(ready) + (mine is not None)
            ready.clear()
            if in_flight == 0:
                for _ in range(loops):
                    work.put(None)
            return mine

        def loop() -> None:
            nonlocal in_flight
            name = work.get()
            while name is not None:
                try:
                    self._run_step(todo[name])
                    exc = None
                except BaseException as caught:  # re-raised by the calling thread below
                    exc = caught
                with lock:
                    in_flight -= 1
                    if exc is None:
                        try:
                            settle(name)  # may write (cancel dependents); a failure must not strand the loops
                        except BaseException as caught:
                            exc = caught
                    if exc is not None:
                        errors.append(exc)
                        self.aborted.set()
                    name = take()
                if name is None:
                    name = work.get()

        with lock:
            # In declared order: the first ready steps start first.
            for name in ready:
                work.put(name)
            in_flight = len(ready)
            ready.clear()
            if in_flight == 0:
                for _ in range(loops):
                    work.put(None)
        assert self.threads is not None
        helpers = [self.threads.submit(loop) for _ in range(loops - 1)]
        loop()
        for helper in helpers:
            helper.wait()
        if errors:
            raise errors[0]

    def _dependency_failed(self, name: str, todo: dict[str, StepDef], dependents: dict[str, list[str]]) -> None:
        """Cancel ``name`` (a step it runs after did not succeed) and, in turn, its dependents."""
        step = self.steps[name]
        if step.state in _TERMINAL:
            return
        step.cancel(note=f"a step it runs after did not succeed ({', '.join(todo[name].after)})")
        for dep in dependents.get(name, ()):
            self._dependency_failed(dep, todo, dependents)

    # -- one sub-step -----------------------------------------------------------

    def _run_step(self, d: StepDef) -> None:
        step = self.steps[d.name]
        if step.state == "waiting" and not self._due(step):
            return  # still waiting: it holds no thread; the job parks
        # when() decides once, before the first attempt; if it raises, that is
        # a failed attempt and it is asked again before the next one.
        decide = step.state == "pending" and d.when is not None
        # A step started with its predecessor's success is in flight: its attempt runs.
        while step.state == "running" or not self.stop.is_set():
            ctx = self.context()
            if decide and d.when is not None:
                try:
                    run_it = d.when(ctx)
                except Exception as exc:
                    # A bug in user code outside the handler fails the step
                    # under its retry policy, like one inside it.
                    step.start()
                    if self._failed_attempt(d, step, f"its when() condition raised {describe(exc)}", ()):
                        return
                    continue
                if not run_it:
                    step.skip(note="its when() condition was false")
                    return
                decide = False
            step.start()
            # Only a timeout sets one attempt's event alone; without one, what sets it (a cancel,
            # a lost claim, a shutdown) sets the run's: share that, saving an Event per attempt.
            cancelled = self.cancelled if d.timeout is None else self._attempt_event()
            sc = self._step_context(d, step, cancelled)
            box: list[tuple[int, str]] = []
            try:
                if d.transactional:
                    # The handler runs inside the transaction that records its completion.
                    def effect(change: Change) -> None:
                        nonlocal sc, ctx
                        if begun:
                            # The last transaction was rolled back by a transient refusal (the write path
                            # runs it again): its writes are gone. The handler runs again from the start,
                            # with the once() results of the last run stored again in this transaction.
                            last, sc, ctx = sc, self._step_context(d, step, cancelled), self.context()
                            sc.recorded.extend(last.recorded)
                            for name_of_step, name, text in last.recorded:
                                self.store.record_once(self.job.id, name_of_step, name, text,
                                                       owner=self.job.owner, epoch=self.job.epoch)
                            box.clear()
                        begun.append(True)
                        try:
                            change.output, change.context = self._call(d, ctx, sc, box)
                        except _HandlerRaised as raised:
                            refusal = self.store.transient_refusal(raised.exc)
                            if refusal is not None:
                                raise refusal  # the write path's to retry, not the step's error
                            raise

                    begun: list[bool] = []
                    step.succeed(effect=effect)
                else:
                    output, patch = self._call(d, ctx, sc, box)
                    then = self._chained(d.name)
                    step.succeed(output=output, context=patch, then=then,
                                 end=None if then is not None else self._ending(d.name))
                self._adopt(box)
                return
            except _HandlerRaised as raised:
                if self._failed_attempt(d, step, describe(raised.exc), tuple(sc.recorded)):
                    return
            except (ContextInvalid, OutputNotJSON) as exc:
                self._failed_attempt(d, step, describe(exc), tuple(sc.recorded), final=True)
                return
            except Suspend as wait:
                # A durable wait: record it (with the wait's once() records, which a
                # transactional attempt's rollback took back) and free this thread.
                step.fire("wait", wake_at=wait.wake_at, topic=wait.topic, once=tuple(sc.recorded),
                          note=f"waiting for {wait.topic!r}" if wait.topic else "sleeping")
                return
            finally:
                if cancelled is not self.cancelled:
                    with self._attempts_lock:
                        self._attempts.discard(cancelled)

    def _step_context(self, d: StepDef, step: SubStep, cancelled: threading.Event) -> StepContext:
        """What the handler of ``d`` is given for the current attempt of ``step``."""
        return StepContext(self.job.id, d.name, step.attempt, self._idempotency_key(d.name),
                           self.store.handle, self.store, cancelled, clock=self.clock,
                           fence=(self.job.owner, self.job.epoch))

    def _chained(self, name: str) -> SubStep | None:
        """The step the sequential loop runs after ``name``, to start in the same commit as its success; None if none.

        Only a ``pending`` step without a ``when()`` condition qualifies (its
        start is all its attempt writes before the handler), and only while
        the run goes on: crashing after that commit leaves it ``running``,
        exactly as a crash right after its own start commit would.
        """
        if self._chain is None or self.stop.is_set():
            return None
        ready, dependents, unmet = self._chain
        # The next ready step, or else the first step this success unlocks (settle appends them in this order).
        unlocked = (d for d in dependents.get(name, ()) if unmet[d] == 1 and self.steps[d].state not in _TERMINAL)
        after = ready[0] if ready else next(unlocked, None)
        if after is None:
            return None
        step = self.steps[after]
        if step.state != "pending" or self.flow.steps[step.name].when is not None:
            return None
        return step

    def _ending(self, name: str) -> LiveJob | None:
        """The job, when the success of ``name`` ends it: to succeed in the same commit; None otherwise.

        Only while the run goes on (no cancel, failure, lost claim or close)
        and when every other step already succeeded or was skipped: then
        :meth:`execute` would make the job succeed right after, and a crash
        between the two commits would leave the same job to resume (every
        step done, nothing to run) as a crash before the combined one.
        """
        if self.stop.is_set():
            return None
        steps = self.steps
        if any(s.state not in _SATISFIED for n, s in steps.items() if n != name):
            return None
        return self.job

    def _call(self, d: StepDef, ctx: BaseModel, sc: StepContext,
              box: list[tuple[int, str]]) -> tuple[str | None, ContextPatch | None]:
        """Run the handler between its two fault points; return its output and context update."""
        faults.point("handler_before_effect")
        try:
            if d.is_async:
                result = self._call_async(d, ctx, sc)
            else:
                result = d.fn(ctx, sc) if d.timeout is None else self._call_with_timeout(d, ctx, sc)
        except Exception as exc:
            raise _HandlerRaised(exc) from exc
        except asyncio.CancelledError as exc:  # a BaseException: the cancelled async attempt fails as such
            raise _HandlerRaised(RuntimeError(f"the async handler was cancelled ({str(exc) or 'job cancelled'})")) from exc
        faults.point("handler_after_effect")
        # A completion after this run lost its claim is refused by the fenced
        # write itself (LeaseLost), so no check is needed here.
        return self._result(d, result, box)

    def _call_async(self, d: StepDef, ctx: BaseModel, sc: StepContext) -> Any:
        """Run an ``async def`` handler to its end on an event loop of its own, in this thread.

        This thread is the one that holds a transactional step's transaction,
        so the handler's database writes belong to it. A cancel or a lost claim
        (and its ``timeout``) cancel the handler's task.
        """
        attempt = AsyncAttempt()
        with self._attempts_lock:
            self._async_attempts.add(attempt)
            if self.cancelled.is_set():
                attempt.cancel()
        try:
            coro = d.fn(ctx, AsyncStepContext(sc))
            if d.timeout is not None:
                timeout = d.timeout

                async def bounded() -> Any:
                    try:
                        return await asyncio.wait_for(coro, timeout)
                    except asyncio.TimeoutError:
                        sc.cancelled.set()
                        log.step_timed_out(self.job.id, self.flow.name, d.name, sc.attempt, timeout)  # log
                        raise TimeoutError(f"step {d.name!r} attempt {sc.attempt} timed out after {timeout:g}s") from None

                return attempt.run(bounded())
            return attempt.run(coro)
        finally:
            with self._attempts_lock:
                self._async_attempts.discard(attempt)

    def _call_with_timeout(self, d: StepDef, ctx: BaseModel, sc: StepContext) -> Any:
        """Run the handler in this thread; past ``d.timeout`` seconds, tell it, and fail the attempt once it returns.

        The rule: one execution of a step at a time. When the time is up, the
        attempt is marked timed out (logged) and the handler is told through
        ``step.cancelled``; the run then waits for the handler to return, and
        only then records the attempt as failed (``TimeoutError``, whatever the
        handler returned or raised) and retries or fails the step. So the next
        attempt never starts beside the last one, ``run()`` returns only once no
        handler of the job executes, and a timeout costs no thread: the
        process's one deadline thread does the telling.
        """
        assert d.timeout is not None
        timeout = d.timeout

        def expire() -> None:
            sc.cancelled.set()
            log.step_timed_out(self.job.id, self.flow.name, d.name, sc.attempt, timeout)  # log

        timer = deadlines.add(timeout, expire)
        try:
            result = d.fn(ctx, sc)
        except Exception as exc:
            if timer.cancel():  # what it raised once told to stop is not the attempt's error: its timeout is
                raise self._timed_out(d, sc, timeout) from exc
            raise
        finally:
            fired = timer.cancel()
        if fired:
            raise self._timed_out(d, sc, timeout)  # what it returned late is not recorded
        return result

    @staticmethod
    def _timed_out(d: StepDef, sc: StepContext, timeout: float) -> TimeoutError:
        return TimeoutError(f"step {d.name!r} attempt {sc.attempt} timed out after {timeout:g}s")

    def _failed_attempt(self, d: StepDef, step: SubStep, error: str, once: tuple[tuple[str, str, str], ...],
                        *, final: bool = False) -> bool:
        """Record a failed attempt (with the once() records it made); True when the step failed for good."""
        if final or step.failures + 1 >= d.retry.max_attempts:
            step.fail(error=error, once=once)
            log.step_failed(self.job.id, self.flow.name, d.name, step.attempt, error)  # log
            self._failing()
            return True
        step.retry(error=error, once=once)
        delay = d.retry.delay(step.failures)
        log.step_retrying(self.job.id, self.flow.name, d.name, step.attempt, error, delay)  # log
        # A sibling failing for good, a cancel or a lost claim end the wait early.
        self.stop.wait(delay)
        return False

    def _result(self, d: StepDef, result: Any, box: list[tuple[int, str]]) -> tuple[str | None, ContextPatch | None]:
        where = f"step {d.name!r} of job {self.job.id}"
        update: dict[str, Any] | None
        if isinstance(result, self.flow.context):
            # Most likely meant as the new context, which would be dropped silently (only a dict
            # or StepResult.context updates it): a whole model would also overwrite the fields
            # parallel steps changed meanwhile. So it is an error that says what to return.
            raise ContextInvalid(
                f"{where} returned a {type(result).__name__} (the workflow's context model); a handler updates the "
                "context by returning a dict of the fields to change, or StepResult(output=..., context={...})")
        if isinstance(result, StepResult):
            output, update = result.output, result.context
        elif isinstance(result, dict):
            output, update = result, result
        else:
            output, update = result, None
        text = None if output is None else to_json(output, f"the output of {where}")
        if not update:
            return text, None
        check_update_keys(self.flow.context, update, where)
        # Validate against the context as this run knows it *before* the
        # commit: a bad update fails this step here, outside the shared
        # transaction (the merge inside it validates again against the stored one).
        with self._ctx_lock:
            current = json.loads(self._ctx_text)
        self._merger({**current, **update})
        return text, ContextPatch(dict(update), self._capture(box))

    def _capture(self, box: list[tuple[int, str]]) -> Any:
        """A merge that validates and notes (commit order, text) in ``box`` for :meth:`_adopt`."""
        def merge(merged: dict[str, Any]) -> str:
            text = self._merger(merged)
            with self._ctx_lock:
                # Called inside the transaction under the write lock, so merge order is commit order.
                self._merge_seq += 1
                box.append((self._merge_seq, text))
            return text
        return merge

    def _adopt(self, box: list[tuple[int, str]]) -> None:
        """After our commit, memory takes the context it stored, unless a later commit's is there."""
        if box:
            seq, text = box[-1]
            with self._ctx_lock:
                if seq > self._ctx_seq:
                    self._ctx_seq, self._ctx_text = seq, text

    def _idempotency_key(self, step: str) -> str:
        return f"{self.store.database_id}:{self.job.id}:{step}"

