"""The plain data of the storage contract: rows, moves, claims, the state vocabulary and defaults.

Everything here is data (frozen or slotted dataclasses, enums, tuples,
constants) with no database behind it: ``statemachine/`` and every backend
(:mod:`.operations` for SQL, :mod:`.memory`) speak these types and nothing
else. Importing this module imports neither peewee nor a database driver.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from .errors import ConfigurationError


class JobState(str, enum.Enum):
    """A job's states (stored as their values)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StepState(str, enum.Enum):
    """A sub-step's states (stored as their values); the machine that moves between them is ``walstate.fsm``."""

    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


#: States after which nothing changes any more (shared by steps and jobs), as stored text.
TERMINAL_STEP_STATES = tuple(s.value for s in (StepState.SUCCEEDED, StepState.FAILED, StepState.SKIPPED,
                                               StepState.CANCELLED))
TERMINAL_JOB_STATES = tuple(s.value for s in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED))
UNFINISHED_JOB_STATES = tuple(s.value for s in (JobState.PENDING, JobState.RUNNING))
#: Finished step states a migration may drop a step in.
FINISHED_FOR_REMOVAL = (StepState.SUCCEEDED.value, StepState.SKIPPED.value)

#: How each commit reaches the disk: ``normal`` (WAL, synced by the background syncer) or ``full`` (every commit).
Durability = Literal["normal", "full"]
#: Permission bits of a database file walstate creates (owner only); ``-wal`` and ``-shm`` get the same.
DEFAULT_FILE_MODE = 0o600
#: Default bound on the loss window of ``durability="normal"`` (seconds).
DEFAULT_SYNC_INTERVAL = 0.1
#: Seconds a write no claim fences keeps trying a busy database (the engine's default ``patience``).
DEFAULT_PATIENCE = 60.0
#: Seconds a transactional step may hold SQLite's only writer before a WARNING says so (``hold_warning``).
DEFAULT_HOLD_WARNING = 1.0
#: Jobs a prune deletes per transaction.
DEFAULT_BATCH = 200

JSONMerge = Callable[[dict[str, Any]], str]


@dataclass(frozen=True, slots=True)
class JobRow:
    """A job as stored: its state, context (JSON text), claim (owner, epoch, lease) and version."""

    id: int
    workflow: str
    key: str | None
    state: str
    context: str
    error: str | None
    owner: str | None
    lease_expires: float | None
    created_at: float
    updated_at: float
    epoch: int = 0
    cancel_requested: bool = False
    #: A parked job (a step waits): not claimed before this time (None: runnable now).
    wake_at: float | None = None
    #: The workflow version the job runs on, and its definition's fingerprint (None: made before schema 5).
    version: int = 1
    fingerprint: str | None = None
    #: When the claim was last taken or renewed, on the lease clock (None: never, or before schema 10).
    renewed_at: float | None = None


@dataclass(frozen=True, slots=True)
class StepRow:
    """A sub-step as stored: its state, attempt count, output or error, and what it waits for."""

    id: int
    job_id: int
    name: str
    phase: str
    position: int
    state: str
    attempt: int
    output: str | None
    error: str | None
    updated_at: float
    failures: int = 0
    interruptions: int = 0
    #: A waiting step's wake-up time (inf: none) and topic.
    wake_at: float | None = None
    wait_topic: str | None = None


@dataclass(frozen=True, slots=True)
class StepCount:
    """``count`` sub-steps of job ``job_id`` in ``phase`` are in ``state``; ``rank`` orders the phases."""

    job_id: int
    phase: str
    state: str
    count: int
    rank: int


@dataclass(frozen=True, slots=True)
class JournalRow:
    """One recorded move: of a sub-step, or (``step`` None) of the job itself; ``at`` is Unix time."""

    id: int
    job_id: int
    step: str | None
    from_state: str
    to_state: str
    attempt: int
    at: float
    note: str | None


@dataclass(slots=True)
class ContextPatch:
    """Fields to merge into a job's context in the same transaction as a change.

    ``merge`` receives the context as stored *now* (inside the transaction, so
    parallel steps never overwrite each other's fields), returns the validated
    JSON text to store, and raises a :class:`WalstateError` to refuse it.
    """

    patch: dict[str, Any]
    merge: JSONMerge


@dataclass(slots=True)
class Change:
    """One state change of a sub-step (``kind="step"``) or of a job (``kind="job"``).

    ``owner`` is the job owner the writer believes it is; a change whose job has
    another owner is refused (fencing). ``output``/``error`` are stored as given
    (JSON text / message), replacing the previous values.
    """

    kind: str
    row_id: int
    job_id: int
    step: str | None
    expected: str
    new: str
    attempt: int = 0
    owner: str | None = None
    #: The claim epoch the writer holds (fencing token): a change is written only
    #: while the job still has this owner *and* this epoch.
    epoch: int = 0
    output: str | None = None
    error: str | None = None
    note: str | None = None
    context: ContextPatch | None = field(default=None)
    #: For a step: failed attempts and interruptions since its last requeue.
    failures: int = 0
    interruptions: int = 0
    #: For a job change: also release the claim (owner and lease cleared, epoch
    #: bumped) in the same commit, so that a superseded writer is fenced off.
    release: bool = False
    #: For a step moving to ``waiting``: what it waits for (a time, inf for none; a topic).
    wake_at: float | None = None
    topic: str | None = None
    #: ``once()`` records ``(step, name, result)`` to (re)store in the same commit:
    #: an outside effect that happened during an attempt whose own transaction
    #: rolled back must stay recorded.
    once: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Claimed:
    """What a successful claim holds: the new epoch, and the job as the claim found it."""

    epoch: int
    context: str
    cancel_requested: bool
    steps: list[StepRow]
    #: The job's id (filled by batch claims; single claims know it already).
    job_id: int = 0
    #: The job's workflow version and definition fingerprint (filled by batch claims).
    version: int = 1
    fingerprint: str | None = None


@dataclass(frozen=True)
class MigratedJob:
    """What a migration did to one job's steps.

    ``added`` became pending; ``dropped`` were deleted (named in ``drop``);
    ``retired`` are finished steps the new version no longer declares: their
    rows (state, output) stay as the record of what ran, ranked after the new
    version's steps, and nothing runs them again.
    """

    added: tuple[str, ...]
    dropped: tuple[str, ...]
    retired: tuple[str, ...]

    def note(self, from_version: int, to_version: int) -> str:
        parts = [f"migrated from version {from_version} to {to_version}"]
        for label, names in (("added", self.added), ("dropped", self.dropped), ("retired", self.retired)):
            if names:
                parts.append(f"{label} {', '.join(names)}")
        return "; ".join(parts)


def check_states(states: Iterable[str]) -> tuple[str, ...]:
    """The states to prune, refusing any that is not terminal."""
    chosen = tuple(dict.fromkeys(states))
    if not chosen:
        raise ConfigurationError("prune needs at least one finished state to prune (succeeded, failed, cancelled)")
    unfinished = [s for s in chosen if s not in TERMINAL_JOB_STATES]
    if unfinished:
        raise ConfigurationError(
            f"prune deletes finished jobs only; {', '.join(map(repr, unfinished))} is not a finished state "
            f"(choose among {', '.join(TERMINAL_JOB_STATES)})"
        )
    return chosen


def cutoff(older_than: float | timedelta, now: float | None = None) -> float:
    """The Unix time before which a job must have finished to be pruned."""
    seconds = older_than.total_seconds() if isinstance(older_than, timedelta) else float(older_than)
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigurationError(f"older_than must be a duration >= 0, not {older_than!r}")
    return (time.time() if now is None else now) - seconds
