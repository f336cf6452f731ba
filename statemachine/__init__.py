"""walstate: multi-phase jobs of durable sub-step state machines on SQLite WAL.

Every state change of every sub-step is committed to SQLite before it is
believed, with the job's typed context in the same transaction, so a process
that dies at any instant resumes its jobs exactly once.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

if _TYPE_CHECKING:
    from typing import Any

    from .storage.errors import (
        ConfigurationError,
        ContextInvalid,
        DatabaseBusy,
        DatabaseError,
        DatabaseFull,
        DatabaseUnavailable,
        DefinitionError,
        EngineClosed,
        InjectedCrash,
        InvalidArgument,
        InvalidTransition,
        JobCancelled,
        JobFailed,
        JobFinished,
        JobOwned,
        KeyConflict,
        LeaseLost,
        MigrationFailed,
        MigrationRefused,
        NotADatabase,
        OutputNotJSON,
        SchemaTooNew,
        SchemaTooOld,
        StaleState,
        UnknownJob,
        UsageError,
        VersionNotRegistered,
        WaitTimeout,
        WalstateError,
        WriteFailed,
    )
    from .storage.dedup import Deduper, guarded_update
    from .context import StepContext, StepResult
    from .workflow import Retry, Workflow
    from .engine import Engine, JobId, JobStatus, MigrationReport, OwnerStatus, RecoveryReport, StepStatus, TransitionRecord
    from .aio import AsyncStepContext
    from .runtime import JobHandle, Worker
    from .views import JobPage, JobSummary

    __version__: str

#: Where each public name lives. Everything loads on first use: defining workflows does not pay for
#: the engine (peewee, transitions, SQLite), and importing walstate (or its pytest plugin) loads
#: nothing but this module.
_HOMES = {
    **dict.fromkeys(("ConfigurationError", "ContextInvalid", "DatabaseBusy", "DatabaseError", "DatabaseFull", "DatabaseUnavailable", "DefinitionError", "EngineClosed", "InjectedCrash", "InvalidArgument", "InvalidTransition", "JobCancelled", "JobFailed", "JobFinished", "JobOwned", "KeyConflict", "LeaseLost", "MigrationFailed", "MigrationRefused", "NotADatabase", "OutputNotJSON", "SchemaTooNew", "SchemaTooOld", "StaleState", "UnknownJob", "UsageError", "VersionNotRegistered", "WaitTimeout", "WalstateError", "WriteFailed"), "storage.errors"),
    **dict.fromkeys(("Deduper", "guarded_update"), "storage.dedup"),
    **dict.fromkeys(("StepContext", "StepResult"), "context"),
    **dict.fromkeys(("Retry", "Workflow"), "workflow"),
    **dict.fromkeys(("Engine", "JobId", "JobStatus", "MigrationReport", "OwnerStatus", "RecoveryReport", "StepStatus",
                     "TransitionRecord"), "engine"),
    **dict.fromkeys(("JobHandle", "Worker"), "runtime"),
    **dict.fromkeys(("JobPage", "JobSummary"), "views"),
    "AsyncStepContext": "aio",
}


def __getattr__(name: str) -> "Any":
    import importlib

    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value: "Any" = version("walstate")
        except PackageNotFoundError:  # run from a source tree that is not installed
            value = "0+unknown"
    elif name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    else:
        raise AttributeError(f"module 'walstate' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, "__version__", "__doc__", "__name__", "__file__", "__path__"})


__all__ = [
    "__version__",
    "AsyncStepContext",
    "ConfigurationError",
    "ContextInvalid",
    "DatabaseBusy",
    "DatabaseError",
    "DatabaseFull",
    "DatabaseUnavailable",
    "Deduper",
    "DefinitionError",
    "Engine",
    "EngineClosed",
    "InjectedCrash",
    "InvalidArgument",
    "InvalidTransition",
    "JobCancelled",
    "JobFailed",
    "JobFinished",
    "JobHandle",
    "JobId",
    "JobOwned",
    "JobPage",
    "JobStatus",
    "JobSummary",
    "KeyConflict",
    "LeaseLost",
    "MigrationFailed",
    "MigrationRefused",
    "MigrationReport",
    "NotADatabase",
    "OutputNotJSON",
    "OwnerStatus",
    "RecoveryReport",
    "Retry",
    "SchemaTooNew",
    "SchemaTooOld",
    "StaleState",
    "StepContext",
    "StepResult",
    "StepStatus",
    "TransitionRecord",
    "UnknownJob",
    "UsageError",
    "VersionNotRegistered",
    "WaitTimeout",
    "WalstateError",
    "Worker",
    "Workflow",
    "WriteFailed",
    "guarded_update",
]
