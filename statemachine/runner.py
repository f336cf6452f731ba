"""Running one job: phases in order, each phase's sub-steps in parallel, retries, failure.

The runner never writes SQL itself: every move goes through a sub-step's or
the job's machine, which commits through ``storage``'s write path first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from pydantic import BaseModel

from storage import ContextPatch, Store, TERMINAL_STEP_STATES
from storage import faults
from storage.errors import ContextInvalid, OutputNotJSON, WalstateError
from storage.writepath import Change

from .context import StepContext, StepResult, check_update_keys, context_merger, to_json
from .substep import JobHandle, SubStep
from .workflow import StepDef, Workflow

_TERMINAL = frozenset(TERMINAL_STEP_STATES)
_SATISFIED = frozenset({"succeeded", "skipped"})


class _HandlerRaised(Exception):
    """Carries a handler's exception out through the write path's transaction."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(str(exc))
        self.exc = exc


class _Final(Exception):
    """A failure no retry can fix (bad output or context): fail the step now."""


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class JobRun:
    """One execution (first run or resume) of one job in this process."""

    def __init__(self, store: Store, flow: Workflow[Any], job: JobHandle, steps: dict[str, SubStep],
                 interruptions: dict[str, int], context_text: str, pool: ThreadPoolExecutor | None,
                 renew: Callable[[], object] = lambda: None) -> None:
        self.store = store
        self.flow = flow
        self.job = job
        self.steps = steps
        self.interruptions = interruptions
        self.pool = pool
        self.renew = renew
        self.failing = threading.Event()
        self.aborted = threading.Event()
        job.aborted = self.aborted
        if any(s.state == "failed" for s in steps.values()):
            # Resuming a job whose step had failed for good before the crash:
            # it is still failing; start nothing new.
            self.failing.set()
        # The context as last committed, with the commit order that produced it.
        self._ctx_lock = threading.Lock()
        self._ctx_text = context_text
        self._ctx_seq = 0
        self._merge_seq = 0
        self._merger = context_merger(flow.context, f"job {job.id} ({flow.name})")

    # -- the job ----------------------------------------------------------------

    def execute(self) -> None:
        """Run every unfinished sub-step; leave the job succeeded or failed."""
        for step in self.steps.values():
            if step.state == "running":
                self._interrupted(step)
        for phase in self.flow.phases:
            self._run_phase(phase)
            if self.failing.is_set():
                break
        if self.failing.is_set():
            for step in self.steps.values():
                if step.state not in _TERMINAL:
                    step.cancel(note="job failed before this sub-step could run")
        unfinished = {n: s for n, s in self.steps.items() if s.state not in _SATISFIED}
        if unfinished:
            # A job succeeds only when every step did (or was skipped): a step an
            # operator cancelled fails the job too.
            self.job.fire("fail", error="; ".join(f"{n}: {s.error or s.state}" for n, s in unfinished.items()))
        else:
            self.job.fire("succeed")

    def context(self) -> BaseModel:
        with self._ctx_lock:
            text = self._ctx_text
        return self.flow.context.model_validate_json(text)

    def _interrupted(self, step: SubStep) -> None:
        """A sub-step left ``running`` by a dead process: journal it and let it retry."""
        self.interruptions[step.name] = self.interruptions.get(step.name, 0) + 1
        retry = self.flow.steps[step.name].retry
        message = f"attempt {step.attempt} was interrupted (the process running it died)"
        if self.interruptions[step.name] > retry.max_interruptions:
            step.fail(error=f"{message}; interrupted {self.interruptions[step.name]} times, giving up", note="interrupted")
        else:
            step.retry(error=message, note="interrupted")

    # -- one phase --------------------------------------------------------------

    def _run_phase(self, phase: str) -> None:
        waiting = [d for d in self.flow.phase_steps(phase) if self.steps[d.name].state not in _TERMINAL]
        running: dict[Future[None], str] = {}
        while True:
            ready: list[StepDef] = []
            for d in list(waiting):
                deps = [self.steps[x].state for x in d.after]
                if any(s in _TERMINAL and s not in _SATISFIED for s in deps):
                    self.steps[d.name].cancel(note=f"a step it runs after did not succeed ({', '.join(d.after)})")
                    waiting.remove(d)
                elif all(s in _SATISFIED for s in deps) and not self.failing.is_set():
                    ready.append(d)
                    waiting.remove(d)
            if self.pool is None or (len(ready) == 1 and not running):
                # Nothing to overlap with: run inline and spare a thread hand-off.
                for d in ready:
                    self._run_step(d)
                if not ready and not running:
                    return
                continue
            for d in ready:
                running[self.pool.submit(self._run_step, d)] = d.name
            if not running:
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                del running[fut]
                exc = fut.exception()
                if exc is not None:
                    # A crash (or a storage error) ends this run: stop the other
                    # workers at their next write, wait for them, then re-raise.
                    self.aborted.set()
                    wait(running)
                    raise exc

    # -- one sub-step -----------------------------------------------------------

    def _run_step(self, d: StepDef) -> None:
        step = self.steps[d.name]
        while not self.failing.is_set():
            ctx = self.context()
            if step.state == "pending" and d.when is not None and not d.when(ctx):
                step.skip(note="its when() condition was false")
                return
            self.renew()
            step.start()
            sc = StepContext(self.job.id, d.name, step.attempt, self._idempotency_key(d.name), self.store.db,
                             self.store.read, self.store.write)
            box: list[tuple[int, str]] = []
            try:
                if d.transactional:
                    step.succeed(effect=lambda change: self._transactional(d, ctx, sc, change, box))
                else:
                    faults.point("handler_before_effect")
                    try:
                        result = d.fn(ctx, sc)
                    except Exception as exc:
                        raise _HandlerRaised(exc) from exc
                    faults.point("handler_after_effect")
                    output, patch = self._result(d, result, box)
                    step.succeed(output=output, context=patch)
                self._adopt(box)
                return
            except _HandlerRaised as raised:
                if self._failed_attempt(d, step, describe(raised.exc), final=False):
                    return
            except (ContextInvalid, OutputNotJSON) as exc:
                self._failed_attempt(d, step, describe(exc), final=True)
                return

    def _transactional(self, d: StepDef, ctx: BaseModel, sc: StepContext, change: Change,
                       box: list[tuple[int, str]]) -> None:
        faults.point("handler_before_effect")
        try:
            result = d.fn(ctx, sc)
        except Exception as exc:
            raise _HandlerRaised(exc) from exc
        faults.point("handler_after_effect")
        change.output, change.context = self._result(d, result, box)

    def _failed_attempt(self, d: StepDef, step: SubStep, error: str, *, final: bool) -> bool:
        """Record a failed attempt; return True when the step failed for good."""
        failures = step.attempt - self.interruptions.get(d.name, 0)
        if final or failures >= d.retry.max_attempts:
            step.fail(error=error)
            self.failing.set()
            return True
        step.retry(error=error)
        self.aborted.wait(d.retry.delay(failures))
        return False

    def _result(self, d: StepDef, result: Any, box: list[tuple[int, str]]) -> tuple[str | None, ContextPatch | None]:
        where = f"step {d.name!r} of job {self.job.id}"
        update: dict[str, Any] | None
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


__all__ = ["JobRun", "WalstateError"]
