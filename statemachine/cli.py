"""The ``walstate`` command: see, explain and repair jobs from the shell (also ``python -m walstate``).

Read commands open the database read-only (``mode=ro``) and never create or
change it. Errors are one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import json
import os
import pathlib
import re
import select
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from .storage.contract import SCHEMA_VERSION, Storage, is_memory_url, is_postgres_url, open_store, redact
from .storage.types import TERMINAL_JOB_STATES, UNFINISHED_JOB_STATES
from .storage.errors import (ConfigurationError, ContextInvalid, DatabaseUnavailable, DefinitionError, NotADatabase,
                             SchemaTooOld, UsageError, VersionNotRegistered, WalstateError)
from .storage.types import JobRow

from . import checks, operator, views
from .ownership import describe_owner
from .fsm import STEP

EXIT_ERROR = 1
EXIT_USAGE = 2

_COLOURS = {"succeeded": "32", "failed": "31", "cancelled": "33", "running": "36", "retrying": "35",
            "skipped": "90", "pending": "0"}


class Out:
    """Where output goes, and whether it may be coloured (a TTY, not --json, no NO_COLOR)."""

    def __init__(self, stream: TextIO, as_json: bool) -> None:
        self.stream = stream
        self.as_json = as_json
        self.colour = stream.isatty() and not as_json and "NO_COLOR" not in os.environ

    def state(self, state: str, width: int = 0) -> str:
        text = state.ljust(width)
        return f"\033[{_COLOURS.get(state, '0')}m{text}\033[0m" if self.colour else text

    def line(self, text: str = "") -> None:
        print(text, file=self.stream)

    def json(self, data: Any) -> None:
        json.dump(data, self.stream, indent=2, default=str)
        self.stream.write("\n")


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _refuse_memory(path: str) -> None:
    if is_memory_url(path):
        # An empty answer ("no jobs") would be wrong, not merely unhelpful: the app's jobs live in its process.
        raise UsageError(f"{path}: a memory:// database lives only inside the process that opened it; the CLI "
                         "reads a SQLite file or a postgresql:// URL")


def _open(path: str, readonly: bool = True) -> Storage:
    _refuse_memory(path)
    if not is_postgres_url(path) and os.path.isdir(path):
        # SQLite's own answer is "disk I/O error" (read-only) or "unable to open database file".
        raise DatabaseUnavailable(f"{path} is a directory, not a walstate database file; give the path of the file "
                                  f"(for example {os.path.join(path, 'app.db')})", path)
    return open_store(path, readonly=readonly)


def _open_existing(path: str, *, tables: bool = False, create: bool = False) -> tuple[Storage, bool]:
    """Open an existing walstate database for writing; a missing file or another app's database is an error.

    A command that changes jobs must never create a file from a mistyped
    path, nor add walstate's tables to (and switch to WAL) an app's own
    SQLite file. So the file is opened read-only first, which checks both;
    an older walstate schema passes (opening it for writing upgrades it, as
    an Engine does). With ``tables`` (``walstate upgrade``), an existing
    database without walstate's tables gets them; returns whether it did. A
    SQLite file that already has tables of its own (another application's)
    gets them only with ``create`` (``walstate upgrade --create``).
    """
    created = False
    try:
        _open(path).close()
    except SchemaTooOld:
        pass
    except NotADatabase:
        if not tables:
            raise
        if not create and not is_postgres_url(path):
            foreign = _tables_of(path)
            if foreign:
                raise ConfigurationError(
                    f"{path}: a SQLite file of another application (tables {', '.join(foreign[:5])}"
                    f"{', ...' if len(foreign) > 5 else ''}) without walstate's tables; nothing was changed. To keep "
                    "walstate's jobs in it (transactional steps write the app's tables in the same file), run "
                    "`walstate upgrade --create DB`; else point walstate at a file of its own") from None
        created = True
    return _open(path, readonly=False), created


def _tables_of(path: str) -> list[str]:
    """The tables of a SQLite file, read through a read-only open (which changes nothing)."""
    conn = sqlite3.connect(pathlib.Path(path).absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return [str(r[0]) for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    finally:
        conn.close()


def _cut(text: str, width: int) -> str:
    """``text`` in ``width`` columns, marked with ``~`` where cut (``--json`` has it whole)."""
    return text if len(text) <= width else text[:width - 1] + "~"


def _key_cell(key: str | None, width: int) -> str:
    """A job's key in ``width`` columns: a schedule's job as ``schedule NAME @ SLOT``, its name cut, never its slot."""
    slot = views.schedule_of_key(key)
    if slot is None:
        return _cut(key or "-", width)
    room = max(2, width - len("schedule  @ ") - len(slot[1]))
    return f"schedule {_cut(slot[0], room)} @ {slot[1]}"


def _blocker(spec: str | None, db: str) -> Callable[[Storage, JobRow], tuple[str, str] | None]:
    """With ``--app``: for an unfinished job that app could not run, (a short note, the full reason)."""
    if spec is None:
        return lambda store, row: None
    from .engine import Engine
    from .versions import Registry, waiting_for
    from .workflow import Workflow

    app = _load_app(spec)
    if isinstance(app, Workflow):
        registry = Registry()
        registry.register(app, spec)
    elif isinstance(app, Engine):
        registry = app._registry
    elif callable(app):
        engine = _call_factory(app, spec, db)
        if not isinstance(engine, Engine):
            raise ConfigurationError(f"{spec} is neither an Engine, a Workflow nor a factory taking the database path")
        registry = engine._registry
        engine.close()
    else:
        raise ConfigurationError(f"{spec} is neither an Engine, a Workflow nor a factory taking the database path")

    def blocked(store: Storage, row: JobRow) -> tuple[str, str] | None:
        if row.state not in UNFINISHED_JOB_STATES:
            return None
        try:
            registry.resolve(row, lambda: store.steps(row.id), store.path)
        except VersionNotRegistered as exc:
            return waiting_for(row), str(exc)
        except DefinitionError as exc:
            return "definition changed", str(exc)
        except ContextInvalid as exc:
            return "context no longer validates", str(exc)
        return None

    return blocked


def cmd_jobs(args: argparse.Namespace, out: Out) -> int:
    # The file first (read-only: a missing, older or foreign file is refused here), then the app:
    # an app's engine opens the file for writing, which would create or upgrade it.
    store = _open(args.db)
    try:
        blocked = _blocker(args.app, args.db)
        page = views.job_page(store, state=args.state, workflow=args.workflow, limit=args.limit, offset=args.offset)
        # With --app: which unfinished jobs that app cannot run, and why (one read per such job).
        notes: dict[int, tuple[str, str]] = {}
        if args.app:
            for j in page:
                row = store.job(j.id)
                why = None if row is None else blocked(store, row)
                if why is not None:
                    notes[j.id] = why
    finally:
        store.close()
    if out.as_json:
        listed = [{**j.as_dict(), **({"note": notes[j.id][0], "blocked": notes[j.id][1]} if j.id in notes else {})}
                  for j in page]
        out.json({"jobs": listed, "offset": page.offset, "limit": page.limit, "next_offset": page.next_offset})
        return 0
    # KEY: 10 columns, wider (up to 44) for a page with a schedule's job, shown as `schedule NAME @ SLOT`.
    kw = max([10, *(min(44, len(views.readable_key(j.key))) for j in page if views.schedule_of_key(j.key))])
    out.line(f"{'ID':>5}  {'WORKFLOW':<10} {'KEY':<{kw}} {'STATE':<9} {'VER':>3} {'PHASE':<8} {'UPDATED':<11}  STEPS")
    for j in page:
        note = f"  {notes[j.id][0]}" if j.id in notes else ""
        out.line(f"{j.id:>5}  {_cut(j.workflow, 10):<10} {_key_cell(j.key, kw):<{kw}} {out.state(j.state, 9)} "
                 f"{j.version:>3} {_cut(j.phase or '-', 8):<8} {_when(j.updated_at)[5:16]:<11}  {j.progress}{note}")
    if not page:
        out.line("(no jobs)" if page.offset == 0 else f"(no jobs after the first {page.offset})")
    if page.next_offset is not None:
        out.line(f"more jobs: --offset {page.next_offset}")
    return 0


def describe_wait(wait: dict[str, Any]) -> str:
    """One line on what a waiting step waits for, and when it wakes."""
    topic, wake_at = wait.get("topic"), wait.get("wake_at")
    if topic and wake_at is not None:
        return f"waits for a message on {topic!r} or until {_when(wake_at)}"
    if topic:
        return f"waits for a message on {topic!r}"
    if wake_at is not None:
        return f"sleeps until {_when(wake_at)}"
    return "waits"


def describe_holder(held: dict[str, Any]) -> str:
    """One line on who holds a job's claim (host, pid) and when its lease was last renewed."""
    now = held["lease_clock_now"]
    renewed, expires = held["lease_renewed_at"], held["lease_expires"]
    line = f"held by host {held['host'] or '?'} pid {held['pid'] if held['pid'] is not None else '?'}"
    if renewed is not None:
        line += f", lease renewed {_when(renewed)} ({max(0.0, now - renewed):.1f}s ago)"
    if expires is not None:
        line += (f", expires in {expires - now:.1f}s" if expires > now
                 else f", expired {now - expires:.1f}s ago")
    return line


def cmd_release(args: argparse.Namespace, out: Out) -> int:
    store, _ = _open_existing(args.db)
    try:
        taken = store.force_release(args.job, "released by an operator (walstate release)")
    finally:
        store.close()
    if taken is None:
        out.line(f"job {args.job}: nobody holds it (unclaimed or finished); nothing to release")
    else:
        who = describe_owner(taken[0])
        out.line(f"job {args.job} released from host {who.host or '?'} pid {who.pid if who.pid is not None else '?'} "
                 f"(epoch {taken[1]}): that run can write nothing more; a worker or `walstate recover` runs it again")
    return 0


def cmd_show(args: argparse.Namespace, out: Out) -> int:
    store = _open(args.db)  # before the app, as in cmd_jobs
    try:
        blocked = _blocker(args.app, args.db)
        job = views.job_detail(store, args.job)
        if args.app:
            row = store.job(args.job)
            why = None if row is None else blocked(store, row)
            job["blocked"] = None if why is None else why[1]
            job["note"] = None if why is None else why[0]
    finally:
        store.close()
    if out.as_json:
        out.json(job)
        return 0
    out.line(f"job {job['id']}  {job['workflow']} version {job['version']}  key={job['key'] or '-'}  "
             f"{out.state(job['state'])}  {job['progress']}")
    if job.get("note"):
        out.line(f"  {job['note']}: {job['blocked']}")
    if job.get("held_by"):
        out.line(f"  {describe_holder(job['held_by'])}")
    if job["error"]:
        out.line(f"  error: {job['error']}")
    for phase in job["phases"]:
        out.line(f"  {phase['name']}")
        for s in phase["steps"]:
            out.line(f"    {s['name'][:28]:<28} {out.state(s['state'], 10)} attempts {s['attempts']:<3} "
                     f"{_when(s['started_at'])[11:]} -> {_when(s['finished_at'])[11:]}")
            if s.get("waits_for"):
                out.line(f"      {describe_wait(s['waits_for'])}")
            if s["error"]:
                out.line(f"      last error: {s['error'][:200]}")
    out.line("  context:")
    for key, value in job["context"].items():
        out.line(f"    {key}: {json.dumps(value)[:70]}")
    return 0


def cmd_history(args: argparse.Namespace, out: Out) -> int:
    store = _open(args.db)
    rows = views.history(store, args.job, args.step)
    store.close()
    if out.as_json:
        out.json(rows)
        return 0
    for r in rows:
        out.line(f"{_when(r['at'])}  {(r['step'] or '(job)')[:22]:<22} {r['from']:>9} -> {out.state(r['to'], 9)} "
                 f"#{r['attempt']}")
        if r["note"]:
            out.line(f"{'':21}{r['note'][:59]}")
    return 0


def cmd_retry(args: argparse.Namespace, out: Out) -> int:
    store, _ = _open_existing(args.db)
    try:
        row = store.job(args.job)
        if row is not None and row.state == "pending" and args.step is None:
            # Engine.retry() of a pending job changes nothing (it returns []): not a requeue.
            print(f"walstate: job {args.job} is pending already (it has not failed or been cancelled): nothing was "
                  "requeued; it runs under a worker, Engine.run/recover or `walstate recover DB --app MODULE:ATTR`",
                  file=sys.stderr)
            return EXIT_ERROR
        names = operator.retry(store, args.job, args.step)
    finally:
        store.close()
    out.line(f"job {args.job} is pending again; requeued: {', '.join(names) or '(no step)'}; "
             "run it with Engine.run/recover or `walstate recover DB --app MODULE:ATTR`")
    return 0


def cmd_cancel(args: argparse.Namespace, out: Out) -> int:
    store, _ = _open_existing(args.db)
    names = operator.cancel(store, args.job)
    store.close()
    out.line(f"job {args.job} cancelled; steps cancelled: {', '.join(names) or '(none unfinished)'}")
    return 0


def cmd_upgrade(args: argparse.Namespace, out: Out) -> int:
    store, created = _open_existing(args.db, tables=True, create=args.create)
    applied = store.migrated
    store.close()
    if out.as_json:
        # "created" only when it did, so the usual answer keeps its shape.
        out.json({"applied": list(applied), "schema_version": SCHEMA_VERSION, **({"created": True} if created else {})})
    elif created:
        out.line(f"{store.path}: created walstate's tables (schema {SCHEMA_VERSION})")
    elif applied:
        out.line(f"{store.path}: upgraded to schema {SCHEMA_VERSION} (applied {', '.join(map(str, applied))})")
    else:
        out.line(f"{store.path}: already at schema {SCHEMA_VERSION}")
    return 0


def _whole(text: str, minimum: int, maximum: int) -> int:
    # ASCII digits only: str.isdigit() also accepts '²', which int() refuses.
    if not re.fullmatch(r"[0-9]+", text.strip()) or not minimum <= int(text) <= maximum:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from {minimum} to {maximum}")
    return int(text)


def _positive(text: str) -> int:
    """An integer >= 1 that a page of jobs can hold (argparse type)."""
    return _whole(text, 1, views.MAX_PAGE)


def _non_negative(text: str) -> int:
    """An integer >= 0 that the database can take as an offset (argparse type)."""
    return _whole(text, 0, checks.MAX_INT - views.MAX_PAGE - 1)


def _job_id(text: str) -> int:
    """A job id: a whole number from 1 to 2**63-1, the database's integer range (argparse type)."""
    if not re.fullmatch(r"[0-9]+", text.strip()) or not 1 <= int(text) <= checks.MAX_INT:
        raise argparse.ArgumentTypeError(f"{text!r} is not a job id (a whole number from 1 to 2**63-1)")
    return int(text)


def _seconds(zero: bool) -> Callable[[str], float]:
    """Seconds: a finite number > 0 (>= 0 with ``zero``), at most a century (argparse type)."""
    def parse(text: str) -> float:
        try:
            return checks.seconds(float(text), "it", zero=zero)
        except (ValueError, WalstateError):  # not a number, NaN, an infinity, negative, too long
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds {'>= 0' if zero else '> 0'} "
                                             f"(at most {checks.MAX_SECONDS:.0f}, a century)") from None
    parse.__name__ = "seconds"
    return parse


