"""The one exception hierarchy of walstate.

Every error the library raises on purpose derives from :class:`WalstateError`,
so ``except WalstateError`` catches them all. Messages name the file, job,
sub-step, state and trigger involved and say what to do next.

:class:`InjectedCrash` is deliberately *not* part of the hierarchy: it derives
from ``BaseException`` so that a handler's ``except Exception`` cannot swallow
a simulated crash (the same reason ``KeyboardInterrupt`` does).

The module lives in ``storage/`` because storage raises most of these and must
not import ``statemachine/``; ``walstate`` (from ``statemachine/``) re-exports every name.
"""

from __future__ import annotations


class WalstateError(Exception):
    """Base class of every error walstate raises."""


class ConfigurationError(WalstateError):
    """The library was configured with a value it cannot honour."""


class DatabaseError(WalstateError):
    """A problem with the SQLite file itself; ``path`` names the file."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class DatabaseUnavailable(DatabaseError):
    """The file cannot be opened or created (missing directory, permissions)."""


class NotADatabase(DatabaseError):
    """The file is not SQLite, is corrupt, or is not a walstate database."""


class SchemaTooNew(DatabaseError):
    """The file was written by a newer walstate whose schema this one cannot read."""


class SchemaTooOld(DatabaseError):
    """A read-only open found a file written by an older walstate; open it read-write once to upgrade it."""


class MigrationFailed(DatabaseError):
    """Upgrading the file's schema failed; the upgrade was rolled back and the file is unchanged."""


class DatabaseBusy(DatabaseError):
    """Another connection held the write lock for longer than the busy timeout."""


class DatabaseFull(DatabaseError):
    """The disk (or the database's size limit) is full; nothing was written."""


class WriteFailed(DatabaseError):
    """A write failed for another SQLite reason; the transaction was rolled back."""


class StaleState(WalstateError):
    """A compare-and-set found another state than expected: someone else wrote first.

    Nothing of the batch was written. Reload the sub-step (or job) and decide again.
    """

    def __init__(self, message: str, *, kind: str, row_id: int, expected: str, actual: str | None) -> None:
        super().__init__(message)
        self.kind = kind
        self.row_id = row_id
        self.expected = expected
        self.actual = actual


class InvalidTransition(WalstateError):
    """A trigger that the machine does not allow from the current state. Nothing was written."""

    def __init__(self, message: str, *, state: str, trigger: str) -> None:
        super().__init__(message)
        self.state = state
        self.trigger = trigger


class DefinitionError(WalstateError):
    """A workflow definition is inconsistent (unknown phase or step, a cycle, a duplicate)."""


class VersionNotRegistered(DefinitionError):
    """A job was made by a workflow version that is not registered in this process (and no registered
    version declares a migration from it). The job is left alone for a process that has that version."""

    def __init__(self, message: str, *, workflow: str, version: int) -> None:
        super().__init__(message)
        self.workflow = workflow
        self.version = version


class MigrationRefused(WalstateError):
    """A declared migration of an in-flight job (``Workflow.migrate``) cannot be applied to it (a step it
    removes is unfinished and not dropped, or the mapped context does not validate); nothing changed.

    Not to be confused with :class:`MigrationFailed`, about walstate's own tables."""


class ContextInvalid(WalstateError):
    """A context update did not validate against the job's context model; nothing was written."""


class OutputNotJSON(WalstateError):
    """A step returned (or ``once`` produced, or ``send`` was given) a value that cannot be stored as JSON."""


class UnknownJob(WalstateError):
    """No job with that id (or that workflow name is not registered)."""


class KeyConflict(WalstateError):
    """``submit`` reused a job key with a different context."""


class JobFailed(WalstateError):
    """A job ended ``failed``: a step ran out of attempts. ``errors`` maps step -> last error."""

    def __init__(self, message: str, *, job_id: int, errors: dict[str, str]) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.errors = errors


class JobOwned(WalstateError):
    """The job is being run by another live process (or its lease is still valid)."""


class JobCancelled(WalstateError):
    """A job ended ``cancelled`` (an operator cancelled it)."""

    def __init__(self, message: str, *, job_id: int) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobFinished(WalstateError):
    """The job has ended (succeeded, failed or cancelled): a message sent to it would never be read."""


class WaitTimeout(WalstateError):
    """Raised in a handler by ``step.wait_for(topic, timeout=...)`` when no message came in time."""

    def __init__(self, message: str, *, topic: str) -> None:
        super().__init__(message)
        self.topic = topic


class EngineClosed(WalstateError):
    """The engine was closed: it starts no new work, and a run it stopped left its job to another run."""


class UsageError(WalstateError):
    """The API was used in a way walstate cannot honour (for example, running a job inside a
    transactional step's transaction); the message says what to do instead."""


class InvalidArgument(UsageError):
    """An argument's value cannot be used: NaN, an infinite or absurdly large duration, a count that is
    not a whole number in range, text that is not valid Unicode (a lone surrogate) or holds a NUL.
    Raised before anything is stored; the message names the argument and what it accepts."""


class LeaseLost(WalstateError):
    """This process's claim on a job expired or was taken over; it must stop writing to it."""


class InjectedCrash(BaseException):
    """A crash simulated by the fault injector (tests and ``walstate.testing`` only).

    Derives from ``BaseException`` so that user code's ``except Exception`` cannot hide it.
    """

    def __init__(self, point: str, hit: int) -> None:
        super().__init__(f"injected crash at fault point {point!r} (hit {hit})")
        self.point = point
        self.hit = hit
