"""Workflow definitions: phases of sub-steps, their order, retries and context model."""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel

from .storage.errors import DefinitionError

if TYPE_CHECKING:
    from .context import StepContext

C = TypeVar("C", bound=BaseModel)
R = TypeVar("R")
#: A sub-step handler as stored (its context type erased).
Handler = Callable[..., Any]


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
        if self.max_attempts < 1:
            raise DefinitionError(f"Retry.max_attempts must be >= 1, not {self.max_attempts}")
        if self.backoff < 0 or self.max_backoff < 0 or self.jitter < 0:
            raise DefinitionError("Retry backoff, max_backoff and jitter must be >= 0")

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


@dataclass
class Workflow(Generic[C]):
    """A named job definition: ordered ``phases`` of sub-steps sharing a typed ``context``.

    Declare sub-steps with :meth:`step`. A handler receives ``(ctx, step)``:
    the job's context (an instance of ``context``) and a :class:`StepContext`.
    It returns ``None``, a ``dict`` of context fields to update (also recorded
    as the step's output), a :class:`StepResult`, or any other JSON value as
    its output.

    ``concurrency`` caps how many jobs of this workflow workers run at once,
    across every process on the file (``None``: no cap).
    """

    name: str
    context: type[C]
    phases: Sequence[str]
    concurrency: int | None = field(default=None, kw_only=True)
    steps: dict[str, StepDef] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.phases = tuple(self.phases)
        if not self.phases:
            raise DefinitionError(f"workflow {self.name!r} needs at least one phase")
        if len(set(self.phases)) != len(self.phases):
            raise DefinitionError(f"workflow {self.name!r} repeats a phase name: {list(self.phases)}")
        if not (isinstance(self.context, type) and issubclass(self.context, BaseModel)):
            raise DefinitionError(f"workflow {self.name!r}: context must be a pydantic BaseModel subclass")
        if self.concurrency is not None and self.concurrency < 1:
            raise DefinitionError(f"workflow {self.name!r}: concurrency must be >= 1 or None, not {self.concurrency}")

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
    ) -> Callable[[Callable[[C, StepContext], R]], Callable[[C, StepContext], R]]:
        """Decorator declaring a sub-step of ``phase``.

        The handler's signature is ``(ctx: C, step: StepContext) -> result``,
        ``C`` being this workflow's context model; type checkers refuse a
        handler with other parameters. The decorator returns the handler
        unchanged. ``after`` names sub-steps of the same phase that must
        succeed (or be skipped) first. ``transactional=True`` runs the handler
        inside the transaction that records its completion, so its
        ``step.db`` writes commit exactly once. ``when(ctx)`` returning false
        skips the step.

        ``timeout`` (seconds): an attempt that runs longer fails as timed out
        (journalled, retried under ``retry``) and its handler is told through
        ``step.cancelled``. Python cannot stop a thread: a handler that ignores
        it keeps its thread until it returns, and its late result is not
        recorded. Not allowed with ``transactional=True`` (the handler would
        hold the write transaction past its timeout).

        ``async def`` handlers are refused until walstate supports them.
        """
        if phase not in self.phases:
            raise DefinitionError(f"workflow {self.name!r}: unknown phase {phase!r}; phases are {list(self.phases)}")
        if timeout is not None and not timeout > 0:
            raise DefinitionError(f"workflow {self.name!r}: step timeout must be > 0 seconds, not {timeout}")
        if timeout is not None and transactional:
            raise DefinitionError(f"workflow {self.name!r}: a transactional step cannot have a timeout (its handler "
                                  "runs inside the write transaction, which a timeout cannot interrupt)")

        def register(fn: Callable[[C, StepContext], R]) -> Callable[[C, StepContext], R]:
            step_name: str = name or str(getattr(fn, "__name__", ""))
            if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):
                raise DefinitionError(f"workflow {self.name!r}: step {step_name!r} is an async def handler; "
                                      "walstate runs plain (sync) handlers only for now: make it a def")
            if step_name in self.steps:
                raise DefinitionError(f"workflow {self.name!r}: step {step_name!r} is declared twice")
            self.steps[step_name] = StepDef(
                step_name, phase, fn, retry or Retry(), tuple(after), transactional, when, len(self.steps), timeout
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

    def phase_steps(self, phase: str) -> list[StepDef]:
        return [s for s in self.steps.values() if s.phase == phase]