_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def duration(text: str) -> float:
    """Seconds in a duration like ``30d``, ``12h``, ``15m``, ``90s`` or ``1d12h`` (argparse type)."""
    parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)([dhms])", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30d, 12h, 15m or 90s")
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not seconds <= checks.MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r} is longer than a century ({checks.MAX_SECONDS / 86400:.0f}d)")
    return seconds


def cmd_prune(args: argparse.Namespace, out: Out) -> int:
    from .storage.types import check_states, cutoff

    states = check_states(s.strip() for s in args.states.split(","))
    before = cutoff(args.older_than)
    # A dry run opens the file read-only: it cannot change a byte of it.
    store = _open(args.db) if args.dry_run else _open_existing(args.db)[0]
    try:
        count = store.prune(float(args.older_than), states, batch=args.batch, dry_run=args.dry_run)
    finally:
        store.close()
    if out.as_json:
        out.json({"jobs": count, "dry_run": args.dry_run, "states": list(states), "finished_before": before})
    else:
        verb = "would delete" if args.dry_run else "deleted"
        out.line(f"{verb} {count} {'/'.join(states)} job(s) finished before {_when(before)}")
    return 0


def _load_app(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"--app takes MODULE:ATTR (e.g. myapp.jobs:engine), not {spec!r}")
    # The current directory is searched too, but last, after the installed packages: a stray file
    # in it (json.py, pydantic.py) cannot shadow a module walstate or the app imports (README).
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r} for --app: {exc} (looked on sys.path, then in "
                                 f"the current directory {cwd})") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigurationError(f"module {module_name!r} has no attribute {attr!r}") from None


