"""Schedules: one job per cron slot, across every process on the file.

A schedule names a workflow, a cron expression (UTC, parsed by ``croniter``)
and the context of its jobs. A running worker checks its engine's schedules
about every 0.5 s and submits the job of the latest slot that has come, with
a key made of the schedule and the slot (``schedule:NAME:SLOT``): a job key
is unique per workflow in the file, so however many processes run the same
schedule, each slot makes one job.

Missed slots (nothing ran during them): ``missed="latest"`` (the default)
runs the latest missed slot once when a worker starts; ``"skip"`` runs only
slots that come while a worker runs.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

from croniter import croniter

from .storage.errors import DefinitionError
from .workflow import Workflow

Missed = Literal["latest", "skip"]


@dataclass
class Schedule:
    """A registered schedule (see the module docstring)."""

    name: str
    flow: Workflow[Any]
    cron: str
    context: Any
    missed: Missed = "latest"
    #: The slot this process last submitted (or skipped at start), to submit each slot once.
    last_slot: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not croniter.is_valid(self.cron):
            raise DefinitionError(f"schedule {self.name!r}: {self.cron!r} is not a valid cron expression")
        if self.missed not in ("latest", "skip"):
            raise DefinitionError(f"schedule {self.name!r}: missed must be 'latest' or 'skip', not {self.missed!r}")

    def latest_slot(self, now: float) -> float:
        """The start of the latest slot at or before ``now`` (a Unix time)."""
        start = dt.datetime.fromtimestamp(now, tz=dt.timezone.utc)
        if croniter.match(self.cron, start.replace(second=0, microsecond=0)) and start.second == 0:
            return start.timestamp()
        return float(croniter(self.cron, start).get_prev(float))

    def due(self, now: float) -> float | None:
        """The slot to submit now, if any (each slot once per process)."""
        slot = self.latest_slot(now)
        if self.last_slot is None and self.missed == "skip":
            self.last_slot = slot  # the slot in progress when the worker started is a missed one
            return None
        if slot == self.last_slot:
            return None
        return slot

    def key(self, slot: float) -> str:
        stamp = dt.datetime.fromtimestamp(slot, tz=dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"schedule:{self.name}:{stamp}"
