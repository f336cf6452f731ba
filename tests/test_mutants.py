"""The crash suite has teeth: deliberately broken variants of the library must make it fail.

Each mutant below is a realistic bug in the write path or recovery, applied
with monkeypatch; the exhaustive sweep of ``test_crash_suite`` must catch
every one. If a mutant survives, the suite has a blind spot.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import pytest

from walstate import WalstateError
from walstate import runner as runner_mod
from walstate.context import StepContext
from walstate.runner import JobRun
from walstate.storage import faults
from walstate.storage.writepath import WritePath

from .conftest import NewDb
from .test_crash_suite import sweep


def journal_in_its_own_transaction(mp: pytest.MonkeyPatch) -> None:
    real = WritePath._apply

    def apply(self: WritePath, conn: sqlite3.Connection, c: Any, now: float, deferred: Any = None) -> None:
        # The UPDATE commits on its own; the journal row follows in a second transaction.
        saved = WritePath._JOURNAL
        WritePath._JOURNAL = "SELECT ?, ?, ?, ?, ?, ?, ?"
        try:
            real(self, conn, c, now)
        finally:
            WritePath._JOURNAL = saved
        conn.execute("COMMIT")
        faults.point("after_update")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(WritePath._JOURNAL, (c.job_id, c.step, c.expected, c.new, c.attempt, now, c.note))

    mp.setattr(WritePath, "_apply", apply)


def transactional_effect_outside_the_completion(mp: pytest.MonkeyPatch) -> None:
    real = JobRun._run_step

    def run_step(self: JobRun, d: Any) -> None:
        if d.transactional:
            d = type(d)(**{**d.__dict__, "transactional": False})  # handler writes autocommit
        real(self, d)

    mp.setattr(JobRun, "_run_step", run_step)


def context_saved_after_the_completion(mp: pytest.MonkeyPatch) -> None:
    real = WritePath.commit

    def commit(self: WritePath, changes: Any = (), effect: Callable[[], Any] | None = None) -> None:
        changes = [*changes, *(effect() if effect else ())]
        patches = [(c.job_id, c.context) for c in changes if c.context is not None]
        for c in changes:
            c.context = None
        real(self, changes)
        for job_id, patch in patches:  # a second transaction, after the completion committed
            def merge(job_id: int = job_id, patch: Any = patch) -> list[Any]:
                self._merge_context(self.db.connection(), job_id, patch, 0.0)
                return []
            real(self, (), merge)

    mp.setattr(WritePath, "commit", commit)


def recovery_reruns_succeeded_steps(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(runner_mod, "_TERMINAL", frozenset({"failed", "skipped", "cancelled"}))


def once_does_not_look_up_its_record(mp: pytest.MonkeyPatch) -> None:
    def once(self: StepContext, name: str, fn: Callable[[], Any]) -> Any:
        result = fn()  # calls first, records after returning, never reads the record back
        self._store.record_once(self.job_id, self.step, name, "null")
        return result

    mp.setattr(StepContext, "once", once)


def interrupted_attempt_not_journalled(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(JobRun, "_interrupted", lambda self, step: None)


MUTANTS = [journal_in_its_own_transaction, transactional_effect_outside_the_completion,
           context_saved_after_the_completion, recovery_reruns_succeeded_steps, once_does_not_look_up_its_record,
           interrupted_attempt_not_journalled]


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.__name__ for m in MUTANTS])
def test_the_crash_sweep_catches_the_mutant(new_db: NewDb, monkeypatch: pytest.MonkeyPatch,
                                            mutant: Callable[[pytest.MonkeyPatch], None]) -> None:
    mutant(monkeypatch)
    with pytest.raises((AssertionError, WalstateError)):
        sweep(new_db)
