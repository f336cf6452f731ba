"""What a handler sees (StepContext), what it may return (StepResult), and JSON rules."""

from __future__ import annotations

import difflib
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError, to_jsonable_python

from . import checks
from .storage.errors import ContextInvalid, InvalidArgument, OutputNotJSON, WaitTimeout

if TYPE_CHECKING:
    from .storage.contract import Storage

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


def to_json(value: Any, what: str) -> str:
    """Serialise ``value`` as strict JSON (no NaN), or raise :class:`OutputNotJSON`."""
    try:
        return json.dumps(to_jsonable_python(value), allow_nan=False, separators=(",", ":"), sort_keys=True)
    except (TypeError, ValueError, PydanticSerializationError) as exc:
        raise OutputNotJSON(f"{what} is not JSON-serialisable ({type(value).__name__}: {exc}); use dicts, lists, "
                            "strings, numbers, booleans, None or pydantic models") from exc


def message_json(payload: Any, what: str) -> str:
    """:func:`to_json` for a message's payload, which must also be valid Unicode text (no lone surrogate).

    A payload that a step could not store again (in its context, its output
    or a once() record) would fail every attempt of the step that consumes it:
    refused at the send, with :class:`OutputNotJSON`, before anything is stored.
    """
    text = to_json(payload, what)
    if "\\u" in text:  # only escapes can hide a lone surrogate: check the text they stand for
        try:
            json.dumps(json.loads(text), ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise OutputNotJSON(f"{what} holds a lone surrogate ({exc.object[exc.start:exc.end]!r} at character "
                                f"{exc.start}), which is not Unicode text; send valid text (decode the bytes it "
                                "came from with errors='replace', say)") from exc
    return text


def context_merger(model: type[BaseModel], where: str) -> Callable[[dict[str, Any]], str]:
    """Build the validator that turns a merged context dict into stored JSON text."""

    def merge(merged: dict[str, Any]) -> str:
        return dump_context(model, merged, where)

    return merge


def dump_context(model: type[BaseModel], data: Any, where: str) -> str:
    """Validate ``data`` against ``model`` and return the JSON text to store, or raise ContextInvalid.

    Any failure of user code here (a validator, a custom serializer, a value
    JSON cannot hold such as NaN, infinity or a lone surrogate) is the
    context's fault and becomes :class:`ContextInvalid`: it fails the step
    that produced it, never the write path or another job.
    """
    try:
        value = data if isinstance(data, model) else model.model_validate(data)
        # pydantic writes NaN and infinities as null, which would not validate
        # on the way back (or, in an Any field, would come back as None): refuse
        # them here, before anything is stored, wherever they are nested.
        json.dumps(value.model_dump(mode="json"), allow_nan=False)
        _refuse_non_finite(value.model_dump(), "the context")
        return value.model_dump_json()
    except ValidationError as exc:
        raise ContextInvalid(f"{where}: the context does not validate against {model.__name__}: {exc}") from exc
    except Exception as exc:
        raise ContextInvalid(f"{where}: the context cannot be stored as JSON ({type(exc).__name__}: {exc}); "
                             "use values JSON can hold (no NaN, infinity or lone surrogates)") from exc


def _refuse_non_finite(value: Any, where: str) -> None:
    """Raise ValueError for a NaN or infinite float anywhere in ``value`` (dicts, lists, tuples, sets)."""
    stack = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{path} is {item!r}, which JSON cannot hold")
        if isinstance(item, dict):
            stack.extend((v, f"{path}[{k!r}]") for k, v in item.items())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item))


def check_update_keys(model: type[BaseModel], update: dict[str, Any], where: str) -> None:
    unknown = sorted(set(update) - set(model.model_fields))
    if unknown:
        raise ContextInvalid(
            f"{where}: context update names fields {unknown} that {model.__name__} does not have; "
            "return a StepResult(output=...) to record an output that is not a context update"
        )


def _accepted_keys(model: type[BaseModel]) -> set[str]:
    keys = set(model.model_fields)
    keys.update(f.alias for f in model.model_fields.values() if f.alias)
    return keys


def _unknown_fields(model: type[BaseModel], names: set[str]) -> str:
    known = sorted(model.model_fields)
    hints = []
    for name in sorted(names):
        close = difflib.get_close_matches(name, known, n=1)
        hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    return f"{', '.join(hints)}; {model.__name__} has {known}"


