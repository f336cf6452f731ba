"""Workflow versions: which registered definition a stored job runs on, or why it cannot run here.

A job records its workflow's ``version`` and the definition's ``fingerprint``
when it is submitted. An engine holds a :class:`Registry` of every version
it was given; :meth:`Registry.resolve` maps a stored job to the definition it
was made for:

* its own version, when registered and of the same fingerprint (jobs stored
  before versions existed have no fingerprint and are checked by their step
  names instead);
* else a registered newer version that declares ``migrate(job_version, ...)``
  (the newest such): the job is migrated before it runs;
* else nothing: :class:`VersionNotRegistered`, "waiting for code version N".
  The job is left alone, untouched, for a process that has that version.

Nothing here writes; storage/versions.py applies a migration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from .storage.errors import ContextInvalid, DefinitionError, UnknownJob, VersionNotRegistered
from .storage.types import JobRow, StepRow
from .workflow import MigrationDef, Workflow


@dataclass(frozen=True)
class Plan:
    """How a stored job runs here: on ``flow``, after applying ``migration`` when it is not ``None``."""

    flow: Workflow[Any]
    migration: MigrationDef | None = None


def waiting_for(row: JobRow) -> str:
    """The sentence people see for a job whose version no process here has."""
    return f"waiting for code version {row.version} of workflow {row.workflow!r}"


class Registry:
    """The workflow definitions one engine was given, every version of every name."""

    def __init__(self) -> None:
        #: Name -> the newest (highest) registered version: what ``submit(name)`` uses.
        self.newest: dict[str, Workflow[Any]] = {}
        self.versions: dict[str, dict[int, Workflow[Any]]] = {}

    def register(self, flow: Workflow[Any], where: str) -> None:
        """Add ``flow`` (validated); the same object again is a no-op.

        Another object of the same name and version is refused with
        :class:`DefinitionError`: a job made for that version must find one
        definition, whatever process runs it.
        """
        flow.validate()
        known = self.versions.get(flow.name, {}).get(flow.version)
        if known is flow:
            return
        if known is not None:
            same = known.fingerprint == flow.fingerprint
            raise DefinitionError(
                f"{where}: workflow {flow.name!r} version {flow.version} is already registered"
                + ("" if same else f" with another definition (fingerprint {known.fingerprint}, this one "
                   f"{flow.fingerprint})")
                + f"; give a changed definition a new version (Workflow(..., version={self.top(flow.name) + 1})) "
                "and register both"
            )
        self.versions.setdefault(flow.name, {})[flow.version] = flow
        newest = self.newest.get(flow.name)
        if newest is None or flow.version > newest.version:
            self.newest[flow.name] = flow

    def top(self, name: str) -> int:
        return max(self.versions.get(name, {}), default=0)

    def get(self, name: str, version: int) -> Workflow[Any] | None:
        return self.versions.get(name, {}).get(version)

    def pick(self, name: str, version: int | None, where: str) -> Workflow[Any]:
        """The definition ``submit`` uses: ``version`` of ``name``, or its newest."""
        have = self.versions.get(name)
        if not have:
            raise UnknownJob(f"workflow {name!r} is not registered on this engine ({where}); call "
                             "engine.register(flow) first")
        if version is None:
            return self.newest[name]
        flow = have.get(version)
        if flow is None:
            raise UnknownJob(f"workflow {name!r} has no version {version} registered on this engine ({where}); "
                             f"registered: {sorted(have)}")
        return flow

    def migration_to(self, name: str, version: int) -> tuple[Workflow[Any], MigrationDef] | None:
        """The newest registered version of ``name`` declaring a migration from ``version``."""
        for v in sorted(self.versions.get(name, {}), reverse=True):
            flow = self.versions[name][v]
            m = flow.migrations.get(version)
            if m is not None and v > version:
                return flow, m
        return None

    def claimable(self) -> list[tuple[str, int]]:
        """The ``(workflow, version)`` pairs of jobs this registry can run: each registered version, and each
        version a registered newer one declares a migration from (running such a job migrates it first)."""
        pairs = set()
        for name, have in self.versions.items():
            for version, flow in have.items():
                pairs.add((name, version))
                pairs.update((name, old) for old in flow.migrations if old < version)
        return sorted(pairs)

    def resolve(self, row: JobRow, steps: Callable[[], list[StepRow]], where: str) -> Plan:
        """The definition stored job ``row`` runs on here, or a typed error saying why it cannot.

        Raises :class:`VersionNotRegistered` (no such version here and no
        migration from it), :class:`DefinitionError` (its version is here
        but with another fingerprint: the definition changed without a new
        version) or :class:`ContextInvalid` (its context no longer validates
        against its version's model). ``steps`` reads the job's steps; it is
        called only for jobs stored before versions existed.
        """
        flow = self.get(row.workflow, row.version)
        if flow is None:
            found = self.migration_to(row.workflow, row.version)
            if found is not None:
                return Plan(found[0], found[1])
            have = sorted(self.versions.get(row.workflow, {}))
            raise VersionNotRegistered(
                f"{where}: job {row.id} is {waiting_for(row)}: this engine has "
                + (f"versions {have} of it" if have else "no version of it")
                + f"; run it in a process that registers version {row.version}, or declare "
                f"new_flow.migrate({row.version}, fn) on a newer version",
                workflow=row.workflow, version=row.version,
            )
        if row.fingerprint is None:
            # Stored before versions existed: its step names are what we can check.
            names = sorted(s.name for s in steps())
            if names != sorted(flow.steps):
                raise DefinitionError(
                    f"{where}: job {row.id} was created with steps {names} but workflow {flow.name!r} version "
                    f"{flow.version} now declares {sorted(flow.steps)}; register the definition it was created "
                    f"with as version {row.version}, and the new one as a higher version"
                )
        elif row.fingerprint != flow.fingerprint:
            raise DefinitionError(
                f"{where}: job {row.id} was made for workflow {flow.name!r} version {flow.version} with definition "
                f"fingerprint {row.fingerprint}, but version {flow.version} registered here has fingerprint "
                f"{flow.fingerprint}: the definition changed without a new version. Restore it, or give the "
                f"changed definition version {self.top(flow.name) + 1} (with migrate({flow.version}, fn) to move "
                "such jobs onto it) and register the original as version "
                f"{flow.version} too; the job is left as it is"
            )
        try:
            flow.context.model_validate_json(row.context)
        except ValidationError as exc:
            raise ContextInvalid(f"{where}: job {row.id} ({flow.name}): its stored context no longer validates "
                                 f"against {flow.context.__name__}: {exc}") from exc
        return Plan(flow)


__all__ = ["Plan", "Registry", "waiting_for"]
