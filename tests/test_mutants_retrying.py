"""Tests written for the mutants of ``walstate.storage.retrying`` that survived the rest of the suite.

``make mutmut`` mutates ``Perseverance`` (the retries of transient refusals);
each test here kills mutants no other test noticed. The refusals are real:
another connection to the same SQLite file holds its writer (``BEGIN
IMMEDIATE``) while a store opened with ``busy_timeout=0`` writes, so every
attempt is refused at once. Nothing here waits on the clock: the other
connection lets go when the write path logs that it was refused (a logging
handler, so on the refused write's own thread, before its next attempt), and
the tests that look at the pauses between attempts record them instead of
sleeping them.
"""

from __future__ import annotations

import logging
import math
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from walstate.storage.postgres import PgStore
from walstate import DatabaseBusy, DatabaseError, Engine, StepContext, Workflow
from walstate.storage import Store
from walstate.storage.contract import open_store
from walstate.storage.errors import DatabaseUnavailable
from walstate.storage.retrying import MAX_PAUSE
from walstate.testing import connect

LOGGER = "walstate.storage"
FIELDS = ("walstate_job", "walstate_workflow", "walstate_step", "walstate_attempt")
SECONDS = r"(\d+\.\d)"


class Ctx(BaseModel):
    n: int = 0


def pending_job(db_path: str) -> int:
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def only(ctx: Ctx, step: StepContext) -> None:
        pass

    with Engine(db_path) as e:
        e.register(flow)
        return int(e.submit("w", Ctx()))


class Holder:
    """Another connection to the file that holds its only writer until told to let go."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self.conn.execute("BEGIN IMMEDIATE")
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.conn.execute("COMMIT")

    def close(self) -> None:
        self.release()
        self.conn.close()


class OnRefusal(logging.Handler):
    """Calls ``then()`` on the first 'was refused' WARNING, on the refused write's own thread; keeps every record."""

    def __init__(self, then: Callable[[], None] = lambda: None) -> None:
        super().__init__(logging.DEBUG)
        self.then = then
        self.records: list[logging.LogRecord] = []
        self.fired = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if " was refused " in record.getMessage() and not self.fired:
            self.fired += 1
            self.then()

    @property
    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def setup(db_path: str) -> Iterator[tuple[Store, int, Holder, OnRefusal]]:
    """A job, a store whose writes are refused at once while the holder holds, and the log handler."""
    job = pending_job(db_path)
    store = Store(db_path, busy_timeout=0.0)
    holder = Holder(db_path)
    handler = OnRefusal(holder.release)
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield store, job, holder, handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        holder.close()
        store.close()


def assert_fields(records: list[logging.LogRecord]) -> None:
    """Every walstate log record carries the four ``extra`` fields (none known to the retry: all None)."""
    for r in records:
        assert {f: getattr(r, f, "missing") for f in FIELDS} == dict.fromkeys(FIELDS), r.__dict__


def refused(store: Store, write: Callable[[], Any]) -> DatabaseBusy:
    """What a bare write refused by the holder raises (patience 0: at once, the driver's error)."""
    with pytest.raises(DatabaseBusy) as caught:
        write()
    return caught.value


def written_after(path: str, doing: str, attempts: int) -> str:
    return rf"{re.escape(path)}: {re.escape(doing)} written after {attempts} attempts over {SECONDS}s"


def test_an_unfenced_write_refused_once_is_written_on_its_second_attempt_and_both_warnings_say_so(
        setup: tuple[Store, int, Holder, OnRefusal]) -> None:
    store, job, holder, handler = setup
    store.write.retry.patience = 30.0
    store.write.retry.claim_patience = 0.0
    writer = store.db.writer()
    began = time.monotonic()
    assert store.write.request_cancel(job) is True
    took = time.monotonic() - began
    row = store.read.job(job)
    assert row is not None and row.cancel_requested
    doing = f"requesting the cancellation of job {job}"
    first, last = handler.messages
    cause = re.escape(f"{store.path}: database is locked")
    assert re.fullmatch(rf"{re.escape(store.path)}: {re.escape(doing)} was refused \({cause}.*\); trying again "
                        r"\(for up to 30s\)", first), first
    over = re.fullmatch(written_after(store.path, doing, 2), last)
    assert over, last
    assert float(over.group(1)) <= round(took, 1) + 0.1, (last, took)  # the time since the first refusal, not a clock
    assert_fields(handler.records)
    # A busy refusal keeps the session: the write landed on the same writer connection.
    assert store.db.writer() is writer


