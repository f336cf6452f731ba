"""The clock leases are set and judged with: one that no wall-clock step moves.

A lease is judged by processes other than its owner, so they must agree on
what time it is, and a step of one engine's wall clock (an NTP step, a
resumed VM, an application's injected ``clock=``) must not make the leases of
others look expired. So leases are never measured with an engine's clock:

- **SQLite.** Every process on one file runs on one kernel (WAL needs shared
  memory, so a file is never shared across machines), and the kernel's
  ``CLOCK_BOOTTIME`` is the same for all of them and never steps. Lease time
  is that clock plus an *anchor*, the wall-clock time of the boot as the first
  process of this boot to open the file saw it, kept in ``walstate_meta``
  (``lease_clock = "<boot id> <anchor>"``): every process of the boot reads the
  same anchor, so their lease clocks agree exactly, and stay close to Unix
  time (what ``walstate show`` prints). A later boot writes a new anchor.
- **PostgreSQL.** The server's clock, followed on this host's monotonic clock
  (see :class:`walstate.storage.postgres.ServerClock`): measured against
  ``clock_timestamp()`` at open and again every 30 s, so a step of this
  host's wall clock changes nothing.
"""

from __future__ import annotations

import time
from typing import Any

_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)
_KEY = "lease_clock"


def boottime() -> float:
    """Seconds since boot on a clock that never steps (CLOCK_BOOTTIME; monotonic where there is none)."""
    if _BOOTTIME is not None:
        return time.clock_gettime(_BOOTTIME)
    return time.monotonic()  # pragma: no cover - not Linux


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read().decode(errors="replace").strip()
    except OSError:  # pragma: no cover - not Linux
        return ""


class LeaseClock:
    """Unix-like seconds that every process of this boot on one SQLite file agrees on, and that never step."""

    def __init__(self, anchor: float) -> None:
        self.anchor = anchor

    def __call__(self) -> float:
        return self.anchor + boottime()


def sqlite_lease_clock(conn: Any, *, write: bool) -> LeaseClock:
    """The file's lease clock for this boot: its anchor read from ``walstate_meta``, written there first if ``write``.

    ``conn`` is a sqlite3 connection outside a transaction. A read-only open
    of a file that has no anchor for this boot yet anchors on its own clock
    (it sets no leases; it only shows them).
    """
    boot = _boot_id()
    found = conn.execute("SELECT value FROM walstate_meta WHERE key=?", (_KEY,)).fetchone()
    if found is not None and str(found[0]).partition(" ")[0] == boot and boot:
        return LeaseClock(float(str(found[0]).partition(" ")[2]))
    mine = time.time() - boottime()
    if not write:
        return LeaseClock(mine)
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = conn.execute("SELECT value FROM walstate_meta WHERE key=?", (_KEY,)).fetchone()
        if found is not None and str(found[0]).partition(" ")[0] == boot and boot:
            conn.execute("COMMIT")
            return LeaseClock(float(str(found[0]).partition(" ")[2]))
        conn.execute("INSERT OR REPLACE INTO walstate_meta (key, value) VALUES (?, ?)", (_KEY, f"{boot} {mine!r}"))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return LeaseClock(mine)


__all__ = ["LeaseClock", "boottime", "sqlite_lease_clock"]