def _call_factory(factory: Callable[[str], Any], spec: str, db: str) -> Any:
    """Call an app's engine factory with the database path; its failure is one clear error, not a traceback."""
    try:
        return factory(db)
    except WalstateError:
        raise
    except Exception as exc:
        raise ConfigurationError(f"{spec}: calling it with the database path ({db}) failed: "
                                 f"{type(exc).__name__}: {exc}; --app takes an Engine, a Workflow, or a factory "
                                 "taking the database path") from exc


def _app_engine(args: argparse.Namespace) -> Any:
    from .engine import Engine

    app = _load_app(args.app)
    engine = app if isinstance(app, Engine) else _call_factory(app, args.app, args.db) if callable(app) else None
    if not isinstance(engine, Engine):
        raise ConfigurationError(f"{args.app} is neither an Engine nor a factory taking the database path")
    if is_postgres_url(args.db):
        same = engine.path == redact(args.db)
    else:
        same = not is_postgres_url(engine.path) and os.path.realpath(engine.path) == os.path.realpath(args.db)
    if not same:
        raise ConfigurationError(f"{args.app} runs on {engine.path}, not {redact(args.db)}")
    return engine


class _StoppedWhileLoading(BaseException):
    """A SIGTERM or SIGINT that came while ``walstate worker`` was still loading its app (see below)."""


