"""walstate on PostgreSQL: the same storage contract as the SQLite store, on a server several hosts share.

``Engine("postgresql://user@host:5432/db")`` selects this backend. What
differs from SQLite stays here:

- **SQL.** The write path and the readers keep one set of statements, written
  in the dialect both databases share; :func:`pg_sql` rewrites the few
  spellings that differ (``?`` placeholders, ``IS ?``, ``json_each``,
  ``INDEXED BY``), once per statement. Where PostgreSQL needs more than a
  spelling, :class:`PgWritePath` overrides the statement.
- **Transactions.** ``BEGIN`` (READ COMMITTED) instead of ``BEGIN IMMEDIATE``:
  writers no longer queue on one file lock, so every statement that reads a
  job row before writing it takes a row lock (``FOR UPDATE``/``FOR SHARE``),
  and a step's compare-and-set locks its job row, so a run and a claim of the
  same job are ordered as SQLite's single writer orders them. Batch claims
  use ``FOR UPDATE SKIP LOCKED``; claims counted against a per-workflow limit
  take a transaction-scoped advisory lock.
- **Time.** Leases and wake-ups are compared across hosts, so every process
  reads the server's clock: :class:`ServerClock` corrects the local clock by
  the offset it measures against ``clock_timestamp()`` (at open and every 30 s).
- **Wake-ups.** Workers of other processes learn of new work by ``LISTEN``;
  a transaction that creates, releases, parks or messages a job sends one
  ``NOTIFY`` (PostgreSQL coalesces them per transaction; step changes send
  none, so the hot commit path stays as it was). Polling stays the fallback:
  :meth:`PgReader.data_version` also changes once a second.
- **Errors.** :func:`translate` maps SQLSTATEs to walstate's hierarchy:
  serialization failures, deadlocks and lock timeouts are
  :class:`DatabaseBusy` (retry), a lost connection is
  :class:`DatabaseUnavailable`.

The driver is psycopg 3 (``pip install walstate[postgres]``): it is the
maintained line of psycopg, ships binary wheels (no compiler, no libpq
needed), and peewee 4 drives it natively, so a transactional step's
``step.db`` is the same peewee API on both backends.
"""

from __future__ import annotations

import functools
import math
import os
import random
import re
import select
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import peewee

from .connection import _ABANDONED, WriteLocked
from .types import Durability
from .errors import (
    ConfigurationError,
    DatabaseBusy,
    DatabaseError,
    DatabaseFull,
    DatabaseUnavailable,
    WriteFailed,
)
from .pg_schema import channel, ensure_pg_schema, lock_key, walstate_schema
from .targets import is_postgres_url, redact
from .operations import SqlOperations
from .reads import Reader
from .writepath import Conn, WritePath

try:
    import psycopg
    from psycopg.pq import TransactionStatus
except ImportError:  # pragma: no cover - the extra is not installed
    psycopg = None  # type: ignore[assignment]

class Native(str):
    """A statement already in PostgreSQL's dialect: :class:`PgConn` runs it as it is."""

    __slots__ = ()


_JSON_EACH = re.compile(r"json_each\(\?\)")
_IS_PARAM = re.compile(r"\bIS \?")
_INDEXED_BY = re.compile(r"\bINDEXED BY \w+ ")


@functools.lru_cache(maxsize=1024)
def pg_sql(sql: str) -> str:
    """``sql`` (in the dialect walstate's statements share) spelled for PostgreSQL.

    The statements are walstate's own constants, never data: a small, closed
    set of rewrites suffices, and each statement is rewritten once (cached).
    """
    sql = _JSON_EACH.sub("json_array_elements_text(?::json) AS je(value)", sql)
    sql = _IS_PARAM.sub("IS NOT DISTINCT FROM ?", sql)
    sql = _INDEXED_BY.sub("", sql)
    return sql.replace("?", "%s")


def qmark_to_format(sql: str) -> str:
    """An application's statement with ``?`` placeholders in psycopg's ``%s`` style.

    ``?`` inside quotes ('…', "…") is left alone; every ``%`` is doubled, since
    psycopg reads ``%`` as a placeholder anywhere in a statement with parameters.
    """
    out: list[str] = []
    quote = ""
    for ch in sql:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "?":
            out.append("%s")
            continue
        out.append("%%" if ch == "%" else ch)
    return "".join(out)


