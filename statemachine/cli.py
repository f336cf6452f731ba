"""The ``walstate`` command: see, explain and repair jobs from the shell (also ``python -m walstate``).

Read commands open the database read-only (``mode=ro``) and never create or
change it. Errors are one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from .storage import SCHEMA_VERSION, UNFINISHED_JOB_STATES, Store
from .storage.errors import ConfigurationError, ContextInvalid, DefinitionError, VersionNotRegistered, WalstateError
from .storage.reads import JobRow

from . import operator, views
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


def _open(path: str, readonly: bool = True) -> Store:
    return Store(path, readonly=readonly)


def _blocker(spec: str | None, db: str) -> Callable[[Store, JobRow], tuple[str, str] | None]:
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
        engine = app(db)
        if not isinstance(engine, Engine):
            raise ConfigurationError(f"{spec} is neither an Engine, a Workflow nor a factory taking the database path")
        registry = engine._registry
        engine.close()
    else:
        raise ConfigurationError(f"{spec} is neither an Engine, a Workflow nor a factory taking the database path")

    def blocked(store: Store, row: JobRow) -> tuple[str, str] | None:
        if row.state not in UNFINISHED_JOB_STATES:
            return None
        try:
            registry.resolve(row, lambda: store.read.steps(row.id), store.path)
        except VersionNotRegistered as exc:
            return waiting_for(row), str(exc)
        except DefinitionError as exc:
            return "definition changed", str(exc)
        except ContextInvalid as exc:
            return "context no longer validates", str(exc)
        return None

    return blocked


def cmd_jobs(args: argparse.Namespace, out: Out) -> int:
    blocked = _blocker(args.app, args.db)
    store = _open(args.db)
    rows = []
    for job in store.read.jobs(state=args.state, workflow=args.workflow, limit=args.limit):
        line = views.job_line(store, job)
        if args.app:
            why = blocked(store, job)
            line["blocked"] = None if why is None else why[1]
            line["note"] = None if why is None else why[0]
        rows.append(line)
    store.close()
    if out.as_json:
        out.json(rows)
        return 0
    out.line(f"{'ID':>5}  {'WORKFLOW':<12} {'KEY':<10} {'STATE':<10} {'VER':>3} {'PHASE':<10} {'DONE':>7}  UPDATED")
    for r in rows:
        note = f"  {r['note']}" if r.get("note") else ""
        out.line(f"{r['id']:>5}  {r['workflow'][:12]:<12} {(r['key'] or '-')[:10]:<10} {out.state(r['state'], 10)} "
                 f"{r['version']:>3} {(r['phase'] or '-')[:10]:<10} "
                 f"{str(r['done']) + '/' + str(r['total']):>7}  {_when(r['updated_at'])[5:]}{note}")
    if not rows:
        out.line("(no jobs)")
    return 0


def cmd_show(args: argparse.Namespace, out: Out) -> int:
    blocked = _blocker(args.app, args.db)
    store = _open(args.db)
    job = views.job_detail(store, args.job)
    if args.app:
        row = store.read.job(args.job)
        why = None if row is None else blocked(store, row)
        job["blocked"] = None if why is None else why[1]
        job["note"] = None if why is None else why[0]
    store.close()
    if out.as_json:
        out.json(job)
        return 0
    out.line(f"job {job['id']}  {job['workflow']} version {job['version']}  key={job['key'] or '-'}  "
             f"{out.state(job['state'])}  {job['done']}/{job['total']} done")
    if job.get("note"):
        out.line(f"  {job['note']}: {job['blocked']}")
    if job["error"]:
        out.line(f"  error: {job['error']}")
    for phase in job["phases"]:
        out.line(f"  {phase['name']}")
        for s in phase["steps"]:
            out.line(f"    {s['name'][:28]:<28} {out.state(s['state'], 10)} attempts {s['attempts']:<3} "
                     f"{_when(s['started_at'])[11:]} -> {_when(s['finished_at'])[11:]}")
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
    store = _open(args.db, readonly=False)
    names = operator.retry(store, args.job, args.step)
    store.close()
    out.line(f"job {args.job} is pending again; requeued: {', '.join(names) or '(no step)'}; "
             "run it with Engine.run/recover or `walstate recover DB --app MODULE:ATTR`")
    return 0


def cmd_cancel(args: argparse.Namespace, out: Out) -> int:
    store = _open(args.db, readonly=False)
    names = operator.cancel(store, args.job)
    store.close()
    out.line(f"job {args.job} cancelled; steps cancelled: {', '.join(names) or '(none unfinished)'}")
    return 0


def cmd_upgrade(args: argparse.Namespace, out: Out) -> int:
    store = _open(args.db, readonly=False)
    applied = store.migrated
    store.close()
    if out.as_json:
        out.json({"applied": list(applied), "schema_version": SCHEMA_VERSION})
    elif applied:
        out.line(f"{args.db}: upgraded to schema {SCHEMA_VERSION} (applied {', '.join(map(str, applied))})")
    else:
        out.line(f"{args.db}: already at schema {SCHEMA_VERSION}")
    return 0


_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def duration(text: str) -> float:
    """Seconds in a duration like ``30d``, ``12h``, ``15m``, ``90s`` or ``1d12h`` (argparse type)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([dhms])", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30d, 12h, 15m or 90s")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def cmd_prune(args: argparse.Namespace, out: Out) -> int:
    from .storage.retention import check_states, cutoff, prune

    states = check_states(s.strip() for s in args.states.split(","))
    before = cutoff(args.older_than)
    # A dry run opens the file read-only: it cannot change a byte of it.
    store = _open(args.db, readonly=args.dry_run)
    try:
        count = prune(store.db, store.path, args.older_than, states, batch=args.batch, dry_run=args.dry_run)
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
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r} for --app: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigurationError(f"module {module_name!r} has no attribute {attr!r}") from None