def _load_worker_app(args: argparse.Namespace, out: Out) -> Any:
    """The worker's engine; ``None`` when SIGTERM or SIGINT came while the app was imported or built.

    Until the app is loaded the worker has claimed nothing, so a stop request interrupts the import (or the
    factory) at once: one line, exit 0, as a stop of a running worker, rather than the default death by signal.
    """
    loaded: list[bool] = []

    def stop(signum: int, frame: object) -> None:
        if not loaded:  # past the load, cmd_worker's own handlers take over
            raise _StoppedWhileLoading(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            engine = _app_engine(args)
        finally:
            loaded.append(True)
    except _StoppedWhileLoading as stopped:
        out.line(f"worker stopped: {signal.Signals(stopped.args[0]).name} while loading {args.app}, "
                 "before claiming any job")
        return None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return engine


def cmd_worker(args: argparse.Namespace, out: Out) -> int:
    """Run a worker in the foreground; SIGTERM or SIGINT stop it gracefully (exit 0)."""
    engine = _load_worker_app(args, out)
    if engine is None:
        return 0
    if args.log_level != "off" and not logging.getLogger().handlers:
        # What the worker meets (retries, interruptions, takeovers, errors it retries) goes to
        # stderr, unless the app configured logging itself when it was imported (just now).
        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # A signal handler runs in the main thread between two bytecodes, possibly while that thread holds a
    # lock (an Event.wait() in progress holds its Condition's lock): one that takes a lock can deadlock
    # shutdown for good. So the handler only sets a flag, and the C-level wake-up fd (a self-pipe that
    # Python writes the signal number to, async-signal-safe) wakes the main thread's select() at once.
    stopping: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        stopping.append(signum)  # a list append takes no lock a signal could interrupt

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    previous_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker = engine.start_worker(args.concurrency)
        out.line(f"worker on {engine.path}: concurrency {worker.concurrency}, pid {os.getpid()}")
        while not stopping:
            select.select([wake_r], [], [], 1.0)
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
        out.line(f"stopping: no new claims; steps in flight get {args.grace:g}s, then the rest is released")
        engine.stop_worker(drain=False, grace=args.grace)
        engine.close(grace=0)
    finally:
        signal.set_wakeup_fd(previous_fd)  # before its pipe is closed
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(wake_r)
        os.close(wake_w)
    out.line("worker stopped")
    return 0


def cmd_send(args: argparse.Namespace, out: Out) -> int:
    """Send a JSON message to a job (no app needed: the file is enough)."""
    from .context import message_json

    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"the payload is not JSON ({exc}); quote it for the shell, e.g. '{{\"id\": 1}}'") from exc
    except RecursionError:
        raise ConfigurationError("the payload nests arrays or objects too deeply for Python's JSON parser "
                                 "(hundreds of levels); send a flatter message") from None
    store, _ = _open_existing(args.db)
    try:
        _, new = store.send(args.job, args.topic, message_json(payload, "the payload"), args.key)
    finally:
        store.close()
    out.line(f"sent {args.topic!r} to job {args.job}" if new else f"key {args.key!r} was sent before: nothing stored")
    return 0