class PgConn:
    """A psycopg connection seen through the part of sqlite3's API walstate's storage uses."""

    __slots__ = ("conn",)

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        # None, not (), without parameters: psycopg then reads no % as a placeholder (LIKE 'a%').
        return self.conn.execute(sql if isinstance(sql, Native) else pg_sql(sql), tuple(params) or None)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any:
        cur = self.conn.cursor()
        cur.executemany(sql if isinstance(sql, Native) else pg_sql(sql), rows)
        return cur

    @property
    def in_transaction(self) -> bool:
        # A lost connection has no transaction left to roll back (the server ended it).
        if self.conn.broken or self.conn.closed:
            return False
        return bool(self.conn.info.transaction_status != TransactionStatus.IDLE)


def _driver_errors() -> tuple[type[BaseException], ...]:
    return (peewee.PeeweeException,) if psycopg is None else (psycopg.Error, peewee.PeeweeException)


class _ThreadToken:
    """Dies with the thread-local state of the thread that opened a connection."""

    __slots__ = ("__weakref__",)


class WalstatePgDatabase(WriteLocked, peewee.PostgresqlDatabase):
    """peewee's PostgreSQL database (psycopg 3, autocommit between transactions) with walstate's write lock."""

    dialect = "postgresql"
    begin_write = "BEGIN"
    driver_errors = _driver_errors()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_lock()
        self._wrapped = threading.local()
        # Connections of threads that ended, for the next thread: every run has
        # threads of its own, and a new PostgreSQL session per thread would cost
        # a server process and a handshake each time.
        self._idle: list[Any] = []
        self._pool_lock = threading.Lock()
        self._shut = False

    def _connect(self) -> Any:
        conn = None
        with self._pool_lock:
            while self._idle and conn is None:
                candidate = self._idle.pop()
                if not candidate.closed and candidate.info.transaction_status == TransactionStatus.IDLE:
                    conn = candidate
                else:
                    candidate.close()
        if conn is None:
            conn = super()._connect()  # type: ignore[misc]
            if self._idle_limit_ms:
                self._set_idle_limit(conn, self._idle_limit_ms)
        # The token lives as long as this thread's peewee state: when the thread
        # ends, the finalizer hands its connection to the pool (or closes it).
        token = self._wrapped.token = _ThreadToken()
        weakref.finalize(token, self._give_back, conn, os.getpid())
        return conn

    def _give_back(self, conn: Any, pid: int) -> None:
        if pid != os.getpid():
            _ABANDONED.append(conn)  # inherited across fork: the parent's session
            return
        with self._pool_lock:
            if self._shut or conn.closed:
                conn.close()
            else:
                self._idle.append(conn)

    def close_pool(self) -> None:
        """Close the idle connections; connections of threads still alive close when they end."""
        with self._pool_lock:
            self._shut = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    #: idle_in_transaction_session_timeout of walstate's sessions, in ms (0: the server's setting).
    _idle_limit_ms = 0

    def limit_idle_transactions(self, seconds: float) -> None:
        """Set ``idle_in_transaction_session_timeout`` of every session of this database to ``seconds``.

        A process stopped inside a transaction (SIGSTOP, a debugger, a paused
        VM) holds its row and advisory locks until the server ends its
        session, and PostgreSQL never does that by itself. Applied to this
        thread's session and the pooled ones now, and to every session opened later.
        """
        ms = max(1, math.ceil(seconds * 1000))
        with self._pool_lock:  # the pooled sessions are no thread's while they are in the pool
            self._idle_limit_ms = ms
            for conn in self._idle:
                if not (conn.closed or conn.broken):
                    self._set_idle_limit(conn, ms)
        if not self.is_closed() and self.transaction_depth() == 0:
            self._set_idle_limit(self.connection(), ms)

    @staticmethod
    def _set_idle_limit(conn: Any, ms: int) -> None:
        conn.execute("SELECT set_config('idle_in_transaction_session_timeout', %s, false)", (f"{ms}ms",))

    def raw(self) -> PgConn:
        conn = self.connection()
        if (conn.broken or conn.closed) and self.transaction_depth() == 0:
            # The server restarted or dropped this session: start a new one (no
            # transaction of ours was open, so nothing is lost by it).
            self.close()
            conn = self.connection()
        wrapped: PgConn | None = getattr(self._wrapped, "conn", None)
        if wrapped is None or wrapped.conn is not conn:
            wrapped = self._wrapped.conn = PgConn(conn)
        return wrapped

    def translate(self, exc: BaseException, where: str, doing: str) -> DatabaseError:
        return translate(exc, where, doing)

    def after_fork_in_child(self) -> None:
        super().after_fork_in_child()
        self._wrapped = threading.local()
        # No lock here: a parent's thread may have held it at fork(). The idle
        # sessions are the parent's: parked, never closed from the child.
        _ABANDONED.extend(self._idle)
        self._idle = []
        self._pool_lock = threading.Lock()

    def portable(self, sql: str) -> str:
        return qmark_to_format(sql)

    def transient(self, exc: BaseException) -> str | None:
        cause = _cause(exc)
        if str(getattr(cause, "sqlstate", "") or "") in _RETRY:
            return "busy"
        conn = getattr(self, "_state").conn  # this thread's session, as peewee keeps it
        if psycopg is not None and isinstance(cause, psycopg.OperationalError) and (
                conn is None or _connection_lost(cause, conn)):
            return "lost"
        return None