def cmd_recover(args: argparse.Namespace, out: Out) -> int:
    from .engine import Engine

    app = _load_app(args.app)
    engine = app if isinstance(app, Engine) else app(args.db) if callable(app) else None
    if not isinstance(engine, Engine):
        raise ConfigurationError(f"{args.app} is neither an Engine nor a factory taking the database path")
    if os.path.realpath(engine.path) != os.path.realpath(args.db):
        raise ConfigurationError(f"{args.app} runs on {engine.path}, not {args.db}")
    ids = engine.recover()
    engine.close()
    out.json(ids) if out.as_json else out.line(f"resumed {len(ids)} job(s): {', '.join(map(str, ids)) or '-'}")
    return 0


def mermaid(flow: Any | None) -> str:
    """The sub-step machine, and a workflow's phases and `after` edges, as Mermaid text."""
    lines = ["%% the sub-step state machine", "stateDiagram-v2", "    [*] --> pending"]
    for trigger, moves in STEP.table.items():
        for source, dest in moves.items():
            lines.append(f"    {source} --> {dest}: {trigger}")
    for t in sorted(STEP.terminal):
        lines.append(f"    {t} --> [*]")
    if flow is not None:
        lines += ["", f"%% workflow {flow.name!r}: phases run in order, `after` edges inside a phase", "flowchart LR"]
        for i, phase in enumerate(flow.phases):
            lines.append(f"    subgraph phase{i}[{phase}]")
            for s in flow.phase_steps(phase):
                lines.append(f"        {s.name}")
            lines.append("    end")
            if i:
                lines.append(f"    phase{i - 1} --> phase{i}")
        for s in flow.steps.values():
            for dep in s.after:
                lines.append(f"    {dep} --> {s.name}")
    return "\n".join(lines)


def cmd_diagram(args: argparse.Namespace, out: Out) -> int:
    flow = None
    if args.app:
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
    out.line(mermaid(flow))
    return 0