def test_a_fenced_write_retries_under_its_claim_patience_not_the_patience_of_unfenced_writes(
        setup: tuple[Store, int, Holder, OnRefusal]) -> None:
    store, job, holder, handler = setup
    holder.release()
    row = store.read.job(job)
    assert row is not None
    claimed = store.write.claim(job, state=row.state, epoch=row.epoch, owner="me", lease_expires=1e12, note="test")
    assert claimed is not None
    holder.conn.execute("BEGIN IMMEDIATE")
    holder.held = True
    store.write.retry.patience = 0.0
    store.write.retry.claim_patience = math.inf
    assert store.write.release(job, "me", claimed.epoch, "test") is True
    row = store.read.job(job)
    assert row is not None and row.owner is None
    doing = f"releasing job {job}"
    first, last = handler.messages
    assert first.startswith(f"{store.path}: {doing} was refused (") and first.endswith(
        "); trying again (the run keeps its claim)"), first
    assert re.fullmatch(written_after(store.path, doing, 2), last), last
    assert_fields(handler.records)


def test_an_unfenced_write_of_a_bare_store_raises_the_drivers_busy_error_at_once_and_logs_nothing(
        setup: tuple[Store, int, Holder, OnRefusal]) -> None:
    # A bare store's patience is 0 (for both kinds of write): the first refusal is the caller's, unchanged.
    store, job, holder, handler = setup
    exc = refused(store, lambda: store.write.request_cancel(job))
    assert "tried" not in str(exc) and exc.path == store.path, exc
    assert handler.records == []
    assert holder.held  # it never logged a refusal, so never asked the holder to let go
    row = store.read.job(job)
    assert row is not None and not row.cancel_requested


def test_a_fenced_write_of_a_bare_store_raises_the_drivers_busy_error_at_once_and_logs_nothing(
        setup: tuple[Store, int, Holder, OnRefusal]) -> None:
    store, job, holder, handler = setup
    exc = refused(store, lambda: store.write.release(job, "nobody", 1, "test"))
    assert "tried" not in str(exc), exc
    assert handler.records == []


def test_a_claim_refused_busy_is_retried_although_a_lost_session_would_not_be(
        setup: tuple[Store, int, Holder, OnRefusal]) -> None:
    # claim() passes lost_ok=False: that forbids retrying a lost session, never a busy refusal.
    store, job, holder, handler = setup
    store.write.retry.patience = 30.0
    row = store.read.job(job)
    assert row is not None
    claimed = store.write.claim(job, state=row.state, epoch=row.epoch, owner="me", lease_expires=1e12, note="test")
    assert claimed is not None and claimed.epoch == row.epoch + 1
    assert re.fullmatch(written_after(store.path, f"claiming job {job}", 2), handler.messages[-1]), handler.messages


def test_a_write_inside_a_transaction_the_caller_opened_is_never_retried(
        setup: tuple[Store, int, Holder, OnRefusal]) -> None:
    store, job, holder, handler = setup
    store.write.retry.patience = 30.0
    holder.release()
    with pytest.raises(DatabaseBusy) as caught:
        # A deferred transaction takes the writer at its first write: the holder takes it first.
        with store.db.atomic("DEFERRED"):
            holder.conn.execute("BEGIN IMMEDIATE")
            holder.held = True
            store.write.request_cancel(job)
    assert "tried" not in str(caught.value), caught.value
    assert handler.records == [] and holder.held


def test_a_lasting_error_is_raised_at_once_and_never_retried(db_path: str) -> None:
    job = pending_job(db_path)
    store = Store(db_path, busy_timeout=0.0)
    handler = OnRefusal()
    logging.getLogger(LOGGER).addHandler(handler)
    try:
        # A mutant that retries a lasting error gives up after a second, saying how often it tried.
        store.write.retry.patience = store.write.retry.claim_patience = 1.0
        conn = sqlite3.connect(db_path, isolation_level=None)
        try:
            # The table a once() record goes to is gone: every attempt would fail the same way.
            conn.execute("DROP TABLE walstate_once")
        finally:
            conn.close()
        with pytest.raises(DatabaseError) as caught:
            store.write.record_once(job, "only", "x", "1")
        assert not isinstance(caught.value, DatabaseBusy)
        assert "tried" not in str(caught.value), caught.value
        assert handler.records == []
    finally:
        logging.getLogger(LOGGER).removeHandler(handler)
        store.close()


