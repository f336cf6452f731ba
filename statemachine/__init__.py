"""walstate: multi-phase jobs of durable sub-step state machines on SQLite WAL.

Every state change of every sub-step is committed to SQLite before it is
believed, with the job's typed context in the same transaction, so a process
that dies at any instant resumes its jobs exactly once.
"""

from storage.errors import (
    ConfigurationError,
    ContextInvalid,
    DatabaseBusy,
    DatabaseError,
    DatabaseFull,
    DatabaseUnavailable,
    DefinitionError,
    InjectedCrash,
    InvalidTransition,
    JobFailed,
    JobOwned,
    KeyConflict,
    LeaseLost,
    NotADatabase,
    OutputNotJSON,
    SchemaTooNew,
    StaleState,
    UnknownJob,
    WalstateError,
    WriteFailed,
)

from storage.dedup import Deduper, guarded_update

from .context import StepContext, StepResult
from .engine import Engine, JobStatus, StepStatus, TransitionRecord
from .workflow import Retry, Workflow

__all__ = [
    "ConfigurationError",
    "ContextInvalid",
    "DatabaseBusy",
    "DatabaseError",
    "DatabaseFull",
    "DatabaseUnavailable",
    "Deduper",
    "DefinitionError",
    "Engine",
    "InjectedCrash",
    "InvalidTransition",
    "JobFailed",
    "JobOwned",
    "JobStatus",
    "KeyConflict",
    "LeaseLost",
    "NotADatabase",
    "OutputNotJSON",
    "Retry",
    "SchemaTooNew",
    "StaleState",
    "StepContext",
    "StepResult",
    "StepStatus",
    "TransitionRecord",
    "UnknownJob",
    "WalstateError",
    "Workflow",
    "WriteFailed",
    "guarded_update",
]
