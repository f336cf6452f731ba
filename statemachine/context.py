"""What a handler sees (StepContext), what it may return (StepResult), and JSON rules."""

from __future__ import annotations

import json
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
        try:
            return model.model_validate(merged).model_dump_json()
        except ValidationError as exc:
            raise ContextInvalid(f"{where}: the context update does not validate against {model.__name__}: {exc}") from exc

    return merge


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

    __slots__ = ("job_id", "step", "attempt", "idempotency_key", "db", "_reader", "_writer")

    def __init__(self, job_id: int, step: str, attempt: int, idempotency_key: str, db: peewee.Database,
                 reader: Reader, writer: WritePath) -> None:
        self.job_id = job_id
        self.step = step
        self.attempt = attempt
        self.idempotency_key = idempotency_key
        self.db = db
        self._reader = reader
        self._writer = writer

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
            stored = self._writer.record_once(self.job_id, self.step, name, text)
        result: T = json.loads(stored)
        return result