def test_a_write_waiting_when_its_store_stops_gives_up_saying_the_engine_is_closing(
        setup: tuple[Store, int, Holder, OnRefusal]) -> None:
    store, job, holder, handler = setup
    store.write.retry.patience = 5.0  # a mutant that does not stop gives up after this, saying something else
    handler.then = store.write.retry.stop  # the holder keeps the writer: only the stop ends the wait
    began = time.monotonic()
    with pytest.raises(DatabaseBusy) as caught:
        store.write.request_cancel(job)
    took = time.monotonic() - began
    exc = caught.value
    doing = f"requesting the cancellation of job {job}"
    first, gave_up = handler.messages
    assert first.endswith("; trying again (for up to 5s)"), first
    original = first[len(f"{store.path}: {doing} was refused ("):-len("); trying again (for up to 5s)")]
    over = re.fullmatch(rf"{re.escape(original)} \(tried 2 times over {SECONDS}s; the engine is closing\)", str(exc))
    assert over, str(exc)
    assert float(over.group(1)) <= round(took, 1) + 0.1
    assert exc.path == store.path
    assert isinstance(exc.__cause__, sqlite3.OperationalError)
    assert re.fullmatch(rf"{re.escape(store.path)}: gave up {re.escape(doing)} after 2 attempts over {SECONDS}s "
                        rf"\({re.escape(original)}\)", gave_up), gave_up
    assert_fields(handler.records)


def test_a_stopped_store_gives_up_a_refused_write_on_its_first_attempt_saying_the_engine_is_closing(
        setup: tuple[Store, int, Holder, OnRefusal]) -> None:
    store, job, holder, handler = setup
    store.write.retry.patience = 5.0
    store.write.retry.stop()
    with pytest.raises(DatabaseBusy, match=r" \(tried 1 times over 0\.0s; the engine is closing\)$"):
        store.write.request_cancel(job)
    assert len(handler.messages) == 1 and " gave up " in handler.messages[0] and " after 1 attempts " in \
        handler.messages[0], handler.messages
    assert holder.held


def test_a_write_gives_up_when_its_patience_runs_out_saying_how_often_and_how_long_it_tried(
        setup: tuple[Store, int, Holder, OnRefusal]) -> None:
    store, job, holder, handler = setup
    store.write.retry.patience = 0.05
    handler.then = lambda: None  # the holder keeps the writer past the patience
    # A mutant that never runs out of patience: the holder lets go after a while, and its write lands.
    timer = threading.Timer(20.0, holder.release)
    timer.start()
    try:
        began = time.monotonic()
        with pytest.raises(DatabaseBusy) as caught:
            store.write.request_cancel(job)
        took = time.monotonic() - began
    finally:
        timer.cancel()
    exc = caught.value
    doing = f"requesting the cancellation of job {job}"
    first, gave_up = handler.messages
    original = first[len(f"{store.path}: {doing} was refused ("):-len("); trying again (for up to 0.05s)")]
    over = re.fullmatch(rf"{re.escape(original)} \(tried (\d+) times over {SECONDS}s, the patience of 0.05s; "
                        r"raise Engine\(patience=\.\.\.\)\)", str(exc))
    assert over, str(exc)
    tries = int(over.group(1))
    assert tries >= 2
    assert 0.0 <= float(over.group(2)) <= round(took, 1) + 0.1
    assert exc.path == store.path
    assert re.fullmatch(rf"{re.escape(store.path)}: gave up {re.escape(doing)} after {tries} attempts over "
                        rf"{SECONDS}s \({re.escape(original)}\)", gave_up), gave_up
    assert_fields(handler.records)


def test_a_patience_given_to_one_write_overrides_the_stores(setup: tuple[Store, int, Holder, OnRefusal]) -> None:
    store, job, holder, handler = setup
    store.write.retry.claim_patience = 2.0  # a mutant ignoring the write's own patience gives up after this
    handler.then = lambda: None
    with pytest.raises(DatabaseBusy, match=r", the patience of 0.05s; raise Engine\(patience=\.\.\.\)\)$"):
        store.write.release(job, "nobody", 1, "test", patience=0.05)
    assert handler.messages[0].endswith("; trying again (the run keeps its claim)"), handler.messages