def cmd_recover(args: argparse.Namespace, out: Out) -> int:
    engine = _app_engine(args)
    ids = engine.recover()
    engine.close()
    out.json(ids) if out.as_json else out.line(f"resumed {len(ids)} job(s): {', '.join(map(str, ids)) or '-'}")
    return 0


def _label(text: str) -> str:
    # A quoted Mermaid label: any text, `end` included; a double quote is written as an entity.
    return '"' + text.replace('"', "#quot;") + '"'


def mermaid_machine() -> str:
    """The sub-step state machine as one Mermaid ``stateDiagram-v2`` document."""
    lines = ["stateDiagram-v2", "    %% the walstate sub-step state machine", "    [*] --> pending"]
    for trigger, moves in STEP.table.items():
        for source, dest in moves.items():
            lines.append(f"    {source} --> {dest}: {trigger}")
    for t in sorted(STEP.terminal):
        lines.append(f"    {t} --> [*]")
    return "\n".join(lines)


def mermaid_workflow(flow: Any) -> str:
    """A workflow as one Mermaid ``flowchart`` document: a subgraph per phase, in order, with the ``after`` edges.

    Node ids are generated (``p0``, ``s0``, ...) and names are quoted labels,
    so a step or phase named like a Mermaid keyword (``end``) cannot break it.
    """
    lines = ["flowchart LR", f"    %% workflow {flow.name}: phases run in order; `after` orders steps inside a phase"]
    ids: dict[str, str] = {}
    for i, phase in enumerate(flow.phases):
        lines.append(f"    subgraph p{i}[{_label(phase)}]")
        for s in flow.phase_steps(phase):
            ids[s.name] = f"s{len(ids)}"
            lines.append(f"        {ids[s.name]}[{_label(s.name)}]")
        lines.append("    end")
    for i in range(1, len(flow.phases)):
        lines.append(f"    p{i - 1} --> p{i}")
    for s in flow.steps.values():
        for dep in s.after:
            lines.append(f"    {ids[dep]} --> {ids[s.name]}")
    return "\n".join(lines)


