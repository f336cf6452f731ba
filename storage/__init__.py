"""walstate's storage layer: everything that touches SQLite.

Internal to walstate: ``statemachine`` builds on it and re-exports what users
need. Nothing here imports ``statemachine``.
"""

from .connection import Durability, open_database
from .reads import JobRow, JournalRow, Reader, StepRow
from .schema import SCHEMA_VERSION, TERMINAL_JOB_STATES, TERMINAL_STEP_STATES, UNFINISHED_JOB_STATES
from .store import Store
from .writepath import Change, ContextPatch, WritePath

__all__ = [
    "SCHEMA_VERSION",
    "TERMINAL_JOB_STATES",
    "TERMINAL_STEP_STATES",
    "UNFINISHED_JOB_STATES",
    "Change",
    "ContextPatch",
    "Durability",
    "JobRow",
    "JournalRow",
    "Reader",
    "StepRow",
    "Store",
    "WritePath",
    "open_database",
]
