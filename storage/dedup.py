"""A bounded, thread-safe "seen recently" set, and the guarded UPDATE it pairs with.

The seed's lazy backfill fired the same idempotent UPDATE on every request
until a read saw the new value. Two complementary fixes live here: the
database guard (:func:`guarded_update`) makes a redundant write change
nothing, and :class:`Deduper` keeps it from reaching SQLite at all. The cache
is bounded by construction (``max_entries``, oldest evicted first) and
forgets keys after ``ttl`` seconds, so it cannot grow with the key stream.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from .errors import ConfigurationError

# \Z, not $: "$" also matches before a trailing newline, which would let "tenant\n" through.
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Deduper:
    """Run an idempotent write once per key per ``ttl`` seconds, in bounded memory.

    :meth:`run_once` calls ``fn`` the first time a key is seen within its TTL
    and returns whether it ran. Concurrent callers with the same key wait for
    the one running ``fn``. If ``fn`` raises, the key is not recorded, so the
    next call tries again; given ``conn=`` (the connection ``fn`` writes on),
    neither is it while ``conn`` is still inside a transaction after ``fn``:
    a write that has not committed (and may yet roll back) is not done.
    ``clock`` is injectable for tests (monotonic seconds).
    """

    def __init__(self, max_entries: int = 1000, ttl: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ConfigurationError(f"Deduper max_entries must be >= 1, not {max_entries}")
        if ttl <= 0:
            raise ConfigurationError(f"Deduper ttl must be > 0 seconds, not {ttl}")
        self.max_entries = max_entries
        self.ttl = ttl
        self._clock = clock
        # key -> expiry; insertion order is age order because every entry gets
        # the same ttl, so both eviction and expiry pop from the front in O(1).
        self._seen: OrderedDict[Hashable, float] = OrderedDict()
        self._running: dict[Hashable, threading.Event] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._seen)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            self._expire(self._clock())
            return key in self._seen

    def _expire(self, now: float) -> None:
        seen = self._seen
        while seen:
            key, expiry = next(iter(seen.items()))
            if expiry > now:
                break
            seen.popitem(last=False)

    def run_once(self, key: Hashable, fn: Callable[[], Any], *, conn: Any = None) -> bool:
        """Call ``fn`` unless ``key`` was done within the TTL; return whether it ran.

        The key is recorded only when ``fn`` returned and, if ``conn`` is
        given, ``conn`` has no transaction open (its write is committed).
        """
        while True:
            with self._lock:
                self._expire(self._clock())
                if key in self._seen:
                    return False
                running = self._running.get(key)
                if running is None:
                    running = self._running[key] = threading.Event()
                    break
            # Someone else is running fn for this key: wait, then look again
            # (recorded if it succeeded; ours to try if it raised).
            running.wait()
        try:
            fn()
        except BaseException:
            with self._lock:
                del self._running[key]
            running.set()
            raise
        if conn is not None and getattr(conn, "in_transaction", False):
            # Not committed: the next call tries again (a guarded write then changes nothing twice).
            with self._lock:
                del self._running[key]
            running.set()
            return True
        with self._lock:
            self._seen[key] = self._clock() + self.ttl
            self._seen.move_to_end(key)
            while len(self._seen) > self.max_entries:
                self._seen.popitem(last=False)
            del self._running[key]
        running.set()
        return True

    def forget(self, key: Hashable) -> None:
        """Drop ``key`` so the next :meth:`run_once` runs again."""
        with self._lock:
            self._seen.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()


def _ident(name: str) -> str:
    if not _IDENT.match(name):
        raise ConfigurationError(f"{name!r} is not a plain SQL identifier (letters, digits, underscore)")
    return f'"{name}"'


def guarded_update(conn: sqlite3.Connection, table: str, values: Mapping[str, Any],
                   where: Mapping[str, Any]) -> int:
    """``UPDATE table SET values WHERE where`` and return how many rows changed.

    ``where`` holds the row's key *and* the state it must still be in: a
    ``None`` value matches NULL (``IS``), so ``{"id": 7, "phase": None}``
    changes tenant 7 only while its phase is still missing, and a repeated
    call changes 0 rows. Identifiers must be plain names; values are always
    bound as parameters.

    It commits the transaction its ``UPDATE`` opened (Python's ``sqlite3`` in
    its default mode opens one before any ``UPDATE``), so the row is stored
    when it returns. Inside a transaction the caller had already opened it
    commits nothing: that transaction is the caller's to commit or roll back.
    """
    if not values or not where:
        raise ConfigurationError("guarded_update needs at least one value to set and one condition")
    sets = ", ".join(f"{_ident(k)}=?" for k in values)
    conds = " AND ".join(f"{_ident(k)} IS ?" for k in where)
    sql = "UPDATE " + _ident(table) + " SET " + sets + " WHERE " + conds
    own = not conn.in_transaction
    changed = int(conn.execute(sql, (*values.values(), *where.values())).rowcount)
    if own and conn.in_transaction:
        conn.commit()
    return changed