def cmd_diagram(args: argparse.Namespace, out: Out) -> int:
    kind = args.kind or ("workflow" if args.app else "machine")
    if kind == "machine":
        out.line(mermaid_machine())
        return 0
    if not args.app:
        raise ConfigurationError("--kind workflow needs --app MODULE:ATTR naming a Workflow or an Engine")
    from .engine import Engine
    from .workflow import Workflow

    app = _load_app(args.app)
    if isinstance(app, Workflow):
        flow = app
    else:
        flows = app._flows if isinstance(app, Engine) else {}
        if not flows:
            raise ConfigurationError(f"{args.app} is neither a Workflow nor an Engine with workflows")
        name = args.workflow or next(iter(flows))
        if name not in flows:
            raise ConfigurationError(f"no workflow {name!r} in {args.app}; it has {', '.join(flows)}")
        flow = flows[name]
    out.line(mermaid_workflow(flow))
    return 0


def _progress(job: dict[str, Any]) -> dict[str, Any]:
    """What ``watch --json`` reports of a job: everything that changes as it runs, nothing that does not."""
    phases = []
    for phase in job["phases"]:
        counts: dict[str, int] = {}
        for s in phase["steps"]:
            counts[s["state"]] = counts.get(s["state"], 0) + 1
        phases.append({"name": phase["name"], "steps": counts, "total": len(phase["steps"])})
    waiting = {s["name"]: s["waits_for"] for p in job["phases"] for s in p["steps"] if s.get("waits_for")}
    return {"id": job["id"], "state": job["state"], "phase": job["phase"], "steps": job["steps"],
            "total": job["total"], "progress": job["progress"], "error": job["error"], "phases": phases,
            "waiting": waiting}


_OK = frozenset({"succeeded", "skipped"})
_NOT_OK = frozenset({"failed", "cancelled"})


def _outcomes(states: list[str]) -> str:
    """`` (1 failed, 2 cancelled)`` for the failed and cancelled sub-steps of a phase; empty if none."""
    parts = [f"{states.count(state)} {state}" for state in ("failed", "cancelled") if state in states]
    return f" ({', '.join(parts)})" if parts else ""


