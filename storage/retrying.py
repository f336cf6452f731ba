"""Transient refusals are the library's to retry: a busy or locked database, a serialization failure, a lost session.

A write refused for a transient reason is written again, here, instead of
reaching the caller:

* a write a run's claim fences (a sub-step's move, a ``once()`` record, a
  consumed message, a park, a release) keeps trying for
  ``WritePath.claim_patience`` seconds (the engine's: for as long as it
  takes): every attempt is still conditioned on the run's owner and epoch,
  so it either lands under the claim or fails with :class:`LeaseLost`;
* any other write (a submit, a send, a cancel request, a claim) keeps
  trying for ``WritePath.patience`` seconds, then raises the typed error
  (:class:`DatabaseBusy`) saying how long it waited;
* :meth:`Perseverance.stop` (the engine closing) ends every wait at once.

Two kinds of refusal: ``"busy"`` (nothing was written: always safe to write
again) and ``"lost"`` (the session went away, perhaps during COMMIT: the
outcome is unknown, so only writes that are safe to repeat retry it).
Nothing is retried inside a transaction the caller opened (``db.atomic()``):
that transaction is the caller's to end. A transactional step's transaction
is walstate's: refused before its COMMIT (the session lost, a deadlock, a
lock timeout, inside the handler or after it), it rolled back whole, and the
step is written again, its handler run again in a new transaction
(``WritePath.commit``).

Logged on ``walstate.storage``: a WARNING when a write starts waiting, and
one when it lands after waiting (or gives up).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from .errors import DatabaseError
from .types import DEFAULT_HOLD_WARNING, DEFAULT_PATIENCE

log = logging.getLogger("walstate.storage")


def fields(job: int | None = None, step: str | None = None) -> dict[str, Any]:
    """The ``extra`` fields every walstate log record carries (see ``walstate.log``)."""
    return {"walstate_job": job, "walstate_workflow": None, "walstate_step": step, "walstate_attempt": None}

T = TypeVar("T")
Kind = Literal["busy", "lost"]

#: The longest pause between two attempts (the first is 20 ms: 10 ms doubled for the first retry; each doubles).
MAX_PAUSE = 0.5


class Perseverance:
    """Retries transient refusals of one database's writes (see the module docstring)."""

    def __init__(self, db: Any, path: str) -> None:
        self.db = db
        self.path = path
        #: Seconds an unfenced write keeps trying; 0 (a bare store): it raises at once, as the driver did.
        self.patience = 0.0
        #: Seconds a fenced write keeps trying (the engine sets infinity: until the claim is lost or it closes).
        self.claim_patience = 0.0
        self._stop = threading.Event()

    def stop(self) -> None:
        """End every wait now and retry nothing more (the engine is closing)."""
        self._stop.set()

    def after_fork_in_child(self) -> None:
        self._stop = threading.Event()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def kind(self, exc: BaseException | None) -> Kind | None:
        """What kind of transient refusal the driver error ``exc`` is, or None for a lasting one."""
        if exc is None:
            return None
        found: Kind | None = self.db.transient(exc)
        return found

    def pause(self, tries: int, left: float) -> None:
        """Wait before attempt ``tries + 1`` (at most ``left`` seconds; at once when stopped)."""
        self._stop.wait(max(0.0, min(MAX_PAUSE, 0.01 * 2 ** min(tries, 10), left)))

    def run(self, attempt: Callable[[], T], doing: str, *, fenced: bool, lost_ok: bool = False,
            retryable: Callable[[DatabaseError], bool] | None = None, patience: float | None = None) -> T:
        """``attempt()``, tried again while it raises a transient :class:`DatabaseError`.

        ``fenced``: the write is conditioned on a run's claim (``claim_patience``
        applies, else ``patience``). ``lost_ok``: repeating it after a lost
        session is safe. ``retryable(error)``, asked after a failure, may forbid a
        retry (a transactional step's COMMIT whose outcome is unknown). ``patience``
        overrides how long this one write keeps trying.
        """
        if patience is None:
            patience = self.claim_patience if fenced else self.patience
        began: float | None = None
        tries = 0
        while True:
            try:
                result = attempt()
            except DatabaseError as exc:
                kind = self.kind(exc.__cause__)
                if (kind is None or (kind == "lost" and not lost_ok) or self.db.transaction_depth() > 0
                        or (retryable is not None and not retryable(exc))):
                    raise
                now = time.monotonic()
                began = now if began is None else began
                waited = now - began
                if self._stop.is_set() or waited >= patience:
                    if tries == 0 and patience == 0:
                        raise
                    log.warning("%s: gave up %s after %d attempts over %.1fs (%s)", self.path, doing, tries + 1,
                                waited, exc, extra=fields())
                    raise type(exc)(f"{exc} (tried {tries + 1} times over {waited:.1f}s"
                                    + ("; the engine is closing)" if self._stop.is_set() else
                                       f", the patience of {patience:g}s; raise Engine(patience=...))"),
                                    exc.path) from exc.__cause__
                if kind == "lost":
                    self.db.close()  # a new session on the next attempt
                if tries == 0:
                    log.warning("%s: %s was refused (%s); trying again (%s)", self.path, doing, exc,
                                "the run keeps its claim" if fenced else f"for up to {patience:g}s", extra=fields())
                tries += 1
                self.pause(tries, patience - waited)
                continue
            if tries:
                assert began is not None
                log.warning("%s: %s written after %d attempts over %.1fs", self.path, doing, tries + 1,
                            time.monotonic() - began, extra=fields())
            return result


__all__ = ["DEFAULT_HOLD_WARNING", "DEFAULT_PATIENCE", "Perseverance", "fields"]
