"""Durable finite state machines: a shared ``transitions`` machine per definition.

Building a ``transitions.Machine`` costs about half a millisecond, and adding a
model to one binds a dozen methods to it, so walstate builds **one** machine
per definition (one for sub-steps, one for jobs) with no models attached and
drives plain objects through the machine's ``Transition.execute`` (see
``Definition._execute``). Objects
restored from the database just get their ``state`` attribute set: no
enter/exit callback runs on load.

Writing happens in the machine's ``before_state_change`` hook, which
``transitions`` runs after checking the trigger is legal and *before* it
changes the object's state: if the write raises, the state in memory stays as
it was and the caller gets the error (write before you believe).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast

from transitions import EventData, Machine, MachineError, State, Transition

from .storage.errors import InvalidTransition, WalstateError

from . import log


class Durable(Protocol):
    """What a machine-driven object provides: its state, and how it persists a move."""

    state: str

    def _describe(self) -> str: ...

    def _where(self) -> str:
        """``_describe()`` with the database it lives in, for errors (logs carry the job in their fields)."""
        ...

    def _persist(self, trigger: str, source: str, dest: str, data: Mapping[str, Any]) -> None: ...


def _persist_hook(event: EventData) -> None:
    model = cast(Durable, event.model)
    transition = event.transition
    assert transition is not None and transition.dest is not None
    model._persist(event.event.name, transition.source, transition.dest, event.kwargs)


class _State(State):
    """A ``transitions`` state that skips its enter/exit dispatch (and its two log calls) when it has no callbacks."""

    def enter(self, event_data: EventData) -> None:
        if self.on_enter:
            super().enter(event_data)

    def exit(self, event_data: EventData) -> None:
        if self.on_exit:
            super().exit(event_data)


class _Transition(Transition):
    """A ``transitions`` transition with a short path for the shape walstate builds.

    ``Transition.execute`` spends most of a sub-step's bookkeeping on
    dispatching empty callback lists and on log calls that are filtered out.
    When this transition has no prepare/before/after callbacks and no
    conditions, and the machine none after the state change, this runs the
    same sequence directly: the machine's ``before_state_change`` callbacks
    (walstate's write), then the state change with its enter/exit callbacks.
    Anything else (a callback added at run time included) takes the full path.
    """

    def execute(self, event_data: EventData) -> bool:
        machine = event_data.machine
        if self.prepare or self.conditions or self.before or self.after or machine.after_state_change:
            return bool(super().execute(event_data))
        for func in machine.before_state_change:
            machine.callback(func, event_data)
        if self.dest:
            self._change_state(event_data)
        return True

    def _change_state(self, event_data: EventData) -> None:
        machine = event_data.machine
        states = machine.states
        assert self.dest is not None
        source, dest = states[self.source], states[self.dest]
        source.exit(event_data)
        setattr(event_data.model, machine.model_attribute, dest.value)
        event_data.state = dest
        dest.enter(event_data)
        if dest.final:
            machine.callbacks(machine.on_final, event_data)


class _Machine(Machine):
    state_cls = _State
    transition_cls = _Transition


class Definition:
    """The states and triggers of one kind of durable object, backed by one shared machine."""

    def __init__(self, name: str, states: Sequence[str], transitions: Sequence[tuple[str, str | list[str], str]], initial: str, terminal: Sequence[str]) -> None:
        self.name = name
        self.states = tuple(states)
        self.initial = initial
        self.terminal = frozenset(terminal)
        self.machine = _Machine(
            model=None,
            states=list(states),
            transitions=[{"trigger": t, "source": s, "dest": d} for t, s, d in transitions],
            initial=initial,
            auto_transitions=False,
            send_event=True,
            before_state_change=[_persist_hook],
            name=name,
        )
        # trigger -> {source state -> destination}, for no-op detection and messages.
        self.table: dict[str, dict[str, str]] = {}
        for trigger, sources, dest in transitions:
            for source in [sources] if isinstance(sources, str) else sources:
                self.table.setdefault(trigger, {})[source] = dest
        self._dests = {t: frozenset(m.values()) for t, m in self.table.items()}

    @property
    def triggers(self) -> tuple[str, ...]:
        return tuple(self.table)

    def is_legal_path(self, states: Sequence[str]) -> bool:
        """Whether ``states`` (initial first) is a walk through this machine's transitions."""
        if not states or states[0] != self.initial:
            return False
        edges = {(s, d) for m in self.table.values() for s, d in m.items()}
        return all((a, b) in edges for a, b in zip(states, states[1:]))

    def destination(self, state: str, trigger: str, what: str) -> str | None:
        """Where ``trigger`` takes an object in ``state``: ``None`` for a no-op, InvalidTransition if illegal.

        For batch planners (operator commands) that commit several moves in one
        transaction and so cannot fire them one by one.
        """
        sources = self.table.get(trigger)
        if sources is None:
            raise InvalidTransition(f"{what}: unknown trigger {trigger!r}", state=state, trigger=trigger)
        if state in sources:
            return sources[state]
        if state in self._dests[trigger]:
            return None
        raise InvalidTransition(
            f"{what} is {state!r}; {trigger!r} is allowed only from {', '.join(repr(s) for s in sources)}",
            state=state, trigger=trigger)

    def fire(self, obj: Durable, trigger: str, data: Mapping[str, Any]) -> bool:
        """Move ``obj`` by ``trigger``, persisting first.

        Returns ``False`` and writes nothing when ``obj`` already is in the
        trigger's destination (a no-op); raises :class:`InvalidTransition` when
        the trigger is not allowed from ``obj``'s state.
        """
        sources = self.table.get(trigger)
        state = obj.state
        if sources is None:
            raise InvalidTransition(
                f"{obj._where()}: unknown trigger {trigger!r}; triggers are {', '.join(self.table)}",
                state=state,
                trigger=trigger,
            )
        if state not in sources:
            if state in self._dests[trigger]:
                return False  # already there: a redundant write is no write
            raise InvalidTransition(
                f"{obj._where()} is {state!r}; trigger {trigger!r} is allowed only from "
                f"{', '.join(repr(s) for s in sources)}",
                state=state,
                trigger=trigger,
            )
        # A move fired inside another's write (the next step's start, the job's end: committed
        # with it, journalled after it) is logged after it too, so logs follow the journal. With
        # DEBUG off for walstate.fsm there is nothing to log, and no order to keep.
        logged = log.transitions_logged()
        if logged:
            outer = getattr(_nested, "logs", None)
            inner: list[tuple[Durable, str, str, str]] = []
            _nested.logs = inner
        try:
            moved = self._execute(obj, trigger, state, data)
        except MachineError as exc:  # pragma: no cover - the table above mirrors the machine
            raise InvalidTransition(f"{obj._where()}: {exc.value}", state=state, trigger=trigger) from exc
        except WalstateError as exc:
            log.write_refused(obj, trigger, state, exc)  # log: a refused write (WARNING)
            raise
        finally:
            if logged:
                _nested.logs = outer
        if not logged:
            return moved
        if outer is not None:
            outer.append((obj, trigger, state, obj.state))
            outer.extend(inner)
        else:
            log.transition(obj, trigger, state, obj.state)  # log: each committed transition (DEBUG)
            for args in inner:
                log.transition(*args)
        return moved


    def _execute(self, obj: Durable, trigger: str, state: str, data: Mapping[str, Any]) -> bool:
        """Run the machine's transition of ``trigger`` from ``state`` on ``obj``; whether it moved.

        What ``Event.trigger`` does, less its queueing and its machine-wide
        prepare/finalize/exception callbacks (none are configured here) and
        its source check (done by :meth:`fire`): ``Transition.execute`` still
        runs the ``before_state_change`` hook (the write) and then changes
        the state, so a failed write leaves the state as it was.
        """
        machine = self.machine
        event = machine.events[trigger]
        event_data = EventData(machine.get_state(state), event, machine, obj, (), dict(data))
        for transition in event.transitions[state]:
            event_data.transition = transition
            if transition.execute(event_data):
                return True
        return False


Persist = Callable[[str, str, str, Mapping[str, Any]], None]

#: Per thread: the transitions committed by moves fired inside the one in progress, to log after it.
_nested = threading.local()

# -- the two definitions -------------------------------------------------------

STEP = Definition(
    "substep",
    states=["pending", "running", "retrying", "waiting", "succeeded", "failed", "skipped", "cancelled"],
    transitions=[
        # From waiting: its wake-up time came or its message arrived; the handler runs again.
        ("start", ["pending", "retrying", "waiting"], "running"),
        # A durable wait (step.sleep, step.wait_for): no thread and no claim held meanwhile.
        ("wait", "running", "waiting"),
        ("succeed", "running", "succeeded"),
        ("retry", "running", "retrying"),
        ("fail", "running", "failed"),
        # From retrying too: a when() condition that raised is asked again, and may say no.
        ("skip", ["pending", "retrying"], "skipped"),
        ("cancel", ["pending", "running", "retrying", "waiting"], "cancelled"),
        # An operator's second chance for a step that ended badly.
        ("requeue", ["failed", "cancelled"], "retrying"),
    ],
    initial="pending",
    terminal=["succeeded", "failed", "skipped", "cancelled"],
)

JOB = Definition(
    "job",
    states=["pending", "running", "succeeded", "failed", "cancelled"],
    transitions=[
        ("start", "pending", "running"),
        ("succeed", "running", "succeeded"),
        ("fail", "running", "failed"),
        ("cancel", ["pending", "running", "failed"], "cancelled"),
        ("requeue", ["failed", "cancelled"], "pending"),
    ],
    initial="pending",
    terminal=["succeeded", "failed", "cancelled"],
)
