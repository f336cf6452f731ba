"""Checks of the values users hand to walstate: durations, counts, job ids and names.

One place, one wording: each check returns the value as walstate uses it or
raises a typed error (``error``, :class:`InvalidArgument` unless the caller
names another) that says which argument was wrong and what it accepts. Bad
values are refused where they come in, before anything is stored, instead of
escaping later as ``OverflowError``, ``UnicodeEncodeError`` or ``ValueError``
from the clock, a lock's wait or the database driver.
"""

from __future__ import annotations

import math
import operator
from typing import Any

from .storage.errors import InvalidArgument, UnknownJob, WalstateError

#: The longest duration walstate accepts anywhere (a sleep, a timeout, a lease, a backoff): a century.
#: Far longer than any job needs, and well inside what the clock, ``threading`` waits
#: (``threading.TIMEOUT_MAX`` is about 292 years here) and stored timestamps can hold.
MAX_SECONDS = 100 * 366 * 86400.0
#: The largest integer SQLite and PostgreSQL store (a signed 64-bit integer): ids, limits, offsets.
MAX_INT = 2**63 - 1


def seconds(value: Any, what: str, *, zero: bool = False, error: type[WalstateError] = InvalidArgument) -> float:
    """``value`` as a number of seconds: a real number, finite, > 0 (>= 0 with ``zero``), at most a century."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{what} must be a number of seconds, not {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if math.isnan(number):
        raise error(f"{what} must be a number of seconds, not NaN")
    if number < 0 or (number == 0 and not zero):
        raise error(f"{what} must be {'>= 0' if zero else '> 0'} seconds, not {value!r}")
    if number > MAX_SECONDS:
        raise error(f"{what} must be at most {MAX_SECONDS:.0f} seconds (a century), not {_short(value)}")
    return number


def ratio(value: Any, what: str, *, error: type[WalstateError] = InvalidArgument) -> float:
    """``value`` as a finite number >= 0 (a factor such as a retry's jitter)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{what} must be a number, not {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise error(f"{what} must be a finite number >= 0, not {_short(value)}")
    return float(value)


def count(value: Any, what: str, *, minimum: int = 1, maximum: int = MAX_INT,
          error: type[WalstateError] = InvalidArgument) -> int:
    """``value`` as a whole number (an ``int``, not a ``bool`` or ``2.5``) between ``minimum`` and ``maximum``."""
    if isinstance(value, bool):
        raise error(f"{what} must be a whole number, not {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise error(f"{what} must be a whole number, not {type(value).__name__} {_short(value)}") from None
    if number < minimum:
        raise error(f"{what} must be >= {minimum}, not {_short(number)}")
    if number > maximum:
        raise error(f"{what} must be <= {'2**63-1' if maximum == MAX_INT else maximum}, not {_short(number)}")
    return number


def job_id(value: Any, path: str) -> int:
    """``value`` as a job id; an id no job can have (0, negative, >= 2**63) is :class:`UnknownJob`."""
    if isinstance(value, bool):
        raise InvalidArgument(f"{path}: a job id is a whole number, not {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise InvalidArgument(f"{path}: a job id is a whole number, not {type(value).__name__} {_short(value)}") from None
    if not 1 <= number <= MAX_INT:
        raise UnknownJob(f"{path}: no job {_short(number)} (job ids are whole numbers from 1 to 2**63-1)")
    return number


def text(value: Any, what: str, *, empty: bool = False, error: type[WalstateError] = InvalidArgument) -> str:
    """``value`` as text the database can store: a ``str`` that UTF-8 can encode (no lone surrogate), no NUL."""
    if not isinstance(value, str):
        raise error(f"{what} must be a str, not {type(value).__name__} {_short(value)}")
    if not value and not empty:
        raise error(f"{what} must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(f"{what} {_short(value)} is not valid Unicode text (a lone surrogate {value[exc.start]!r} at "
                    f"position {exc.start}, as left by bytes that are not UTF-8); pass proper text") from None
    if "\x00" in value:
        raise error(f"{what} {_short(value)} contains a NUL character, which the database cannot store in text")
    return value


def _short(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."