def cmd_watch(args: argparse.Namespace, out: Out) -> int:
    last: Any = None
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    while True:
        store = _open(args.db)
        try:
            job = views.job_detail(store, args.job)
        finally:
            store.close()
        ended = job["state"] in TERMINAL_JOB_STATES
        # When what is shown became true: a finished job's end, else the moment this read saw it.
        at = job["updated_at"] if ended else time.time()
        if out.as_json:
            # JSON lines: one object per change, flushed at once so a pipe's reader sees it now.
            now = _progress(job)
            if now != last:
                out.stream.write(json.dumps({"at": at, **now}) + "\n")
                out.stream.flush()
            last = now
        else:
            # Per phase: sub-steps that succeeded (or were skipped), and those that failed or were
            # cancelled, so that a failed phase never reads like a finished one.
            bars = [(p["name"], [s["state"] for s in p["steps"] if s["state"] in _OK],
                     [s["state"] for s in p["steps"] if s["state"] in _NOT_OK], len(p["steps"])) for p in job["phases"]]
            if out.stream.isatty():
                text = "  ".join(f"{n} [{'#' * len(ok)}{'x' * len(bad)}{'.' * (t - len(ok) - len(bad))}]"
                                 for n, ok, bad, t in bars)
                out.stream.write(f"\r{out.state(job['state'], 10)} {text}")
                out.stream.flush()
            else:
                text = "  ".join(f"{n} {len(ok)}/{t}{_outcomes(bad)}" for n, ok, bad, t in bars)
                text += "".join(f"  ({s['name']} {describe_wait(s['waits_for'])})" for p in job["phases"]
                                for s in p["steps"] if s.get("waits_for"))
                if text != last:
                    out.line(f"{_when(at)}  {job['state']:<10} {text}")
                    out.stream.flush()
            last = text
            if ended and out.stream.isatty():
                out.line()
            if ended and job["state"] != "succeeded":
                out.line(f"job {args.job} {job['state']}: {job['progress']}")
        if ended:
            return 0 if job["state"] == "succeeded" else EXIT_ERROR
        if deadline is not None and time.monotonic() > deadline:
            # On stderr, so that stdout stays pure JSON lines under --json.
            print(f"walstate: job {args.job} still {job['state']} after {args.timeout:g}s", file=sys.stderr)
            return EXIT_ERROR
        time.sleep(args.interval)


