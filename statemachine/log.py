"""walstate's logging: the ``walstate`` logger and its children, and one helper per event.

Library convention: walstate only creates records. A ``NullHandler`` sits on
the ``walstate`` logger, so nothing is printed unless the application
configures logging (``logging.basicConfig(level=logging.INFO)`` shows the job
lifecycle).

Loggers and levels:

* ``walstate.engine``: INFO for the job lifecycle (claimed, started, resumed,
  migrated onto a newer workflow version, finished, failed); WARNING for
  takeovers (a dead owner's job claimed) and refusals (a live owner's job left
  alone; a job whose workflow version is not registered here, "waiting for
  code version N", or whose definition or context changed, left for another
  process; a refused migration); a job released at shutdown with steps still
  in flight (WARNING) or when its engine closed (INFO).
* ``walstate.runner``: WARNING for step retries, attempts interrupted by a
  crash (or cut short by a run that stopped on an error) and a step that failed
  for good; INFO for an attempt cut short by a shutdown (its grace ran out),
  retried by the next run.
* ``walstate.fsm``: DEBUG for every committed transition; WARNING for a write
  the database refused (stale state, lost lease, busy, full): memory kept its
  state; INFO for a late result of a run its shutdown released (the claim is
  gone, as meant).
* ``walstate.storage`` (written by ``storage/``, which cannot import this
  module): WARNING for a write refused for a transient reason and tried again
  (when it starts waiting, when it lands or gives up), and for a
  transactional step that held SQLite's only writer past ``hold_warning``.

Every record carries the same ``extra`` fields, ``None`` where they do not
apply, so structured handlers can rely on them: ``walstate_job`` (job id),
``walstate_workflow`` (its name), ``walstate_step`` (sub-step name) and
``walstate_attempt`` (the sub-step's attempt number).
"""

from __future__ import annotations

import logging
from typing import Any

LOGGER = logging.getLogger("walstate")
LOGGER.addHandler(logging.NullHandler())
ENGINE = logging.getLogger("walstate.engine")
RUNNER = logging.getLogger("walstate.runner")
FSM = logging.getLogger("walstate.fsm")
RUNTIME = logging.getLogger("walstate.runtime")

#: The names of the ``extra`` fields every walstate record carries.
FIELDS = ("walstate_job", "walstate_workflow", "walstate_step", "walstate_attempt")


def quiet_transitions() -> None:
    """Keep ``transitions``' INFO lines (dozens per job) out of the application's logs.

    walstate drives its machines through ``transitions``, which logs every
    event it processes at INFO on ``transitions.core``; walstate's own
    records already say what happened, in the application's terms. Only a
    level nobody chose (NOTSET) is raised: an application that set the
    ``transitions`` logger's level itself, before or after importing
    walstate, keeps its choice.
    """
    logger = logging.getLogger("transitions")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


quiet_transitions()


def fields(job: int | None, workflow: str | None, step: str | None = None, attempt: int | None = None) -> dict[str, Any]:
    return {"walstate_job": job, "walstate_workflow": workflow, "walstate_step": step, "walstate_attempt": attempt}


def _of(obj: Any) -> dict[str, Any]:
    """The fields of a machine-driven object: a sub-step (it has a ``job``) or a job handle."""
    job = getattr(obj, "job", None)
    if job is not None:
        return fields(job.id, job.workflow, obj.name, obj.attempt)
    return fields(obj.id, obj.workflow)


# -- the job lifecycle (walstate.engine) ------------------------------------------


def job_claimed(job: int, workflow: str, previous_owner: str | None) -> None:
    if previous_owner is None:
        ENGINE.info("job %s (%s) claimed", job, workflow, extra=fields(job, workflow))
    else:
        ENGINE.warning("job %s (%s) taken over from %s, which is no longer running it", job, workflow,
                       previous_owner, extra=fields(job, workflow))


def job_started(job: int, workflow: str) -> None:
    ENGINE.info("job %s (%s) started", job, workflow, extra=fields(job, workflow))


def job_resumed(job: int, workflow: str, done: int, total: int) -> None:
    ENGINE.info("job %s (%s) resumed with %d of %d sub-steps already finished", job, workflow, done, total,
                extra=fields(job, workflow))


def job_ended(job: int, workflow: str, state: str, error: str | None) -> None:
    if state == "succeeded":
        ENGINE.info("job %s (%s) finished", job, workflow, extra=fields(job, workflow))
    else:
        ENGINE.info("job %s (%s) %s: %s", job, workflow, state, error, extra=fields(job, workflow))