# SQLSTATE classes and codes (PostgreSQL's Appendix A).
_RETRY = {"40001": "serialization failure", "40P01": "deadlock", "55P03": "lock not available",
          "57014": "statement timeout"}


def _cause(exc: BaseException) -> BaseException:
    """The driver's own error behind ``exc`` (peewee re-raises it as its own, with the original as its first argument)."""
    seen = 0
    while isinstance(exc, peewee.PeeweeException) and seen < 5:  # peewee may wrap a wrapped error again
        inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else None
        orig = getattr(exc, "orig", None)  # peewee keeps the driver's error here
        found = exc.__cause__ or (orig if isinstance(orig, BaseException) else None) or inner or exc.__context__
        if found is None:
            break
        exc, seen = found, seen + 1
    return exc


def translate(exc: BaseException, where: str, doing: str) -> DatabaseError:
    """Map a psycopg (or peewee-wrapped) error to walstate's hierarchy, with an actionable message."""
    cause = _cause(exc)
    code = str(getattr(cause, "sqlstate", "") or "")
    # One line: libpq's messages span lines ("...Connection refused\n\tIs the server running...").
    text = " ".join(str(cause).split())
    if code in _RETRY:
        return DatabaseBusy(f"{where}: {_RETRY[code]} ({text}) while {doing}; retry", where)
    if code == "25P03":
        return DatabaseUnavailable(
            f"{where}: the server ended the session ({text}) while {doing}: a transaction stayed idle (no statement "
            "sent) for longer than idle_in_transaction_session_timeout, which walstate sets to the engine's lease plus "
            "ownership.HUNG_GRACE so that a stopped process releases its locks; keep transactional steps short", where)
    if code == "53100":
        return DatabaseFull(f"{where}: the server's disk is full ({text}) while {doing}; free space and retry", where)
    low = text.lower()
    # At connect time psycopg often has no SQLSTATE: the server's words tell a refused login
    # or a missing database from a server that cannot be reached.
    if code.startswith("28") or "authentication failed" in low or "no pg_hba.conf entry" in low:
        return DatabaseUnavailable(f"{where}: the server refused the login ({text}) while {doing}; check the URL's "
                                   "user and password (percent-encode ':' '@' '/' in it), or PGPASSWORD/.pgpass", where)
    if code == "3D000" or ("database" in low and "does not exist" in low):
        return DatabaseUnavailable(f"{where}: no such database ({text}) while {doing}; create it (CREATE DATABASE) "
                                   "or fix the URL's database name", where)
    if code in ("42501", "25006"):
        return DatabaseUnavailable(f"{where}: the server refused this ({text}) while {doing}; the role needs "
                                   "CREATE on the schema to make walstate's tables, then SELECT, INSERT, UPDATE and "
                                   "DELETE on them", where)
    if code.startswith(("08", "57P", "53")) or (psycopg is not None and isinstance(cause, psycopg.OperationalError)):
        what = "cannot connect to the PostgreSQL server" if doing == "connecting" else \
            "cannot reach the PostgreSQL server or lost the session"
        return DatabaseUnavailable(
            f"{where}: {what} ({text}) while {doing}; check the URL's host and port, and that the server runs "
            "and accepts connections from this host", where)
    return WriteFailed(f"{where}: PostgreSQL error while {doing}: {text}", where)


