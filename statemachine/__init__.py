"""walstate: multi-phase jobs of durable sub-step state machines on SQLite WAL.

Every state change of every sub-step is committed to SQLite before it is
believed, with the job's typed context in the same transaction, so a process
that dies at any instant resumes its jobs exactly once.
"""

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

import importlib
from typing import TYPE_CHECKING, Any

from .context import StepContext, StepResult
from .workflow import Retry, Workflow

if TYPE_CHECKING:
    from .engine import Engine, JobId, JobStatus, MigrationReport, RecoveryReport, StepStatus, TransitionRecord
    from .aio import AsyncStepContext
    from .runtime import JobHandle, Worker
    from .views import JobPage, JobSummary

_ENGINE_NAMES = ("Engine", "JobId", "JobStatus", "MigrationReport", "RecoveryReport", "StepStatus", "TransitionRecord")
_RUNTIME_NAMES = ("JobHandle", "Worker")
_AIO_NAMES = ("AsyncStepContext",)
_VIEW_NAMES = ("JobPage", "JobSummary")


def __getattr__(name: str) -> Any:
    # The engine (and with it peewee, transitions and SQLite) loads on first
    # use: defining workflows, or a `walstate --help`, does not pay for it.
    homes = {**dict.fromkeys(_ENGINE_NAMES, "engine"), **dict.fromkeys(_RUNTIME_NAMES, "runtime"),
             **dict.fromkeys(_VIEW_NAMES, "views"), **dict.fromkeys(_AIO_NAMES, "aio")}
    if name in homes:
        value = getattr(importlib.import_module(f".{homes[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'walstate' has no attribute {name!r}")

__all__ = [
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
