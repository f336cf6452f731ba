"""Rules every store applies the same way, as pure functions over plain data (no database).

A store reads what a rule needs inside its own transaction, asks the rule,
and writes what it decided: so the SQL stores and the memory store cannot
disagree on them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from .errors import MigrationRefused
from .types import FINISHED_FOR_REMOVAL


def plan_migration(path: str, job_id: int, workflow: str, from_version: int, to_version: int,
                   steps: Sequence[tuple[str, str, int]], stored: Sequence[tuple[str, str, str]],
                   drop: Collection[str]) -> list[str]:
    """The stored steps (``stored``: name, state, phase) the new version's ``steps`` no longer declare.

    Raises :class:`MigrationRefused` when the move would break a rule: a
    removed step that is unfinished and not in ``drop``, or a new step in a
    phase before one the job has begun.
    """
    have = {name: state for name, state, _ in stored}
    wanted = {name for name, _, _ in steps}
    _refuse_adding_behind(path, job_id, workflow, from_version, to_version, steps,
                          {name: (state, phase) for name, state, phase in stored})
    removed = [n for n in have if n not in wanted]
    blocking = [n for n in removed if n not in drop and have[n] not in FINISHED_FOR_REMOVAL]
    if blocking:
        states = ", ".join(f"{n!r} ({have[n]})" for n in blocking)
        raise MigrationRefused(
            f"{path}: job {job_id} ({workflow}) was not migrated from version {from_version} to {to_version}: the "
            f"new version removes {states}, which has not finished; nothing changed. Let the job finish on version "
            f"{from_version} (register that version), or name the step in migrate({from_version}, fn, "
            f"drop=[...]) to drop it unfinished"
        )
    return removed


def _refuse_adding_behind(path: str, job_id: int, workflow: str, from_version: int, to_version: int,
                          steps: Sequence[tuple[str, str, int]], stored: dict[str, tuple[str, str]]) -> None:
    """The rule: phases run in order, migrated jobs too. A step the new version adds must not land in a
    phase before one the job has begun (a step of it left ``pending``): it could only run after that
    later phase. Raises :class:`MigrationRefused` naming the step and the phase that has begun."""
    phases: list[str] = []
    for _, phase, _ in sorted(steps, key=lambda s: s[2]):
        if phase not in phases:
            phases.append(phase)
    new_phase = {name: phase for name, phase, _ in steps}
    begun: dict[str, tuple[str, str]] = {}  # phase -> (step, state) of a step of it that has left pending
    for name, (state, phase) in stored.items():
        at = new_phase.get(name, phase)  # where the new version puts it (a retired step: where it ran)
        if state != "pending" and at in phases:
            begun.setdefault(at, (name, state))
    for name, phase, _ in sorted(steps, key=lambda s: s[2]):
        if name in stored:
            continue
        later = [p for p in phases[phases.index(phase) + 1:] if p in begun]
        if later:
            step, state = begun[later[0]]
            raise MigrationRefused(
                f"{path}: job {job_id} ({workflow}) was not migrated from version {from_version} to {to_version}: "
                f"the new version adds step {name!r} to phase {phase!r}, but the job has begun the later phase "
                f"{later[0]!r} (step {step!r} is {state}); phases run in order, so {name!r} could only run after "
                f"it. Nothing changed. Let the job finish on version {from_version} (register that version), or "
                f"add the step to phase {later[-1]!r} or a later one"
            )