def open_pg_database(url: str, *, busy_timeout: float = 5.0, readonly: bool = False) -> WalstatePgDatabase:
    """Connect to the PostgreSQL database at ``url``; raise a typed error naming it (password redacted)."""
    where = redact(url)
    if psycopg is None:
        raise ConfigurationError(f"{where}: PostgreSQL needs the psycopg driver: pip install 'walstate[postgres]'")
    if busy_timeout < 0:
        raise ConfigurationError("busy_timeout must be >= 0 seconds")
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    # lock_timeout is SQLite's busy_timeout: how long a write waits for a row
    # another transaction holds before it gives up with DatabaseBusy.
    options = f"-c lock_timeout={int(busy_timeout * 1000)}"
    if readonly:
        options += " -c default_transaction_read_only=on"
    db = WalstatePgDatabase(url, prefer_psycopg3=True,
                            **session_params(url, "walstate", options, connect_timeout=max(1, int(busy_timeout) or 1)))
    try:
        db.connect(reuse_if_open=True)
    except BaseException as exc:
        db.close()
        if not isinstance(exc, db.driver_errors):
            raise
        error = translate(exc, where, "connecting")
        scrubbed = _scrub(str(error), url)
        if scrubbed == str(error):
            # The message holds the driver's words: no chained psycopg traceback under it (the
            # driver's error stays reachable as __context__).
            raise error from None
        # The driver quoted part of a password it misparsed (an unencoded '@'): neither the message
        # nor the chained driver error may show it.
        raise type(error)(scrubbed, where) from None
    return db


def _scrub(text: str, url: str) -> str:
    """``text`` with the URL's password, and the pieces an unencoded ``@`` would split it into, masked."""
    userinfo = urllib.parse.urlsplit(url).netloc.rpartition("@")[0]
    password = urllib.parse.unquote(userinfo.partition(":")[2])
    for piece in sorted({password, *password.split("@"), *password.split(":")}, key=len, reverse=True):
        if len(piece) >= 3:  # shorter pieces would mask ordinary words of the message
            text = text.replace(piece, "***")
    return text


def session_params(url: str, application_name: str, options: str = "", connect_timeout: int = 5) -> dict[str, Any]:
    """Keyword arguments for psycopg.connect beside ``url``, keeping what the URL itself asks for.

    Keyword arguments override the URL's own parameters, so the URL's
    ``options`` (``-c search_path=...``) are kept before walstate's, and its
    ``application_name`` and ``connect_timeout`` win over walstate's defaults.
    """
    from psycopg.conninfo import conninfo_to_dict

    given = conninfo_to_dict(url)
    return {
        "options": " ".join(o for o in (str(given.get("options") or ""), options) if o),
        "application_name": given.get("application_name") or application_name,
        "connect_timeout": given.get("connect_timeout") or connect_timeout,
    }


def _connection_lost(exc: BaseException, conn: Any) -> bool:
    """Whether ``exc`` means the session is gone (the server ended it, or the network did)."""
    code = str(getattr(exc, "sqlstate", "") or "")
    return bool(conn.broken or conn.closed or code.startswith(("08", "57P")))


# LISTEN/NOTIFY channels and advisory locks are per database: walstate scopes both to the schema
# that holds its tables (pg_schema.channel, pg_schema.lock_key), so apps in two schemas of one
# database neither wake each other's workers nor serialise their claims on one lock.
_NOTIFY = Native("SELECT pg_notify(%s, '')")


