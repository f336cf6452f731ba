"""Sub-steps and jobs as durable machines: every move is committed before it is believed."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from .storage import Change, ContextPatch, StepRow, WritePath

from .fsm import JOB, STEP


class RunAborted(BaseException):
    """Raised at the next write of a run whose process (simulated) has died.

    A ``BaseException`` for the same reason as ``InjectedCrash``: once a run is
    declared dead, no handler may keep it writing.
    """


class JobHandle:
    """A job as this process sees it: id, its state, the owner token it writes under."""

    __slots__ = ("id", "workflow", "state", "owner", "write", "aborted")

    def __init__(self, job_id: int, workflow: str, state: str, owner: str | None, write: WritePath) -> None:
        self.id = job_id
        self.workflow = workflow
        self.state = state
        self.owner = owner
        self.write = write
        self.aborted: threading.Event | None = None

    def _describe(self) -> str:
        return f"job {self.id} ({self.workflow})"

    def check_alive(self) -> None:
        if self.aborted is not None and self.aborted.is_set():
            raise RunAborted(f"job {self.id}: the run was aborted; no more writes")

    def fire(self, trigger: str, **data: Any) -> bool:
        """Move the job by ``trigger`` (``start``, ``succeed``, ``fail``, ``cancel``, ``requeue``)."""
        return JOB.fire(self, trigger, data)

    def _persist(self, trigger: str, source: str, dest: str, data: Mapping[str, Any]) -> None:
        self.check_alive()
        claim = data.get("claim")
        self.write.commit(
            [Change("job", self.id, self.id, None, source, dest, 0, self.owner, error=data.get("error"),
                    note=data.get("note"), claim=claim)]
        )
        if claim is not None:
            self.owner = claim[0]


Effect = Callable[[Change], None]


class SubStep:
    """One sub-step of one job, driven by the shared sub-step machine.

    Triggers: ``start`` (counts an attempt), ``succeed``, ``retry``, ``fail``,
    ``skip``, ``cancel``, ``requeue``. Each returns ``True`` once the move is
    committed, ``False`` if the sub-step already was in the trigger's
    destination (nothing written), and raises ``InvalidTransition`` if the
    move is illegal (nothing written).
    """

    __slots__ = ("job", "id", "name", "phase", "state", "attempt", "output", "error")

    def __init__(self, job: JobHandle, row: StepRow) -> None:
        # Restoring from a row sets attributes only: no machine callback runs on load.
        self.job = job
        self.id = row.id
        self.name = row.name
        self.phase = row.phase
        self.state = row.state
        self.attempt = row.attempt
        self.output = row.output
        self.error = row.error

    def _describe(self) -> str:
        return f"sub-step {self.name!r} of job {self.job.id}"

    def fire(self, trigger: str, **data: Any) -> bool:
        return STEP.fire(self, trigger, data)

    def start(self) -> bool:
        return self.fire("start")

    def succeed(self, output: str | None = None, context: ContextPatch | None = None, effect: Effect | None = None) -> bool:
        """Record success with ``output`` (JSON text) and a context update.

        ``effect(change)`` runs inside the committing transaction and may fill
        ``change.output``/``change.context`` (transactional steps).
        """
        return self.fire("succeed", output=output, error=None, context=context, effect=effect)

    def retry(self, error: str, note: str | None = None) -> bool:
        return self.fire("retry", error=error, note=note or error)

    def fail(self, error: str, note: str | None = None) -> bool:
        return self.fire("fail", error=error, note=note or error)

    def skip(self, note: str | None = None) -> bool:
        return self.fire("skip", note=note)

    def cancel(self, note: str | None = None) -> bool:
        return self.fire("cancel", note=note)

    def _persist(self, trigger: str, source: str, dest: str, data: Mapping[str, Any]) -> None:
        job = self.job
        job.check_alive()
        attempt = self.attempt + 1 if dest == "running" else self.attempt
        output = data["output"] if "output" in data else self.output
        change = Change(
            "step", self.id, job.id, self.name, source, dest, attempt, job.owner,
            output=output, error=data.get("error", self.error), note=data.get("note"), context=data.get("context"),
        )
        effect: Effect | None = data.get("effect")
        if effect is None:
            job.write.commit((change,))
        else:
            def run_effect() -> tuple[Change]:
                effect(change)
                return (change,)

            job.write.commit(effect=run_effect)
        # Only now, with the change durable, does memory follow.
        self.attempt = attempt
        self.output = change.output
        self.error = change.error
