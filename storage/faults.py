"""Named fault points on the write path, and the injector that arms them.

Library code calls :func:`point` at each place a crash is interesting (before
BEGIN, after the UPDATE, after COMMIT ...). With no injector installed that is
one global read and a comparison, so production pays nothing measurable.

Tests (and :mod:`walstate.testing`) install an :class:`Injector` that
counts hits per point and, at the planned hit, raises :class:`InjectedCrash`
or kills the process with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from .errors import InjectedCrash

#: Every fault point the library declares, in the order a step meets them.
POINTS: tuple[str, ...] = (
    "before_begin",
    "after_update",
    "after_journal",
    "before_commit",
    "after_commit",
    "handler_before_effect",
    "handler_after_effect",
    "before_once_record",
    "after_once_record",
    "before_consume",
    "after_consume",
)

_injector: Injector | None = None


def point(name: str) -> None:
    """Mark fault point ``name``; crashes here if an armed injector says so."""
    injector = _injector
    if injector is not None:
        injector.hit(name)


@dataclass(frozen=True)
class Crash:
    """Crash at the ``nth`` (1-based) hit of fault point ``point``."""

    point: str
    nth: int

    def __post_init__(self) -> None:
        if self.point not in POINTS:
            raise ValueError(f"unknown fault point {self.point!r}; known: {', '.join(POINTS)}")
        if self.nth < 1:
            raise ValueError("nth counts hits from 1")


class Injector:
    """Counts hits per fault point and fires one planned crash.

    ``mode="raise"`` raises :class:`InjectedCrash` (in-process tests);
    ``mode="kill"`` sends SIGKILL to this process (real-crash tests). With no
    crash planned it only counts, which is how a sweep learns every reachable
    (point, hit) pair.
    """

    def __init__(self, crash: Crash | None = None, mode: Literal["raise", "kill"] = "raise") -> None:
        self.crash = crash
        self.mode = mode
        self.hits: Counter[str] = Counter()
        self.fired = False
        self._lock = threading.Lock()

    def hit(self, name: str) -> None:
        with self._lock:
            self.hits[name] += 1
            fire = (
                not self.fired
                and self.crash is not None
                and self.crash.point == name
                and self.hits[name] == self.crash.nth
            )
            if fire:
                self.fired = True
        if fire:
            if self.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise InjectedCrash(name, self.hits[name])

    def __enter__(self) -> Injector:
        install(self)
        return self

    def __exit__(self, *exc: object) -> None:
        install(None)


def install(injector: Injector | None) -> None:
    """Install ``injector`` process-wide (``None`` disarms every point)."""
    global _injector
    _injector = injector