def cmd_demo(args: argparse.Namespace, out: Out) -> int:
    from .demo import main as demo_main

    _refuse_memory(args.db)  # the demo kills a process and reads what its file kept
    return demo_main(args.db)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="walstate", description="Durable multi-phase jobs on SQLite WAL (DB: a file) or PostgreSQL (DB: a postgresql:// URL).")
    from . import __version__

    p.add_argument("--version", action="version", version=f"walstate {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do (COMMAND -h for its options)")

    def add(name: str, fn: Callable[[argparse.Namespace, Out], int], help: str, db: bool = True,
            job: bool = False, as_json: bool = False,
            json_help: str = "print machine-readable JSON only") -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        if db:
            sp.add_argument("db", metavar="DB", help="the walstate SQLite file, or a postgresql://user@host/db URL")
        if job:
            sp.add_argument("job", metavar="JOB", type=_job_id, help="job id")
        if as_json:
            sp.add_argument("--json", action="store_true", help=json_help)
        sp.set_defaults(fn=fn)
        return sp

    jobs = add("jobs", cmd_jobs, "list jobs, newest first, a page at a time", as_json=True,
               json_help='print one JSON object: {"jobs": [...], "offset", "limit", "next_offset"} '
                         "(next_offset is null on the last page)")
    jobs.add_argument("--state", choices=views.JOB_STATES, help="only jobs in this state")
    jobs.add_argument("--workflow", metavar="NAME", help="only jobs of this workflow")
    jobs.add_argument("--limit", type=_positive, default=50, metavar="N",
                      help="jobs per page (default: %(default)s)")
    jobs.add_argument("--offset", type=_non_negative, default=0, metavar="N",
                      help="skip the N newest matching jobs: the next page starts where the last line says")
    app_help = ("MODULE:ATTR naming your Engine, a Workflow, or a factory taking DB: say which unfinished jobs it "
                "cannot run (\"waiting for code version N\", a changed definition)")
    jobs.add_argument("--app", metavar="MODULE:ATTR", help=app_help)
    show = add("show", cmd_show, "one job as a tree: phases, sub-steps, errors, context", job=True, as_json=True)
    show.add_argument("--app", metavar="MODULE:ATTR", help=app_help)
    hist = add("history", cmd_history, "the transition journal of a job, in commit order", job=True, as_json=True)
    hist.add_argument("--step", help="only this sub-step")
    retry = add("retry", cmd_retry, "put a failed job (or one failed sub-step) back to run", job=True)
    retry.add_argument("step", metavar="STEP", nargs="?", help="only this sub-step")
    add("cancel", cmd_cancel, "cancel a job and its unfinished sub-steps", job=True)
    add("release", cmd_release, "take a job's claim from its owner, live or hung (fencing out that run); the job "
        "is runnable again", job=True)
    upgrade = add("upgrade", cmd_upgrade, "upgrade a file written by an older walstate to this one's schema, in place",
                  as_json=True)
    upgrade.add_argument("--create", action="store_true",
                         help="add walstate's tables to a SQLite file that has other tables but none of walstate's "
                              "(refused without it)")
    prune = add("prune", cmd_prune, "delete finished jobs (steps, journal, once records) older than a duration",
                as_json=True)
    prune.add_argument("--older-than", required=True, type=duration, metavar="AGE",
                       help="finished more than AGE ago: 30d, 12h, 15m, 90s")
    prune.add_argument("--states", default="succeeded,cancelled",
                       help="comma-separated finished states to delete (default: %(default)s; failed is allowed)")
    prune.add_argument("--batch", type=_positive, default=200, help="jobs per transaction (default: %(default)s)")
    prune.add_argument("--dry-run", action="store_true", help="count what would be deleted; change nothing")
    send = add("send", cmd_send, "send a JSON message to a job's step.wait_for(TOPIC)", job=True)
    send.add_argument("topic", metavar="TOPIC", help="the topic the job waits for")
    send.add_argument("payload", metavar="JSON", help="the message, as JSON (e.g. '{\"id\": 1}')")
    send.add_argument("--key", default=None, help="an idempotency key: a message with a key already sent is stored once")
    work = add("worker", cmd_worker, "run a worker in the foreground: claim and run jobs until SIGTERM/SIGINT")
    work.add_argument("--app", required=True, metavar="MODULE:ATTR",
                      help="your app's Engine (or a factory taking the database path), e.g. myapp.jobs:engine")
    work.add_argument("--concurrency", type=_positive, default=None, metavar="N",
                      help="jobs run at once by this worker (default: the engine's workers)")
    work.add_argument("--grace", type=_seconds(zero=True), default=30.0, metavar="S",
                      help="on SIGTERM/SIGINT, seconds steps in flight get to finish before the rest is released")
    work.add_argument("--log-level", choices=["debug", "info", "warning", "error", "off"], default="warning",
                      help="walstate's log records shown on stderr (default: warning: retries, interruptions, "
                           "takeovers); ignored if the app configures logging itself")
    rec = add("recover", cmd_recover, "resume what a dead process left, with your app's Engine", as_json=True)
    rec.add_argument("--app", required=True, metavar="MODULE:ATTR",
                     help="your app's Engine, or a factory taking the database path")
    diag = add("diagram", cmd_diagram, "one Mermaid document: the sub-step machine (stateDiagram-v2), or with "
               "--app a workflow's phases and steps (flowchart)", db=False)
    diag.add_argument("--app", metavar="MODULE:ATTR", help="a Workflow, or an Engine with workflows, to draw")
    diag.add_argument("--workflow", metavar="NAME", help="which workflow of the Engine (default: the first registered)")
    diag.add_argument("--kind", choices=["machine", "workflow"],
                      help="what to draw (default: workflow with --app, else machine)")
    watch = add("watch", cmd_watch, "live progress per phase until the job ends (exit 0 if it succeeded, else 1)",
                job=True, as_json=True, json_help="stream JSON lines: one object per change, the last when the job ends")
    watch.add_argument("--interval", type=_seconds(zero=False), default=0.5, metavar="S",
                       help="seconds between reads of the file (default: %(default)s)")
    watch.add_argument("--timeout", type=_seconds(zero=True), default=None, metavar="S",
                       help="give up (exit 1) if the job has not ended after S seconds (default: wait forever)")
    demo = add("demo", cmd_demo, "run the crash-and-resume demo on a local SQLite file", db=False)
    demo.add_argument("--db", default="walstate-demo.db", help="database file (default: %(default)s)")
    return p


def _not_text(args: argparse.Namespace) -> str | None:
    """The first argument (but DB, a path: any bytes do) that is not valid text: bytes that are not UTF-8
    reach Python as lone surrogates, which no database column can store; its one-line error."""
    for name, value in vars(args).items():
        if name != "db" and isinstance(value, str):
            try:
                checks.text(value, f"argument {name.upper()}", empty=True, error=ConfigurationError)
            except ConfigurationError as exc:
                return str(exc)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    bad = _not_text(args)
    if bad is not None:
        print(f"walstate: error: {bad}", file=sys.stderr)
        return EXIT_USAGE
    out = Out(sys.stdout, getattr(args, "json", False))
    try:
        return int(args.fn(args, out))
    except WalstateError as exc:
        print(f"walstate: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `walstate … | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
