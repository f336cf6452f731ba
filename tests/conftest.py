"""Shared fixtures: fresh databases, statement counting, Hypothesis profiles."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from walstate.storage import Store

# `ci` keeps the whole suite within a few minutes on two cores; `deep` is for
# long local runs: WALSTATE_HYPOTHESIS_PROFILE=deep make test (or make test-deep).
settings.register_profile("ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# `mutation` is for `make mutmut`, which reruns the covering tests once per
# mutant: fewer generated examples, the same fixed sweeps and named cases.
settings.register_profile("mutation", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("WALSTATE_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
#: SIGKILL examples start real processes (~1 s each): few in CI, many in the deep profile.
#: In-process crash examples with 3 worker threads (threads make each example slower).
PARALLEL_EXAMPLES = {"deep": 500, "mutation": 10}.get(PROFILE, 40)
SIGKILL_EXAMPLES = int(os.environ.get("WALSTATE_SIGKILL_EXAMPLES", {"deep": "150", "mutation": "2"}.get(PROFILE, "6")))


class StatementLog:
    """Every SQL statement a sqlite3 connection runs, via its trace callback."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def __call__(self, sql: str) -> None:
        self.statements.append(sql.strip())

    def clear(self) -> None:
        self.statements.clear()

    def count(self, prefix: str) -> int:
        return sum(1 for s in self.statements if s.upper().startswith(prefix))

    @property
    def writes(self) -> list[str]:
        return [s for s in self.statements if s.upper().startswith(("UPDATE", "INSERT", "DELETE", "REPLACE"))]


def trace(conn: sqlite3.Connection) -> StatementLog:
    log = StatementLog()
    conn.set_trace_callback(log)
    return log


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "walstate.db")


@pytest.fixture
def store(db_path: str) -> Iterator[Store]:
    s = Store(db_path)
    yield s
    s.close()