class _Side:
    """One extra session per process that listens for wake-ups; also reads the server's clock.

    Kept apart from the connections of writers and handlers, so a listener is
    never inside someone's transaction. Reconnects on the next use after a
    failure; never used across fork (the child makes its own).
    """

    def __init__(self, url: str, where: str, listen: str = channel("public")) -> None:
        self.url = url
        self.where = where
        #: The channel this session listens on (the schema's: see pg_schema.channel).
        self.listen = listen
        self.lock = threading.Lock()
        self.conn: Any = None
        self.pid = os.getpid()

    def _connection(self) -> Any:
        if self.pid != os.getpid():
            if self.conn is not None:
                _ABANDONED.append(self.conn)  # the parent's session: never close it from here
            self.conn, self.pid = None, os.getpid()
        if self.conn is None or self.conn.closed:
            conn = psycopg.connect(self.url, autocommit=True, **session_params(self.url, "walstate-listen"))
            from psycopg import sql

            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.listen)))
            self.conn = conn
        return self.conn

    def drain(self) -> int:
        """How many notifications arrived since the last call (they coalesce; any count > 0 means 'look')."""
        with self.lock:
            try:
                conn = self._connection()
                # A poll of the socket first: idle workers ask 50 times a second, and
                # psycopg's notifies() costs far more than select() when nothing came.
                # (This session runs no other query, so no notification can have
                # arrived with a query's result instead.)
                if not select.select([conn.fileno()], [], [], 0)[0]:
                    return 0
                return sum(1 for _ in conn.notifies(timeout=0))
            except psycopg.Error:
                self._drop()
                return 1  # unknown: assume something happened

    def offset(self, local: Callable[[], float]) -> tuple[float, float]:
        """``(server time minus local time, round trip)`` measured now, both in seconds.

        On a short session of its own (every 30 s at most), so the listening
        session never runs a query. ``local`` is read just before and just after
        the query: the server read its clock somewhere between the two.
        """
        try:
            with psycopg.connect(self.url, autocommit=True, **session_params(self.url, "walstate-clock")) as conn:
                before = local()
                row: Any = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
                after = local()
                value = row[0]
        except psycopg.Error as exc:
            raise translate(exc, self.where, "reading the server's clock") from exc
        return float(value) - (before + after) / 2, after - before

    def _drop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg.Error:
                pass
        self.conn = None

    def close(self) -> None:
        with self.lock:
            if self.pid == os.getpid():
                self._drop()

    def after_fork_in_child(self) -> None:
        """Park the parent's session and lock (a parent's thread may have held it at fork)."""
        if self.conn is not None:
            _ABANDONED.append(self.conn)
        self.conn, self.pid, self.lock = None, os.getpid(), threading.Lock()


#: An injected clock further than this (seconds) from the server's is a simulated time, not skew.
SIMULATED = 3600.0


class ServerClock:
    """The local clock ``local`` corrected to the PostgreSQL server's clock.

    Hosts with skewed clocks must agree on when a lease expires and when a
    parked job wakes: they all compare against the server's time. Reading it
    on every call would add a round trip to every claim and heartbeat, so the
    offset (server minus local, measured at mid-round-trip) is measured at
    start and again every ``refresh`` seconds; the error is at most half a
    round trip plus the local clock's drift over ``refresh``.
    """

    def __init__(self, local: Callable[[], float],
                 measure: Callable[[Callable[[], float]], tuple[float, float]], refresh: float = 30.0) -> None:
        self.local = local
        self._measure = measure
        self.refresh = refresh
        self._lock = threading.Lock()
        self.offset = 0.0
        self._next = 0.0
        self.measure()

    def measure(self) -> None:
        """Measure the offset to the server again now."""
        offset, rtt = self._measure(self.local)
        # An offset within the round trip is measurement noise, not skew (a
        # server on this very host): the local clock is kept as it is then.
        self.offset = 0.0 if abs(offset) <= max(rtt, 0.002) else offset
        self._next = time.monotonic() + self.refresh

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    def __call__(self) -> float:
        if time.monotonic() >= self._next and self._lock.acquire(blocking=False):
            try:
                self.measure()
            except DatabaseError:
                self._next = time.monotonic() + 1.0  # keep the last offset; try again soon
            finally:
                self._lock.release()
        return self.local() + self.offset


class PgReader(Reader):
    """The readers, with wake-ups from ``LISTEN`` in place of SQLite's ``PRAGMA data_version``."""

    #: Polling fallback: data_version changes at least this often even if no notification came.
    FALLBACK = 1.0

    def __init__(self, db: WalstatePgDatabase, path: str, side: _Side) -> None:
        super().__init__(db, path)
        self._side = side
        self._version = 0
        self._next_fallback = time.monotonic() + self.FALLBACK

    def data_version(self) -> int:
        """A number that changes when another process may have made work claimable (or once a second)."""
        if self._side.drain() or time.monotonic() >= self._next_fallback:
            self._version += 1
            self._next_fallback = time.monotonic() + self.FALLBACK
        return self._version


