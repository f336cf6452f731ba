"""What a handler sees (StepContext), what it may return (StepResult), and JSON rules."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError, to_jsonable_python

from .storage.errors import ContextInvalid, OutputNotJSON

if TYPE_CHECKING:
    import peewee

    from .storage import Reader, WritePath

T = TypeVar("T")


def to_json(value: Any, what: str) -> str:
    """Serialise ``value`` as strict JSON (no NaN), or raise :class:`OutputNotJSON`."""
    try:
        return json.dumps(to_jsonable_python(value), allow_nan=False, separators=(",", ":"), sort_keys=True)
    except (TypeError, ValueError, PydanticSerializationError) as exc:
        raise OutputNotJSON(f"{what} is not JSON-serialisable ({type(value).__name__}: {exc}); return dicts, lists, "
                            "strings, numbers, booleans, None or pydantic models") from exc


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
        # on the way back: refuse them here, before anything is stored.
        json.dumps(value.model_dump(mode="json"), allow_nan=False)
        return value.model_dump_json()
    except ValidationError as exc:
        raise ContextInvalid(f"{where}: the context does not validate against {model.__name__}: {exc}") from exc
    except Exception as exc:
        raise ContextInvalid(f"{where}: the context cannot be stored as JSON ({type(exc).__name__}: {exc}); "
                             "use values JSON can hold (no NaN, infinity or lone surrogates)") from exc


def check_update_keys(model: type[BaseModel], update: dict[str, Any], where: str) -> None:
    unknown = sorted(set(update) - set(model.model_fields))
    if unknown:
        raise ContextInvalid(
            f"{where}: context update names fields {unknown} that {model.__name__} does not have; "
            "return a StepResult(output=...) to record an output that is not a context update"
        )


@dataclass(frozen=True)
class StepResult:
    """An explicit handler result: ``output`` to record, ``context`` fields to update."""

    output: Any = None
    context: dict[str, Any] | None = None


class StepContext:
    """Everything a handler knows about the sub-step it is running.

    ``idempotency_key`` is the same for every attempt of this sub-step, in this
    process or after a restart: pass it to external APIs so that a repeated
    call is recognised. ``db`` is the job database (peewee); in a
    transactional step its current transaction is the one that records the
    step's completion.
    """

    __slots__ = ("job_id", "step", "attempt", "idempotency_key", "db", "cancelled", "_reader", "_writer", "recorded")

    def __init__(self, job_id: int, step: str, attempt: int, idempotency_key: str, db: peewee.Database,
                 reader: Reader, writer: WritePath, cancelled: threading.Event | None = None) -> None:
        self.job_id = job_id
        self.step = step
        self.attempt = attempt
        self.idempotency_key = idempotency_key
        self.db = db
        #: Set when this run must stop: the job was cancelled, or this run lost
        #: its claim on it. A long handler should check it (or ``wait`` on it)
        #: and return early; whatever it returns after that is not recorded.
        self.cancelled = cancelled if cancelled is not None else threading.Event()
        self._reader = reader
        self._writer = writer
        #: ``(step, name, result)`` of every once() of this attempt, so that the
        #: runner can record them again if the attempt's own transaction rolls back.
        self.recorded: list[tuple[str, str, str]] = []

    def once(self, name: str, fn: Callable[[], T]) -> T:
        """Call ``fn`` at most once per (job, step, ``name``) and return its result.

        The JSON result is stored durably; any later attempt or restart gets the
        stored value back without calling ``fn``. If the process dies after
        ``fn`` returns but before the record is written, ``fn`` runs again:
        give it this step's ``idempotency_key`` to make that harmless.
        """
        stored = self._reader.once(self.job_id, self.step, name)
        if stored is None:
            text = to_json(fn(), f"once({name!r}) of step {self.step!r}")
            # Remembered before it is written: if this attempt's transaction
            # (a transactional step, or the handler's own db.atomic()) rolls
            # back, the runner stores it with the failed attempt, because the
            # outside effect did happen.
            self.recorded.append((self.step, name, text))
            stored = self._writer.record_once(self.job_id, self.step, name, text)
        result: T = json.loads(stored)
        return result
