"""Workflow definitions: phases of sub-steps, their order, retries and context model."""

from __future__ import annotations

import hashlib
import inspect
import json
import random
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, overload

from pydantic import BaseModel

from . import checks
from .storage.errors import DefinitionError

if TYPE_CHECKING:
    from .context import StepContext
    from .aio import AsyncStepContext

C = TypeVar("C", bound=BaseModel)
R = TypeVar("R")
#: A sub-step handler as stored (its context type erased).
Handler = Callable[..., Any]


def is_async(fn: Any) -> bool:
    """Whether ``fn`` is an ``async def`` handler (or an object whose ``__call__`` is one)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


C_in = TypeVar("C_in", bound=BaseModel)


class StepDecorator(Protocol[C_in]):
    """What :meth:`Workflow.step` returns: it takes a sync or an ``async def`` handler of the right signature."""

    @overload
    def __call__(self, fn: Callable[[C_in, AsyncStepContext], Coroutine[Any, Any, R]]
                 ) -> Callable[[C_in, AsyncStepContext], Coroutine[Any, Any, R]]: ...

    @overload
    def __call__(self, fn: Callable[[C_in, StepContext], R]) -> Callable[[C_in, StepContext], R]: ...


@dataclass(frozen=True)
class Retry:
    """How often a failing sub-step is tried, and how long to wait in between.

    The wait before attempt ``n+1`` is ``min(max_backoff, backoff * 2**(n-1))``
    plus a random jitter of up to ``jitter`` times that, so that parallel
    retries do not stampede.

    ``max_attempts`` counts attempts whose handler raised. An attempt cut short
    by a crash of the process is journalled and counted in the step's attempts
    but does not use up that budget (the step did nothing wrong); a step
    interrupted more than ``max_interruptions`` times fails, so a step that
    kills its process every time cannot loop forever.
    """

    max_attempts: int = 1
    backoff: float = 0.0
    max_backoff: float = 30.0
    jitter: float = 0.1
    max_interruptions: int = 10

    def __post_init__(self) -> None:
        # Whole numbers in range, finite durations of at most a century: NaN or an infinity here
        # would escape later from the retry's wait, with the job still claimed.
        checks.count(self.max_attempts, "Retry.max_attempts", error=DefinitionError)
        checks.count(self.max_interruptions, "Retry.max_interruptions", minimum=0, error=DefinitionError)
        checks.seconds(self.backoff, "Retry.backoff", zero=True, error=DefinitionError)
        checks.seconds(self.max_backoff, "Retry.max_backoff", zero=True, error=DefinitionError)
        checks.ratio(self.jitter, "Retry.jitter", error=DefinitionError)
        if self.jitter > 10:
            raise DefinitionError(f"Retry.jitter is a fraction of the wait (0.1: up to 10% more), at most 10, "
                                  f"not {self.jitter!r}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if self.backoff == 0:
            return 0.0
        # The exponent is capped before it is used: 2.0**1024 overflows a float
        # long before max_backoff would have capped the product.
        base = min(self.max_backoff, self.backoff * 2.0 ** min(max(0, attempt - 1), 64))
        return float(base + random.uniform(0, self.jitter * base))


@dataclass(frozen=True)
class StepDef:
    """A declared sub-step (internal)."""

    name: str
    phase: str
    fn: Handler
    retry: Retry
    after: tuple[str, ...]
    transactional: bool
    when: Callable[[Any], bool] | None
    position: int
    #: Seconds an attempt may run before it fails as timed out (None: no limit).
    timeout: float | None = None
    #: An ``async def`` handler (run on an event loop of its own per attempt; see walstate.aio).
    is_async: bool = False


#: A migration's context mapping: the old context as a dict -> the new one (a dict or the new model).
ContextMap = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class MigrationDef:
    """A declared migration of in-flight jobs from ``from_version`` to the workflow declaring it (internal)."""

    from_version: int
    fn: ContextMap
    drop: tuple[str, ...]


@dataclass
class Workflow(Generic[C]):
    """A named job definition: ordered ``phases`` of sub-steps sharing a typed ``context``.

    Declare sub-steps with :meth:`step`. A handler receives ``(ctx, step)``:
    the job's context (an instance of ``context``) and a :class:`StepContext`.
    It returns ``None``, a ``dict`` of context fields to update (also recorded
    as the step's output), a :class:`StepResult`, or any other JSON value as
    its output.

    ``version`` (an int >= 1, default 1) numbers the definition: a job records
    the version it was submitted with and the definition's :attr:`fingerprint`,
    and always runs on that definition. Give a changed definition a higher
    version; the highest registered version is the newest, used by
    ``submit`` unless another is named. Declare :meth:`migrate` to move
    in-flight jobs of an older version onto this one.

    ``concurrency`` caps how many jobs of this workflow workers run at once,
    across every process on the file (``None``: no cap).
    """

    name: str
    context: type[C]
    phases: Sequence[str]
    version: int = 1
    concurrency: int | None = field(default=None, kw_only=True)
    steps: dict[str, StepDef] = field(default_factory=dict, init=False)
    migrations: dict[int, MigrationDef] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        checks.text(self.name, "a workflow's name", error=DefinitionError)
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise DefinitionError(f"workflow {self.name!r}: version must be an int >= 1, not {self.version!r}")
        self.phases = tuple(self.phases)
        if not self.phases:
            raise DefinitionError(f"workflow {self.name!r} needs at least one phase")
        if len(set(self.phases)) != len(self.phases):
            raise DefinitionError(f"workflow {self.name!r} repeats a phase name: {list(self.phases)}")
        if not (isinstance(self.context, type) and issubclass(self.context, BaseModel)):
            raise DefinitionError(f"workflow {self.name!r}: context must be a pydantic BaseModel subclass")
        if self.concurrency is not None:
            checks.count(self.concurrency, f"workflow {self.name!r}: concurrency (or None)", error=DefinitionError)
        for phase in self.phases:
            checks.text(phase, f"workflow {self.name!r}: a phase name", error=DefinitionError)

    def step(
        self,
        phase: str,
        *,
        name: str | None = None,
        retry: Retry | None = None,
        after: Sequence[str] = (),
        transactional: bool = False,
        when: Callable[[C], bool] | None = None,
        timeout: float | None = None,
    ) -> StepDecorator[C]:
        """Decorator declaring a sub-step of ``phase``.

        The handler's signature is ``(ctx: C, step: StepContext) -> result``,
        ``C`` being this workflow's context model; type checkers refuse a
        handler with other parameters. The decorator returns the handler
        unchanged. ``after`` names sub-steps of the same phase that must
        succeed (or be skipped) first. ``transactional=True`` runs the handler
        inside the transaction that records its completion, so its
        ``step.db`` writes commit exactly once. ``when(ctx)`` returning false
        skips the step.

        ``timeout`` (seconds, finite, at most a century): an attempt that runs
        longer is marked timed out and its handler is told through
        ``step.cancelled``; once the handler has returned, the attempt is
        recorded as failed (``TimeoutError``; its late result is not recorded)
        and retried under ``retry``. The next attempt never starts beside the
        last one: Python cannot stop a thread, so a handler that ignores
        ``step.cancelled`` delays it. Not allowed with ``transactional=True``
        (the handler would hold the write transaction past its timeout).

        An ``async def`` handler receives an :class:`~walstate.aio.AsyncStepContext`
        (``await step.once(...)``, ``await step.sleep(...)``, ``await
        step.wait_for(...)``); see :mod:`walstate.aio`.
        """
        if phase not in self.phases:
            raise DefinitionError(f"workflow {self.name!r}: unknown phase {phase!r}; phases are {list(self.phases)}")
        if timeout is not None:
            checks.seconds(timeout, f"workflow {self.name!r}: a step's timeout (or None for no limit)", error=DefinitionError)
        if timeout is not None and transactional:
            # An async transactional step could be cancelled, but its writes would still
            # hold the transaction until the cancellation reaches an await: keep one rule.
            raise DefinitionError(f"workflow {self.name!r}: a transactional step cannot have a timeout (its handler "
                                  "runs inside the write transaction, which a timeout cannot interrupt)")

        def register(fn: Any) -> Any:
            step_name: str = name or str(getattr(fn, "__name__", ""))
            checks.text(step_name, f"workflow {self.name!r}: a step's name", error=DefinitionError)
            if step_name in self.steps:
                raise DefinitionError(f"workflow {self.name!r}: step {step_name!r} is declared twice")
            self.steps[step_name] = StepDef(
                step_name, phase, fn, retry or Retry(), tuple(after), transactional, when, len(self.steps), timeout,
                is_async(fn),
            )
            return fn

        return register

    def validate(self) -> None:
        """Check ``after`` references and cycles; called when the workflow is registered."""
        if not self.steps:
            raise DefinitionError(f"workflow {self.name!r} has no steps")
        for step in self.steps.values():
            for dep in step.after:
                other = self.steps.get(dep)
                if other is None:
                    raise DefinitionError(f"workflow {self.name!r}: step {step.name!r} runs after unknown step {dep!r}")
                if other.phase != step.phase:
                    raise DefinitionError(
                        f"workflow {self.name!r}: step {step.name!r} (phase {step.phase!r}) runs after {dep!r} of "
                        f"phase {other.phase!r}; `after` orders steps inside one phase (phases already run in order)"
                    )
        # Depth-first search for a cycle, naming it in the message.
        state: dict[str, int] = {}

        def visit(n: str, path: list[str]) -> None:
            state[n] = 1
            for dep in self.steps[n].after:
                if state.get(dep) == 1:
                    cycle = path[path.index(dep):] + [dep] if dep in path else [n, dep]
                    raise DefinitionError(f"workflow {self.name!r}: `after` forms a cycle: {' -> '.join(cycle)}")
                if dep not in state:
                    visit(dep, path + [dep])
            state[n] = 2

        for n in self.steps:
            if n not in state:
                visit(n, [n])
        for m in self.migrations.values():
            kept = sorted(set(m.drop) & set(self.steps))
            if kept:
                raise DefinitionError(
                    f"workflow {self.name!r} version {self.version}: the migration from version {m.from_version} "
                    f"drops {kept}, which this version still declares; drop only steps it removes"
                )

    @overload
    def migrate(self, from_version: int, fn: ContextMap, *, drop: Sequence[str] = ()) -> ContextMap: ...

    @overload
    def migrate(self, from_version: int, fn: None = None, *,
                drop: Sequence[str] = ()) -> Callable[[ContextMap], ContextMap]: ...

    def migrate(self, from_version: int, fn: ContextMap | None = None, *,
                drop: Sequence[str] = ()) -> ContextMap | Callable[[ContextMap], ContextMap]:
        """Declare how an in-flight job of version ``from_version`` moves onto this definition.

        ``fn(old_context: dict) -> dict | model`` maps the job's stored context
        to this workflow's model (it must be a pure function: it may run again
        if the migration's transaction does not commit). Steps this version
        adds become ``pending``; steps it removes must have finished
        (``succeeded`` or ``skipped``), unless named in ``drop`` (their rows
        are deleted whatever their state), else the migration of that job is
        refused with :class:`MigrationRefused` and nothing changes. Use as a
        call (``flow.migrate(1, fn)``) or a decorator (``@flow.migrate(1)``);
        either returns ``fn``.
        """
        if isinstance(from_version, bool) or not isinstance(from_version, int) or not 1 <= from_version < self.version:
            raise DefinitionError(
                f"workflow {self.name!r} version {self.version}: migrate() goes forward, from a version between 1 "
                f"and {self.version - 1}, not {from_version!r}"
            )
        if from_version in self.migrations:
            raise DefinitionError(f"workflow {self.name!r} version {self.version}: a migration from version "
                                  f"{from_version} is already declared")

        def declare(f: ContextMap) -> ContextMap:
            self.migrations[from_version] = MigrationDef(from_version, f, tuple(drop))
            return f

        return declare if fn is None else declare(fn)

    @property
    def fingerprint(self) -> str:
        """A digest of the definition's shape: what a stored job's progress means under it.

        It covers the phases in order, each step's name, phase and rank, its
        ``after`` set, whether it is transactional, and the retry settings that
        decide whether a stored failure count is final (``max_attempts``,
        ``max_interruptions``). It leaves out what a running job can take in
        its stride: handler code, ``when`` conditions, backoff timings and the
        context model (a stored context is validated on its own).
        """
        key = (self.phases, *self.steps.values())
        cached = self.__dict__.get("_fingerprint")
        # Computed once per shape (submit and every run ask): steps are frozen,
        # so the same step objects in the same phases give the same digest.
        if cached is not None and len(cached[0]) == len(key) and all(a is b for a, b in zip(cached[0], key)):
            return str(cached[1])
        ranked = sorted(self.steps.values(), key=lambda s: (self.phases.index(s.phase), s.position))
        shape = {
            "phases": list(self.phases),
            "steps": [[s.name, s.phase, sorted(s.after), s.transactional, s.retry.max_attempts,
                       s.retry.max_interruptions] for s in ranked],
        }
        text = json.dumps(shape, sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.__dict__["_fingerprint"] = (key, digest)
        return digest

    def ranked_steps(self) -> list[tuple[str, str, int]]:
        """``(name, phase, rank)`` of every step: phases in order, then declaration order."""
        ranked = sorted(self.steps.values(), key=lambda s: (self.phases.index(s.phase), s.position))
        return [(s.name, s.phase, rank) for rank, s in enumerate(ranked)]

    def phase_steps(self, phase: str) -> list[StepDef]:
        return [s for s in self.steps.values() if s.phase == phase]