class PgWritePath(WritePath):
    """The write path with PostgreSQL's row locks, claims that skip locked rows, and NOTIFY on wake-ups."""

    # A step's compare-and-set locks its job row (FOR SHARE): a claim of the job
    # (which updates that row) waits for this commit, or this change waits for
    # the claim and then finds the epoch moved on. Without it, READ COMMITTED
    # would let a superseded run's step change commit beside a new claim.
    _UPDATE_STEP = (
        "UPDATE walstate_step SET state=?, attempt=?, failures=?, interruptions=?, output=?, error=?, updated_at=?, "
        "wake_at=?, wait_topic=? "
        "WHERE id=? AND state=? AND EXISTS (SELECT 1 FROM walstate_job WHERE id=? AND owner IS ? AND epoch=? FOR SHARE)"
    )
    _READ_CONTEXT = "SELECT context FROM walstate_job WHERE id=? FOR UPDATE"
    _LOCK_JOB = "SELECT state FROM walstate_job WHERE id=? FOR UPDATE"
    _OWNED = "SELECT 1 FROM walstate_job WHERE id=? AND owner IS ? AND epoch=? FOR UPDATE"
    _RUNNABLE = Native(
        "SELECT id, state, epoch, workflow, owner FROM walstate_job "
        "WHERE state IN ('pending', 'running') AND workflow IN (SELECT json_array_elements_text(%s::json)) "
        "AND id NOT IN (SELECT json_array_elements_text(%s::json)::bigint) "
        "AND ((owner IS NULL AND (wake_at IS NULL OR wake_at <= %s)) "
        "OR (id, epoch) IN (SELECT (d->>0)::bigint, (d->>1)::bigint FROM json_array_elements(%s::json) AS d)) "
        "AND (NOT EXISTS (SELECT 1 FROM json_array_elements_text(%s::json)) "
        "OR workflow || '@' || CAST(version AS TEXT) IN (SELECT json_array_elements_text(%s::json))) "
        "ORDER BY updated_at, id LIMIT %s FOR UPDATE SKIP LOCKED"
    )

    #: Row by row: a multi-row UPDATE … FROM (VALUES …) would need a cast per column, and a
    #: round trip to the server, not the GIL, is what a statement costs here.
    _MULTI_ROW = False

    #: Attempts of a batch that PostgreSQL aborted as a serialization failure or a deadlock.
    ATTEMPTS = 4
    #: A creation in a shared batch could not be settled after a lost connection (_landed
    #: reads changes, and a creation has none): each keeps a transaction of its own.
    _GROUP_CREATES = False
    #: Nor a batch claim: it takes an advisory lock for per-workflow limits, and _landed could not
    #: tell whether a claim in a batch whose session was lost committed.
    _GROUP_CLAIMS = False

    #: How long (seconds) a batch whose session was lost keeps trying to reach the server again
    #: (a restart or a failover) before its callers get DatabaseUnavailable.
    RECONNECT = 30.0

    def _write_batch(self, batch: list[Any]) -> None:
        """The batch in one transaction: written again when the server aborted it or the session was lost.

        A deadlock or serialization failure rolled everything back: the batch is
        written again (its changes are compare-and-sets, safe to repeat). A
        session lost during the transaction, COMMIT included, leaves the
        outcome unknown: on a new session each request's rows are read again; a
        request whose changes are there is done, and the others are written
        again (a superseded run's compare-and-set then misses, as it would have).
        So a server restart or failover of up to :attr:`RECONNECT` seconds
        costs the run a wait, not an interrupted attempt.
        """
        pending = list(batch)
        aborted = 0
        deadline: float | None = None
        while True:
            for r in pending:
                r.error = None
            try:
                super()._write_batch(pending)
                return
            except (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected):
                aborted += 1
                if aborted == self.ATTEMPTS:
                    raise
                time.sleep(random.uniform(0, 0.002 * 2 ** aborted))  # apart, so the two do not meet again
                continue
            except (psycopg.OperationalError, peewee.OperationalError) as exc:
                # A session lost in the batch, or one that could not be opened at all (the server
                # restarting: peewee wraps that error). Not self.db.connection(): it would connect.
                if self.db.transient(exc) != "lost":
                    raise
                lost: BaseException = exc
            self.db.close()
            deadline = time.monotonic() + self.RECONNECT if deadline is None else deadline
            while True:  # learn what landed, on a new session, as soon as the server answers
                try:
                    conn = self.db.raw()
                    pending = [r for r in pending if not all(self._landed(conn, c) for c in r.changes)]
                    break
                except (psycopg.OperationalError, peewee.OperationalError) as exc:
                    self.db.close()
                    lost = exc
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(0.1)
            if not pending:
                return
            if time.monotonic() >= deadline:
                for r in pending:
                    r.error = translate(lost, self.path, f"committing a state change (the connection was lost and "
                                                         f"not regained within {self.RECONNECT:g}s; it was not written)")
                return

    def _landed(self, conn: Conn, c: Any) -> bool:
        """Whether change ``c`` is in the database (read after a lost connection)."""
        if c.expected == c.new:
            return False  # not tellable from the row: report it as not written (the run retries it)
        job = conn.execute("SELECT state, epoch FROM walstate_job WHERE id=?", (c.job_id,)).fetchone()
        if job is None:
            return False
        if c.kind == "job":
            return bool(job[0] == c.new and job[1] == (c.epoch + 1 if c.release else c.epoch))
        step = conn.execute("SELECT state, attempt FROM walstate_step WHERE id=?", (c.row_id,)).fetchone()
        return step is not None and job[1] == c.epoch and (step[0], step[1]) == (c.new, c.attempt)

    def create_job(self, workflow: str, key: str | None, context: str, steps: Sequence[tuple[str, str, int]],
                   version: int = 1, fingerprint: str | None = None) -> tuple[int, str | None]:
        try:
            return super().create_job(workflow, key, context, steps, version, fingerprint)
        except WriteFailed as exc:
            if not isinstance(exc.__cause__, psycopg.errors.UniqueViolation):
                raise
            # Another submit of the same key committed between our look and our
            # insert (READ COMMITTED): now the look finds its job.
            return super().create_job(workflow, key, context, steps, version, fingerprint)

    def create_scheduled(self, schedule: str, slot: float, workflow: str, key: str, context: str,
                         steps: Sequence[tuple[str, str, int]], version: int = 1,
                         fingerprint: str | None = None) -> int | None:
        try:
            return super().create_scheduled(schedule, slot, workflow, key, context, steps, version, fingerprint)
        except WriteFailed as exc:
            if not isinstance(exc.__cause__, psycopg.errors.UniqueViolation):
                raise
            # A submit of the same key committed between our look and our insert (as in create_job).
            return super().create_scheduled(schedule, slot, workflow, key, context, steps, version, fingerprint)

    #: The schema's channel and claim-lock key (PgStore sets them with scope()).
    _channel = channel("public")
    _claim_lock = lock_key("claims", "public")

    def scope(self, schema: str) -> None:
        """Send wake-ups on, and serialise limited claims by, the channel and lock of ``schema``."""
        self._channel = channel(schema)
        self._claim_lock = lock_key("claims", schema)

    def transient_refusal(self, exc: BaseException) -> DatabaseError | None:
        # A session the server ended because its transaction stayed idle too long (25P03) is not run
        # again: the handler that paused that long would pause as long the next time.
        cause = _cause(exc.__cause__ if isinstance(exc, DatabaseError) and exc.__cause__ is not None else exc)
        if str(getattr(cause, "sqlstate", "") or "") == "25P03":
            return None
        return super().transient_refusal(exc)

    def limit_idle_transactions(self, seconds: float) -> None:
        """Have the server end a session whose transaction stays idle for ``seconds`` (a process stopped inside one)."""
        if isinstance(self.db, WalstatePgDatabase):
            self.db.limit_idle_transactions(seconds)

    def _wake(self, conn: Conn) -> None:
        conn.execute(_NOTIFY, (self._channel,))

    def _lock_claims(self, conn: Conn) -> None:
        conn.execute(Native("SELECT pg_advisory_xact_lock(%s)"), (self._claim_lock,))