def validate_submission(model: type[M], context: object, where: str) -> M:
    """The submitted ``context`` as a validated instance of ``model``, or :class:`ContextInvalid`.

    The rule: an instance of ``model`` is accepted (and validated again, in
    case it was changed after construction); an instance of any other class,
    a subclass that adds fields included, is refused, because its extra data
    would be silently dropped. A dict may name only ``model``'s fields (or
    their aliases), unless the model itself allows extra fields
    (``model_config["extra"] == "allow"``): a misspelled field is an error,
    not a default value.
    """
    if isinstance(context, BaseModel):
        extra = set(type(context).model_fields) - set(model.model_fields)
        if not isinstance(context, model) or extra:
            raise ContextInvalid(
                f"{where}: the context is a {type(context).__name__}, but this workflow's context model is "
                f"{model.__name__}; pass a {model.__name__}(...) or a dict of its fields")
        data: dict[str, Any] = context.model_dump()
    elif isinstance(context, dict):
        data = context
        unknown = {str(k) for k in data} - _accepted_keys(model)
        if unknown and model.model_config.get("extra") != "allow":
            raise ContextInvalid(f"{where}: the context names unknown fields {_unknown_fields(model, unknown)}")
    else:
        raise ContextInvalid(f"{where}: the context must be a {model.__name__} or a dict of its fields, "
                             f"not {type(context).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ContextInvalid(f"{where}: the context does not validate against {model.__name__}: {exc}") from exc


class Cursor(Protocol):
    """What :meth:`StepContext.execute` returns: the DB-API cursor of the statement (``sqlite3.Cursor`` here)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


@dataclass(frozen=True)
class StepResult:
    """An explicit handler result: ``output`` to record, ``context`` fields to update."""

    output: Any = None
    context: dict[str, Any] | None = None


class StepContext:
    """Everything a handler knows about the sub-step it is running.

    ``idempotency_key`` is the same for every attempt of this sub-step, in this
    process or after a restart: pass it to external APIs so that a repeated
    call is recognised. ``db`` is the job database (peewee, for SQL stores); in a
    transactional step its current transaction is the one that records the
    step's completion.
    """

    __slots__ = ("job_id", "step", "attempt", "idempotency_key", "db", "cancelled", "_store", "recorded",
                 "_clock", "_fence", "_waits")

    def __init__(self, job_id: int, step: str, attempt: int, idempotency_key: str, db: Any,
                 store: Storage, cancelled: threading.Event | None = None, *,
                 clock: Callable[[], float] = time.time, fence: tuple[str | None, int] = (None, 0)) -> None:
        self.job_id = job_id
        self.step = step
        self.attempt = attempt
        self.idempotency_key = idempotency_key
        self.db = db
        #: Set when this run must stop: the job was cancelled, or this run lost
        #: its claim on it. A long handler should check it (or ``wait`` on it)
        #: and return early; whatever it returns after that is not recorded.
        self.cancelled = cancelled if cancelled is not None else threading.Event()
        self._store = store
        #: ``(step, name, result)`` of every once() of this attempt, so that the
        #: runner can record them again if the attempt's own transaction rolls back.
        self.recorded: list[tuple[str, str, str]] = []
        self._clock = clock
        self._fence = fence
        self._waits = 0

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """Run one SQL statement with ``params`` on the job database (``self.db``) and return its cursor.

        In a transactional step this is part of the transaction that records
        the step's completion. The same as ``self.db.execute_sql(sql, params)``,
        typed (peewee's own hints leave ``execute_sql`` untyped), except that
        ``?`` placeholders work on both backends: on PostgreSQL they become
        psycopg's ``%s`` (``?`` inside quotes stays as it is).
        """
        portable = getattr(self.db, "portable", None)
        cursor: Cursor = self.db.execute_sql(sql if portable is None else portable(sql), tuple(params))
        return cursor

    def once(self, name: str, fn: Callable[[], T]) -> T:
        """Call ``fn`` at most once per (job, step, ``name``) and return its result.

        The JSON result is stored durably; any later attempt or restart gets the
        stored value back without calling ``fn``, decoded from JSON: return
        JSON values (str, int, float, bool, None, lists and dicts of them) so
        that the stored value has the type ``fn`` declares (a tuple would come
        back as a list, a pydantic model as a dict). If the process dies after
        ``fn`` returns but before the record is written, ``fn`` runs again:
        give it this step's ``idempotency_key`` to make that harmless.

        Fenced like every write of a run: a run that lost its claim (another
        run took the job over) gets :class:`LeaseLost` instead of calling
        ``fn``, and never stores a record.
        """
        checks.text(name, f"step {self.step!r} of job {self.job_id}: once()'s name")
        stored = self._stored(name)
        if stored is None:
            text = to_json(fn(), f"once({name!r}) of step {self.step!r}")
            # Remembered before it is written: if this attempt's transaction
            # (a transactional step, or the handler's own db.atomic()) rolls
            # back, the runner stores it with the failed attempt, because the
            # outside effect did happen.
            self.recorded.append((self.step, name, text))
            owner, epoch = self._fence
            # Fenced: a run superseded while fn ran stores nothing (LeaseLost).
            stored = self._store.record_once(self.job_id, self.step, name, text, owner=owner, epoch=epoch)
        result: T = json.loads(stored)
        return result

    def _stored(self, name: str) -> str | None:
        """once(``name``)'s stored result, or None; raises LeaseLost if this run no longer holds its claim.

        The claim is checked before ``fn`` is called: a run superseded while it
        was stopped (past its lease) calls nothing. (A run stopped between this
        check and the call still calls it; its record is then refused.)
        """
        owner, epoch = self._fence
        return self._store.once_lookup(self.job_id, self.step, name, owner, epoch)

    # -- durable waits ------------------------------------------------------------
    #
    # A wait is recorded durably the first time the handler reaches it, like
    # once(): the k-th wait of a handler has the record name
    # "__walstate_wait_k"; handlers must reach their waits in the same order
    # on every run (the code before a wait runs again on each resume).

    def _wait_name(self, kind: str) -> str:
        self._waits += 1
        return f"__walstate_{kind}_{self._waits}"

    def sleep(self, seconds: float) -> float:
        """Sleep durably for ``seconds``; return the wake-up time (a Unix time).

        The first time the handler gets here, the wake-up time (now +
        ``seconds``) is recorded and the step *suspends*: it goes ``waiting``,
        its thread and the job's claim are released, and a worker runs the
        handler again from its start once the time has come; then this call
        returns at once. A restart does not move the wake-up time. Code before
        the sleep runs again on resume: put its outside effects in ``once()``.
        """
        seconds = checks.seconds(seconds, f"step {self.step!r} of job {self.job_id}: sleep()", zero=True)
        name = self._wait_name("sleep")
        return self._until(name, self.once(name, lambda: self._clock() + seconds))

    def sleep_until(self, timestamp: float) -> float:
        """Sleep durably until ``timestamp`` (a Unix time); see :meth:`sleep`."""
        where = f"step {self.step!r} of job {self.job_id}: sleep_until()"
        if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)) or not math.isfinite(timestamp):
            raise InvalidArgument(f"{where} takes a Unix time (a finite number of seconds), not {timestamp!r}")
        checks.seconds(max(0.0, float(timestamp) - self._clock()), f"{where}: the time until it", zero=True)
        name = self._wait_name("sleep")
        return self._until(name, self.once(name, lambda: float(timestamp)))

    def _until(self, name: str, wake_at: float) -> float:
        if self._clock() >= wake_at:
            return wake_at
        raise Suspend(self.step, wake_at=wake_at, topic=None)

    def wait_for(self, topic: str, timeout: float | None = None) -> Any:
        """Wait durably for a message on ``topic`` (sent with ``engine.send``) and return its payload.

        A message sent before the wait is kept until a wait consumes it; each
        message is consumed by exactly one wait, in the order sent, recorded in
        the same transaction. With no message yet, the step suspends like
        :meth:`sleep` (holding no thread) and runs again from its start when
        one arrives. With ``timeout`` (seconds, counted from the first time
        the handler got here), raises :class:`WaitTimeout` once it has passed.
        """
        where = f"step {self.step!r} of job {self.job_id}: wait_for()"
        checks.text(topic, f"{where}: the topic")
        if timeout is not None:
            timeout = checks.seconds(timeout, f"{where}: the timeout (or None)", zero=True)
        name = self._wait_name(f"wait_{topic}")
        owner, epoch = self._fence
        payload = self._store.consume(self.job_id, self.step, name, topic, owner, epoch)
        if payload is not None:
            return json.loads(payload)
        deadline = math.inf
        if timeout is not None:
            deadline = self.once(f"{name}_deadline", lambda: self._clock() + timeout)
            if self._clock() >= deadline:
                raise WaitTimeout(f"step {self.step!r} of job {self.job_id}: no message on {topic!r} within "
                                  f"{timeout:g}s", topic=topic)
        raise Suspend(self.step, wake_at=deadline, topic=topic)


class Suspend(BaseException):
    """Control flow, not an error: a handler waits durably (``step.sleep``/``wait_for``).

    A ``BaseException`` so that a handler's ``except Exception`` cannot swallow
    it; the runner records the step ``waiting`` and frees its thread.
    """

    def __init__(self, step: str, *, wake_at: float, topic: str | None) -> None:
        super().__init__(f"step {step!r} waits until {wake_at} for {topic or 'time'}")
        self.wake_at = wake_at
        self.topic = topic
