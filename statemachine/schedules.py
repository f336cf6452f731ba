"""Schedules: one job per cron slot, exactly, across every process on the database, restarts and prunes.

A schedule names a workflow, a cron expression (UTC, parsed by ``croniter``)
and the context of its jobs. A running worker checks its engine's schedules
about every 0.5 s. The schedule's progress, the latest slot that got its job
(or was passed over as missed), is stored in the database (``walstate_schedule``)
and advanced in the same transaction that creates the slot's job, whose key is
``schedule:NAME:SLOT``. So a slot gets one job however many processes run the
schedule, however often workers restart, and after its job was pruned.

Which slots get a job, at a check at time ``now``: every slot after the stored
progress up to ``now`` that is at most ``grace`` seconds old (default 60) is
*on time* and gets its job, in slot order, however late the check itself came
(a busy worker, a quick restart). Older slots after the progress are *missed*
(no worker checked the schedule within ``grace`` of them):

- ``missed="latest"`` (the default): if no slot is on time, the latest missed
  slot gets one job; the other missed slots get none;
- ``missed="skip"``: missed slots get no job.

A schedule's first check on a database (no progress stored yet) counts only
the latest slot: it gets its job under ``"latest"``, and under ``"skip"`` only
if it is on time.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any, Literal

from croniter import croniter

from .storage.errors import DefinitionError
from .views import SLOT_FORMAT
from .workflow import Workflow

Missed = Literal["latest", "skip"]

#: Seconds after its time within which a slot still counts as on time (see the module docstring).
DEFAULT_GRACE = 60.0


@dataclass
class Schedule:
    """A registered schedule (see the module docstring)."""

    name: str
    flow: Workflow[Any]
    cron: str
    context: Any
    missed: Missed = "latest"
    grace: float = DEFAULT_GRACE

    def __post_init__(self) -> None:
        if not croniter.is_valid(self.cron):
            raise DefinitionError(f"schedule {self.name!r}: {self.cron!r} is not a valid cron expression")
        if self.missed not in ("latest", "skip"):
            raise DefinitionError(f"schedule {self.name!r}: missed must be 'latest' or 'skip', not {self.missed!r}")
        if isinstance(self.grace, bool) or not isinstance(self.grace, (int, float)) or not (
                math.isfinite(self.grace) and self.grace >= 0):
            raise DefinitionError(f"schedule {self.name!r}: grace must be a number of seconds >= 0, not {self.grace!r}")

    def latest_slot(self, now: float) -> float:
        """The start of the latest slot at or before ``now`` (a Unix time): always a whole second.

        Cron slots fall on whole seconds, so the latest one at or before ``now``
        is the latest one strictly before the next whole second (``get_prev``
        is strict). Returning ``now`` itself when it lay inside a slot's second
        made a fraction that keyed the slot but stored as the next one: the
        slot's job made again after a prune, and the next slot skipped.
        """
        after = dt.datetime.fromtimestamp(math.floor(now) + 1, tz=dt.timezone.utc)
        return float(croniter(self.cron, after).get_prev(float))

    def due(self, now: float, progress: float | None) -> tuple[list[float], float | None]:
        """What a check at ``now`` does, given the stored ``progress``: (slots to submit in order, slot to pass).

        The second item, when not None, is a missed slot the progress moves to
        without a job (``missed="skip"``).
        """
        latest = self.latest_slot(now)
        if progress is not None and latest <= progress:
            return [], None
        if progress is None:
            return ([latest], None) if self.missed == "latest" or now - latest <= self.grace else ([], latest)
        on_time: list[float] = []
        after = max(progress, now - self.grace)
        slots = croniter(self.cron, dt.datetime.fromtimestamp(after, tz=dt.timezone.utc))
        while (slot := float(slots.get_next(float))) <= now:
            if slot > after:
                on_time.append(slot)
        if on_time:
            return on_time, None
        return ([latest], None) if self.missed == "latest" else ([], latest)

    def key(self, slot: float) -> str:
        """The key of the job of ``slot``: ``schedule:NAME:SLOT`` (read back by :func:`walstate.views.schedule_of_key`)."""
        stamp = dt.datetime.fromtimestamp(slot, tz=dt.timezone.utc).strftime(SLOT_FORMAT)
        return f"schedule:{self.name}:{stamp}"
