"""walstate's storage layer: everything that touches the database (SQLite, or PostgreSQL).

Internal to walstate (installed as ``walstate.storage``): ``walstate`` builds on it and re-exports what users
need. Nothing here imports the rest of ``walstate``.

Names load on first use (PEP 562), so ``walstate.storage.errors`` and
``walstate.storage.dedup`` (and ``import walstate``) do not pay for importing peewee.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .connection import open_database
    from .contract import Storage, open_store
    from .reads import Reader
    from .schema import SCHEMA_VERSION
    from .store import Store
    from .types import (TERMINAL_JOB_STATES, TERMINAL_STEP_STATES, UNFINISHED_JOB_STATES, Change, Claimed,
                        ContextPatch, Durability, JobRow, JobState, JournalRow, StepCount, StepRow, StepState)
    from .writepath import WritePath

_HOME = {
    "Durability": "types",
    "Storage": "contract",
    "open_store": "contract",
    "open_database": "connection",
    "JobRow": "types",
    "JournalRow": "types",
    "Reader": "reads",
    "StepRow": "types",
    "SCHEMA_VERSION": "schema",
    "TERMINAL_JOB_STATES": "types",
    "TERMINAL_STEP_STATES": "types",
    "UNFINISHED_JOB_STATES": "types",
    "Store": "store",
    "Change": "types",
    "ContextPatch": "types",
    "WritePath": "writepath",
    "Claimed": "types",
    "JobState": "types",
    "StepCount": "types",
    "StepState": "types",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'walstate.storage' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "SCHEMA_VERSION",
    "TERMINAL_JOB_STATES",
    "TERMINAL_STEP_STATES",
    "UNFINISHED_JOB_STATES",
    "Change",
    "Claimed",
    "ContextPatch",
    "Durability",
    "JobRow",
    "JobState",
    "JournalRow",
    "Reader",
    "StepCount",
    "StepRow",
    "StepState",
    "Storage",
    "Store",
    "WritePath",
    "open_database",
    "open_store",
]
assert sorted(__all__) == sorted(_HOME)