def cmd_watch(args: argparse.Namespace, out: Out) -> int:
    last = None
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    while True:
        store = _open(args.db)
        job = views.job_detail(store, args.job)
        store.close()
        bars = []
        for phase in job["phases"]:
            done = sum(s["state"] in STEP.terminal for s in phase["steps"])
            total = len(phase["steps"])
            bars.append((phase["name"], done, total))
        if out.stream.isatty():
            text = "  ".join(f"{n} [{'#' * d}{'.' * (t - d)}]" for n, d, t in bars)
            out.stream.write(f"\r{out.state(job['state'], 10)} {text}")
            out.stream.flush()
        else:
            text = "  ".join(f"{n} {d}/{t}" for n, d, t in bars)
            if text != last:
                out.line(f"{_when(time.time())}  {job['state']:<10} {text}")
        last = text
        if job["state"] in ("succeeded", "failed", "cancelled"):
            if out.stream.isatty():
                out.line()
            return 0 if job["state"] == "succeeded" else EXIT_ERROR
        if deadline is not None and time.monotonic() > deadline:
            out.line(f"job {args.job} still {job['state']} after {args.timeout}s")
            return EXIT_ERROR
        time.sleep(args.interval)


def cmd_demo(args: argparse.Namespace, out: Out) -> int:
    from .demo import main as demo_main

    return demo_main(args.db)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="walstate", description="Durable multi-phase jobs on SQLite WAL.")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace, Out], int], help: str, db: bool = True,
            job: bool = False, as_json: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        if db:
            sp.add_argument("db", metavar="DB", help="the walstate SQLite file")
        if job:
            sp.add_argument("job", metavar="JOB", type=int, help="job id")
        if as_json:
            sp.add_argument("--json", action="store_true", help="print machine-readable JSON only")
        sp.set_defaults(fn=fn)
        return sp

    jobs = add("jobs", cmd_jobs, "list jobs, newest first", as_json=True)
    jobs.add_argument("--state", choices=["pending", "running", "succeeded", "failed", "cancelled"])
    jobs.add_argument("--workflow")
    jobs.add_argument("--limit", type=int, default=50)
    app_help = ("MODULE:ATTR naming your Engine, a Workflow, or a factory taking DB: say which unfinished jobs it "
                "cannot run (\"waiting for code version N\", a changed definition)")
    jobs.add_argument("--app", help=app_help)
    show = add("show", cmd_show, "one job as a tree: phases, sub-steps, errors, context", job=True, as_json=True)
    show.add_argument("--app", help=app_help)
    hist = add("history", cmd_history, "the transition journal of a job, in commit order", job=True, as_json=True)
    hist.add_argument("--step", help="only this sub-step")
    retry = add("retry", cmd_retry, "put a failed job (or one failed sub-step) back to run", job=True)
    retry.add_argument("step", metavar="STEP", nargs="?", help="only this sub-step")
    add("cancel", cmd_cancel, "cancel a job and its unfinished sub-steps", job=True)
    add("upgrade", cmd_upgrade, "upgrade a file written by an older walstate to this one's schema, in place",
        as_json=True)
    prune = add("prune", cmd_prune, "delete finished jobs (steps, journal, once records) older than a duration",
                as_json=True)
    prune.add_argument("--older-than", required=True, type=duration, metavar="AGE",
                       help="finished more than AGE ago: 30d, 12h, 15m, 90s")
    prune.add_argument("--states", default="succeeded,cancelled",
                       help="comma-separated finished states to delete (default: %(default)s; failed is allowed)")
    prune.add_argument("--batch", type=int, default=200, help="jobs per transaction (default: %(default)s)")
    prune.add_argument("--dry-run", action="store_true", help="count what would be deleted; change nothing")
    rec = add("recover", cmd_recover, "resume what a dead process left, with your app's Engine", as_json=True)
    rec.add_argument("--app", required=True, help="MODULE:ATTR naming an Engine, or a factory taking DB")
    diag = add("diagram", cmd_diagram, "the sub-step machine and a workflow's phases as Mermaid text", db=False)
    diag.add_argument("--app", help="MODULE:ATTR naming a Workflow or an Engine")
    diag.add_argument("--workflow", help="which workflow of the Engine")
    watch = add("watch", cmd_watch, "live progress per phase until the job ends", job=True)
    watch.add_argument("--interval", type=float, default=0.5)
    watch.add_argument("--timeout", type=float, default=None)
    demo = add("demo", cmd_demo, "run the crash-and-resume demo on a local SQLite file", db=False)
    demo.add_argument("--db", default="walstate-demo.db", help="database file (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
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
