"""Sub-steps and jobs as durable machines: every move is committed before it is believed."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from .storage.contract import Storage
from .storage.types import Change, ContextPatch, StepRow

from .fsm import JOB, STEP


class RunAborted(BaseException):
    """Raised at the next write of a run whose process (simulated) has died.

    A ``BaseException`` for the same reason as ``InjectedCrash``: once a run is
    declared dead, no handler may keep it writing.
    """


class LiveJob:
    """A job as this process sees it: id, its state, the owner token it writes under."""

    __slots__ = ("id", "workflow", "state", "owner", "epoch", "write", "aborted", "released")

    def __init__(self, job_id: int, workflow: str, state: str, owner: str | None, write: Storage,
                 epoch: int = 0) -> None:
        self.id = job_id
        self.workflow = workflow
        self.state = state
        self.owner = owner
        #: The claim epoch this run holds: the fencing token of all its writes.
        self.epoch = epoch
        #: The store this run writes to (every move of the job and its sub-steps is one of its commits).
        self.write = write
        self.aborted: threading.Event | None = None
        #: Why this run is giving its claim up on purpose (a shutdown), so that writes refused after it are expected.
        self.released: str | None = None

    def _describe(self) -> str:
        return f"job {self.id} ({self.workflow})"

    def _where(self) -> str:
        return f"{self.write.path}: {self._describe()}"

    def check_alive(self) -> None:
        if self.aborted is not None and self.aborted.is_set():
            raise RunAborted(f"job {self.id}: the run was aborted; no more writes")

    def fire(self, trigger: str, **data: Any) -> bool:
        """Move the job by ``trigger`` (``succeed``, ``fail``, ``cancel``, ``requeue``).

        ``release=True`` also gives up this run's claim in the same commit (the
        run's last write).
        """
        return JOB.fire(self, trigger, data)

    def _persist(self, trigger: str, source: str, dest: str, data: Mapping[str, Any]) -> None:
        self.check_alive()
        release = bool(data.get("release"))
        # ``carry``: a sub-step's change that commits with this one (it comes first; see SubStep.succeed's ``end``).
        self.write.commit(
            [*data.get("carry", ()),
             Change("job", self.id, self.id, None, source, dest, 0, self.owner, self.epoch, error=data.get("error"),
                    note=data.get("note"), release=release)]
        )
        if release:
            self.owner = None
            self.epoch += 1


Effect = Callable[[Change], None]


class SubStep:
    """One sub-step of one job, driven by the shared sub-step machine.

    Triggers: ``start`` (counts an attempt), ``succeed``, ``retry``, ``fail``,
    ``skip``, ``cancel``, ``requeue``. Each returns ``True`` once the move is
    committed, ``False`` if the sub-step already was in the trigger's
    destination (nothing written), and raises ``InvalidTransition`` if the
    move is illegal (nothing written).
    """

    __slots__ = ("job", "id", "name", "phase", "state", "attempt", "failures", "interruptions", "output", "error",
                 "wake_at", "wait_topic")

    def __init__(self, job: LiveJob, row: StepRow) -> None:
        # Restoring from a row sets attributes only: no machine callback runs on load.
        self.job = job
        self.id = row.id
        self.name = row.name
        self.phase = row.phase
        self.state = row.state
        self.attempt = row.attempt
        self.failures = row.failures
        self.interruptions = row.interruptions
        self.output = row.output
        self.error = row.error
        self.wake_at = row.wake_at
        self.wait_topic = row.wait_topic

    def _describe(self) -> str:
        return f"sub-step {self.name!r} of job {self.job.id}"

    def _where(self) -> str:
        return f"{self.job.write.path}: {self._describe()}"

    def fire(self, trigger: str, **data: Any) -> bool:
        return STEP.fire(self, trigger, data)

    def start(self) -> bool:
        return self.fire("start")

    def succeed(self, output: str | None = None, context: ContextPatch | None = None, effect: Effect | None = None,
                then: SubStep | None = None, end: LiveJob | None = None) -> bool:
        """Record success with ``output`` (JSON text) and a context update.

        ``effect(change)`` runs inside the committing transaction and may fill
        ``change.output``/``change.context`` (transactional steps). ``then``, a
        ``pending`` sub-step of the same job, is started in the same commit
        (its ``start`` fired through the machine, journalled after this
        success): one commit per sub-step in a run of steps. ``end``, this
        sub-step's job when this success is its last step's, makes the job
        succeed (releasing its claim) in the same commit, journalled after
        this success. Nothing moves in memory unless that commit succeeds.
        """
        return self.fire("succeed", output=output, error=None, context=context, effect=effect, then=then, end=end)

    def retry(self, error: str, note: str | None = None, *, interrupted: bool = False,
              once: tuple[tuple[str, str, str], ...] = ()) -> bool:
        """Record a failed (or, with ``interrupted``, cut-short) attempt that will be tried again."""
        return self.fire("retry", error=error, note=note or error, interrupted=interrupted, once=once)

    def fail(self, error: str, note: str | None = None, *, interrupted: bool = False,
             once: tuple[tuple[str, str, str], ...] = ()) -> bool:
        return self.fire("fail", error=error, note=note or error, interrupted=interrupted, once=once)

    def skip(self, note: str | None = None) -> bool:
        return self.fire("skip", note=note)

    def cancel(self, note: str | None = None) -> bool:
        return self.fire("cancel", note=note)

    def _persist(self, trigger: str, source: str, dest: str, data: Mapping[str, Any]) -> None:
        job = self.job
        job.check_alive()
        attempt = self.attempt + 1 if dest == "running" else self.attempt
        failures, interruptions = self.failures, self.interruptions
        if dest in ("retrying", "failed") and source == "running":
            if data.get("interrupted"):
                interruptions += 1
            else:
                failures += 1
        output = data["output"] if "output" in data else self.output
        change = Change(
            "step", self.id, job.id, self.name, source, dest, attempt, job.owner, job.epoch,
            output=output, error=data.get("error", self.error), note=data.get("note"), context=data.get("context"),
            failures=failures, interruptions=interruptions, once=data.get("once", ()),
            wake_at=data.get("wake_at") if dest == "waiting" else None,
            topic=data.get("topic") if dest == "waiting" else None,
        )
        effect: Effect | None = data.get("effect")
        then: SubStep | None = data.get("then")
        end: LiveJob | None = data.get("end")
        if effect is None and then is not None and then.fire("start", carry=(change,)):
            pass  # committed together with the start of ``then`` (see succeed)
        elif effect is None and end is not None and end.fire("succeed", release=True, carry=(change,)):
            pass  # committed together with the job's success (see succeed)
        elif effect is None:
            # ``carry``: the change of a sub-step whose move commits with this one (it comes first).
            job.write.commit((*data.get("carry", ()), change))
        else:
            def run_effect() -> tuple[Change]:
                effect(change)
                return (change,)

            job.write.commit(effect=run_effect)
        # Only now, with the change durable, does memory follow.
        self.attempt = attempt
        self.failures = failures
        self.interruptions = interruptions
        self.wake_at, self.wait_topic = change.wake_at, change.topic
        self.output = change.output
        self.error = change.error