class PgStore(SqlOperations):
    """Everything ``statemachine/`` needs from one PostgreSQL database (the storage contract).

    ``durability`` is accepted for the same signature as the SQLite store;
    on PostgreSQL, what a commit survives is the server's setting
    (``synchronous_commit``, on by default: a commit is on disk, and on a
    synchronous standby if one is configured, before it returns).
    ``busy_timeout`` becomes ``lock_timeout``. ``sync_interval`` is SQLite's
    only and ignored here. ``database_id`` is for tests, as for SQLite.
    """

    db: WalstatePgDatabase

    def __init__(
        self,
        url: str,
        *,
        durability: Durability = "normal",
        busy_timeout: float = 5.0,
        readonly: bool = False,
        group_commit: bool = True,
        sync_interval: float | None = None,
        database_id: str | None = None,
    ) -> None:
        if durability not in ("normal", "full"):
            raise ConfigurationError(f"durability must be 'normal' or 'full', not {durability!r}")
        self.url = url
        self.path = redact(url)
        self.durability = durability
        self.readonly = readonly
        self.syncer = None
        self.db = open_pg_database(url, busy_timeout=busy_timeout, readonly=readonly)
        self._side = _Side(url if not url.startswith("postgres://") else "postgresql://" + url[11:], self.path)
        try:
            schema = ensure_pg_schema(self.db.connection(), self.path, create=not readonly, database_id=database_id)
            if database_id is not None and schema.database_id != database_id:
                raise ConfigurationError(f"{self.path}: this database's id is {schema.database_id!r}, not "
                                         f"{database_id!r}; an existing database keeps its id (use a new one)")
            self.database_id = schema.database_id
            self.migrated = schema.applied
            #: The schema of the search_path that holds walstate's tables: it scopes wake-ups and locks.
            self.schema = walstate_schema(self.db.connection()) or "public"
            self._side.listen = channel(self.schema)
            self.clock = ServerClock(time.time, self._side.offset)
            #: What leases are set and judged with: the server's clock followed on this host's monotonic
            #: clock, so a step of this host's wall clock moves no lease (see :mod:`.leaseclock`).
            self.lease_clock = ServerClock(time.monotonic, self._side.offset)
        except BaseException:
            self.db.close()
            self._side.close()
            raise
        self.read = PgReader(self.db, self.path, self._side)
        self.write = PgWritePath(self.db, self.path, group_commit=group_commit, clock=self.clock,
                                 lease_clock=self.lease_clock)
        self.write.scope(self.schema)
        from .store import _stores

        _stores.add(self)

    def synced(self, local: Callable[[], float]) -> Callable[[], float]:
        """``local`` corrected to the server's clock: what wake-ups and schedules are measured with (leases: ``lease_clock``).

        For the default ``time.time`` the offset is measured again every 30 s.
        A clock an application injects is corrected once, when the engine
        starts: its skew is taken out and the jumps it makes later are kept
        (measuring again would undo them). An injected clock more than
        :data:`SIMULATED` seconds off the server's is not a skewed clock but a
        test's simulated time (a date to run schedules at): it is used as it is.
        """
        if local is time.time:
            return self.clock
        corrected = ServerClock(local, self._side.offset, refresh=math.inf)
        return local if abs(corrected.offset) > SIMULATED else corrected

    def close(self) -> None:
        """Close this thread's connection and the listener (other threads' connections close when they end)."""
        self._side.close()
        if not self.db.is_closed():
            self.db.close()
        self.db.close_pool()

    def _after_fork_in_child(self) -> None:
        self.db.after_fork_in_child()
        self.write.after_fork_in_child()
        self._side.after_fork_in_child()
        self.clock.after_fork_in_child()
        self.lease_clock.after_fork_in_child()



class _RawConn(PgConn):
    """:class:`PgConn` over an autocommit session, with the ``close``/``commit`` a DB-API caller expects."""

    __slots__ = ()

    def close(self) -> None:
        self.conn.close()

    def commit(self) -> None:
        """Nothing to do: autocommit."""

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def raw_connection(target: str, timeout: float = 5.0) -> Any:
    """A plain autocommit connection to ``target`` with sqlite3's small API (``?`` placeholders)."""
    url = "postgresql://" + target.split("://", 1)[1]
    return _RawConn(psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout))))


__all__ = ["PgStore", "raw_connection", "ServerClock", "WalstatePgDatabase", "is_postgres_url", "pg_sql", "redact", "translate"]