def job_parked(job: int, workflow: str, wake_at: float, topics: list[str]) -> None:
    """A job whose steps wait was released until its wake-up time or a message on one of ``topics``."""
    ENGINE.info("job %s (%s) parked until %s%s", job, workflow, wake_at,
                f" or a message on {', '.join(topics)}" if topics else "", extra=fields(job, workflow))


def job_left_alone(job: int, workflow: str, why: str) -> None:
    """Recovery or run() decided not to take a job (its owner lives, or its workflow is not registered)."""
    ENGINE.warning("job %s (%s) left alone: %s", job, workflow, why, extra=fields(job, workflow))


def job_released(job: int, workflow: str, why: str, *, cut_short: bool) -> None:
    """A run gave its job back unfinished (shutdown, close): WARNING when steps in flight were cut short."""
    ENGINE.log(logging.WARNING if cut_short else logging.INFO, "job %s (%s) released: %s", job, workflow, why,
               extra=fields(job, workflow))


def job_migrated(job: int, workflow: str, note: str) -> None:
    """A declared migration moved an in-flight job onto a newer version of its workflow."""
    ENGINE.info("job %s (%s) %s", job, workflow, note, extra=fields(job, workflow))


# -- the runtime (walstate.runtime) ----------------------------------------------------


def worker_started(concurrency: int) -> None:
    RUNTIME.info("worker started (concurrency %d)", concurrency, extra=fields(None, None))


def worker_stopped() -> None:
    RUNTIME.info("worker stopped", extra=fields(None, None))


def worker_error(exc: BaseException) -> None:
    """The worker loop met an error (a busy or failing file); it keeps running and tries again."""
    RUNTIME.warning("worker: %s: %s; trying again", type(exc).__name__, exc, extra=fields(None, None))


def job_unrunnable(job: int, workflow: str, why: str) -> None:
    RUNTIME.warning("job %s (%s) cannot run on this engine and was released: %s", job, workflow, why,
                    extra=fields(job, workflow))


def step_timed_out(job: int, workflow: str, step: str, attempt: int, timeout: float) -> None:
    RUNNER.warning("job %s (%s) step %s attempt %d timed out after %gs; its handler was told through "
                   "step.cancelled, and the step goes on (retry or failure) once it returns", job, workflow, step,
                   attempt, timeout, extra=fields(job, workflow, step, attempt))


# -- sub-steps (walstate.runner) ----------------------------------------------------


def step_retrying(job: int, workflow: str, step: str, attempt: int, error: str, delay: float) -> None:
    RUNNER.warning("job %s (%s) step %s attempt %d failed, retrying in %.2fs: %s", job, workflow, step, attempt,
                   delay, error, extra=fields(job, workflow, step, attempt))


def step_failed(job: int, workflow: str, step: str, attempt: int, error: str) -> None:
    RUNNER.warning("job %s (%s) step %s failed for good at attempt %d: %s", job, workflow, step, attempt, error,
                   extra=fields(job, workflow, step, attempt))


def step_interrupted(job: int, workflow: str, step: str, attempt: int, giving_up: bool,
                     what: str = "was interrupted (its process died)", crash: bool = True) -> None:
    """A step found ``running`` by the next run: ``what`` happened to its attempt; INFO unless a crash or an error."""
    RUNNER.log(logging.WARNING if crash or giving_up else logging.INFO, "job %s (%s) step %s attempt %d %s%s", job,
               workflow, step, attempt, what, "; interrupted too often, failing it" if giving_up else "; retrying it",
               extra=fields(job, workflow, step, attempt))


# -- transitions (walstate.fsm) -----------------------------------------------------


def transitions_logged() -> bool:
    """Whether :func:`transition` records anything (``walstate.fsm`` at DEBUG)."""
    return FSM.isEnabledFor(logging.DEBUG)


def transition(obj: Any, trigger: str, source: str, dest: str) -> None:
    if FSM.isEnabledFor(logging.DEBUG):  # the hot path: build nothing when DEBUG is off
        FSM.debug("%s: %s -> %s (%s)", obj._describe(), source, dest, trigger, extra=_of(obj))


def write_refused(obj: Any, trigger: str, source: str, exc: BaseException) -> None:
    job = getattr(obj, "job", None) or obj
    released = getattr(job, "released", None)
    if released is not None and type(exc).__name__ == "LeaseLost":
        # The claim was given up on purpose (shutdown's grace ran out): refusing the late result is the plan.
        FSM.info("%s: its late %r from %r was not recorded: the job was %s; the next run retries it",
                 obj._describe(), trigger, source, released, extra=_of(obj))
        return
    FSM.warning("%s: %r from %r was not written (%s: %s); its state in memory is unchanged", obj._describe(),
                trigger, source, type(exc).__name__, exc, extra=_of(obj))
