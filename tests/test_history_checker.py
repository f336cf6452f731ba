"""The history checker's rules on hand-written ledgers over a real database (walstate.testing.check_history).

A chaos run found a false alarm on PostgreSQL: a transactional step whose session was killed inside it
(``step.execute`` raised) was rightly called again at the same attempt, in a new transaction, and the
checker called that "attempts went down". The database had undone the whole attempt, its count included.
These tests pin the rule: a transactional call the database undid may repeat at its attempt; a call
whose attempt stands (a handler's own error, or a commit that happened) may not.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from walstate import Engine, StepContext, Workflow
from walstate.chaos import _from_database
from walstate.history import CREATE_EFFECTS, INSERT_EFFECT, Ledger, check_history
from walstate.storage.errors import DatabaseBusy, DatabaseUnavailable


class Ctx(BaseModel):
    n: int = 0


def one_job(db: Path) -> int:
    """A finished job of one transactional step, and the chaos effect table beside it."""
    flow = Workflow("book_flow", context=Ctx, phases=["p"])

    @flow.step(phase="p", transactional=True)
    def book(ctx: Ctx, step: StepContext) -> dict[str, int]:
        return {"n": 1}

    with Engine(str(db)) as e:
        e.register(flow)
        job = e.submit(flow, Ctx())
        e.run(job)
    conn = sqlite3.connect(db)
    conn.execute(CREATE_EFFECTS)
    conn.execute("CREATE TABLE IF NOT EXISTS walstate_chaos_pruned "
                 "(job_id BIGINT, workflow TEXT, key TEXT, state TEXT, created_at REAL)")
    conn.commit()
    conn.close()
    return int(job)


def write_calls(db: Path, ledger_dir: Path, job: int, first_outcome: str, *, first_committed: bool) -> None:
    """Two calls of ``book`` at attempt 1 in this process: the first ends with ``first_outcome``, the second commits."""
    ledger = Ledger(ledger_dir, "worker")
    conn = sqlite3.connect(db)
    for call, outcome, committed in ((0, first_outcome, first_committed), (1, "returned", True)):
        base: dict[str, Any] = {"job": job, "step": "book", "workflow": "book_flow", "attempt": 1, "call": call}
        ledger.append("enter", **base, epoch=1)
        if committed:
            ledger.append("effect", job=job, step="book", attempt=1)
            conn.execute(INSERT_EFFECT, (job, "book", 1, __import__("os").getpid(), call))
        ledger.append("exit", **base, outcome=outcome)
    conn.commit()
    conn.close()


def check(db: Path, ledger_dir: Path) -> set[str]:
    report = check_history(str(db), ledger_dir, lease=5.0, transactional=[("book_flow", "book")])
    return report.rules_broken()


@pytest.mark.parametrize("outcome", ["rolled-back", "returned"])
def test_a_transactional_call_whose_transaction_the_database_undid_may_run_again_at_its_attempt(
        tmp_path: Path, outcome: str) -> None:
    # rolled-back: step.execute raised when the session was killed; returned: the commit after the return failed.
    db, ledgers = tmp_path / "app.db", tmp_path / "ledger"
    ledgers.mkdir()
    job = one_job(db)
    write_calls(db, ledgers, job, outcome, first_committed=False)
    assert check(db, ledgers) == set()


def test_a_transactional_call_that_raised_its_own_error_may_not_repeat_its_attempt(tmp_path: Path) -> None:
    db, ledgers = tmp_path / "app.db", tmp_path / "ledger"
    ledgers.mkdir()
    job = one_job(db)
    write_calls(db, ledgers, job, "raised", first_committed=False)
    assert "attempts-went-down" in check(db, ledgers)


def test_a_transactional_call_whose_commit_happened_may_not_run_again(tmp_path: Path) -> None:
    db, ledgers = tmp_path / "app.db", tmp_path / "ledger"
    ledgers.mkdir()
    job = one_job(db)
    write_calls(db, ledgers, job, "returned", first_committed=True)
    assert {"re-run-after-return", "transactional-effect-not-once"} <= check(db, ledgers)


def test_only_an_error_of_the_database_makes_a_transactional_call_rolled_back() -> None:
    assert _from_database(sqlite3.OperationalError("database is locked"))
    assert _from_database(DatabaseBusy("busy"))
    assert _from_database(DatabaseUnavailable("gone"))
    try:
        try:
            raise sqlite3.OperationalError("disk I/O error")
        except sqlite3.Error as exc:
            raise RuntimeError("the handler wrapped it") from exc
    except RuntimeError as wrapped:
        assert _from_database(wrapped)
    assert not _from_database(ValueError("the handler's own"))
    assert not _from_database(KeyError("x"))