class Pauses(threading.Event):
    """The retry's stop event, recording how long each pause between attempts would be instead of waiting.

    After ``release_after`` pauses it lets the holder go, so the attempt after that pause is written.
    """

    def __init__(self, release: Callable[[], None], release_after: int | None = None) -> None:
        super().__init__()
        self.pauses: list[float] = []
        self.release = release
        self.release_after = release_after

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.pauses.append(timeout)
        if len(self.pauses) == self.release_after:
            self.release()
        return super().wait(0)


def test_the_pause_between_attempts_doubles_from_20ms_up_to_half_a_second(
        setup: tuple[Store, int, Holder, OnRefusal]) -> None:
    store, job, holder, handler = setup
    store.write.retry.patience = 3600.0
    handler.then = lambda: None
    pauses = Pauses(holder.release, release_after=9)
    store.write.retry._stop = pauses
    assert store.write.request_cancel(job) is True
    assert pauses.pauses == pytest.approx([0.02, 0.04, 0.08, 0.16, 0.32, MAX_PAUSE, MAX_PAUSE, MAX_PAUSE, MAX_PAUSE])
    assert re.fullmatch(written_after(store.path, f"requesting the cancellation of job {job}", 10),
                        handler.messages[-1]), handler.messages


def test_no_pause_outlasts_what_is_left_of_the_patience(setup: tuple[Store, int, Holder, OnRefusal]) -> None:
    store, job, holder, handler = setup
    patience = 0.03
    store.write.retry.patience = patience
    handler.then = lambda: None
    pauses = Pauses(holder.release, release_after=100_000)  # a mutant that never gives up is written at last
    store.write.retry._stop = pauses
    with pytest.raises(DatabaseBusy, match="the patience of 0.03s"):
        store.write.request_cancel(job)
    assert pauses.pauses and pauses.pauses[0] == pytest.approx(0.02)
    assert all(0.0 < p <= patience for p in pauses.pauses), pauses.pauses


def test_a_write_path_reset_after_a_fork_is_no_longer_stopped_and_waits_out_a_held_writer(
        setup: tuple[Store, int, Holder, OnRefusal]) -> None:
    # What a child forked from a closing engine's process runs (Store._after_fork_in_child, at fork): the
    # parent's stop is the parent's; the child's writes still wait for a busy writer. In-process here, where
    # mutmut sees it (it does not follow forked children).
    store, job, holder, handler = setup
    store.write.retry.patience = 30.0
    store.write.retry.stop()
    assert store.write.retry.stopped
    store.write.after_fork_in_child()
    assert not store.write.retry.stopped
    assert store.write.request_cancel(job) is True
    assert re.fullmatch(written_after(store.path, f"requesting the cancellation of job {job}", 2),
                        handler.messages[-1]), handler.messages


def terminate_sessions(url: str) -> None:
    """End every session of the database at ``url`` but this one (PostgreSQL)."""
    admin = connect(url, timeout=10)
    try:
        assert admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                             "datname=current_database() AND pid <> pg_backend_pid()").fetchall()
    finally:
        admin.close()


@pytest.mark.postgres
def test_a_claim_whose_session_was_lost_raises_and_is_not_written_again(pg_database: str) -> None:
    # A lost session is a refusal of kind "lost": the claim may have committed, so only the caller may decide to
    # claim again (lost_ok=False). SQLite never loses a session: PostgreSQL only.
    job = pending_job(pg_database)
    store = PgStore(pg_database)  # its write path and reader themselves, not the contract's operations
    try:
        store.write.retry.patience = store.write.retry.claim_patience = 30.0
        row = store.read.job(job)
        assert row is not None
        store.write.request_cancel(job + 1)  # the writer's session exists, to be terminated
        terminate_sessions(pg_database)
        with pytest.raises(DatabaseUnavailable, match=rf"lost the session .* while claiming job {job}; ") as caught:
            store.write.claim(job, state=row.state, epoch=row.epoch, owner="me", lease_expires=1e12, note="test")
        assert "tried" not in str(caught.value), caught.value
        after = store.read.job(job)
        assert after is not None and (after.owner, after.epoch) == (None, row.epoch)
        # The next claim is the caller's, on a new session.
        again = store.write.claim(job, state=row.state, epoch=row.epoch, owner="me", lease_expires=1e12, note="t")
        assert again is not None and again.epoch == row.epoch + 1
    finally:
        store.close()
