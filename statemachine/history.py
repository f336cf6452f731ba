"""A history of what a run acknowledged, and a checker that proves each acknowledgement held.

Every process of a chaos run (:func:`walstate.testing.run_chaos`) appends to its
own ledger file, one JSON object per line, each line one ``write()`` to an
``O_APPEND`` file (in the kernel as soon as it returns: a SIGKILL right after
cannot lose it). Every line has ``kind``, ``pid`` and ``t`` (``time.monotonic()``,
one clock for every process of the machine). The kinds:

- ``submit`` ``{job, key, workflow}``: ``submit()`` returned the id ``job``;
- ``send`` ``{job, topic, key, payload, new}``: ``send()`` returned (``new``: True; False: stored by an earlier try);
- ``enter`` / ``exit`` ``{job, step, workflow, attempt, call, epoch, outcome}``: a handler was
  called / ended (``call``: the process's own number of the call, pairing the two; ``outcome``:
  ``returned``, ``raised``, ``suspended``, ``aborted``, or ``rolled-back``: a transactional step
  raised an error of the database, so its transaction, attempt count included, was undone and the
  runner may call it again at the same attempt);
- ``once_fn`` ``{job, step, name, call, start, value}``: a ``once()`` function ran from ``start`` and returned
  ``value`` (the outside call);
- ``once`` ``{job, step, name, value}``: ``once()`` returned ``value`` to the handler;
- ``received`` ``{job, step, topic, value}``: ``wait_for()`` returned a message;
- ``effect`` ``{job, step, attempt}``: a transactional step wrote its marker row (with its pid and ``call``);
- ``nemesis`` ``{action, target, seconds}``: ``kill``, ``stop`` (``seconds``: how long), ``hang`` (stopped for good), ``clock``,
  ``pg_restart``, ``pg_terminate``; ``spawn`` ``{target}``: a worker process started;
- ``prune`` ``{removed}``: ``engine.prune(older_than=0)`` deleted ``removed`` jobs (None: it failed). Which
  jobs a prune deleted is in the database itself: a trigger copies every deleted job row to ``PRUNED_TABLE``.

:func:`check_history` reads the ledgers and the database and returns a
:class:`HistoryReport` listing every :class:`Violation` with its evidence.
"""

from __future__ import annotations

import glob
import json
import os
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .fsm import STEP
from .schedules import Schedule
from .storage.contract import is_postgres_url
from .views import SLOT_FORMAT, schedule_of_key

#: The table in which each transactional step's chaos wrapper writes one row, inside the step's transaction.
EFFECT_TABLE = "walstate_chaos_effect"
#: The table into which a trigger copies every deleted job row (id, workflow, key, state, created_at): a prune's.
PRUNED_TABLE = "walstate_chaos_pruned"
# Statements as constant text (the table names above, spelled out): never formatted at run time.
READ_PRUNED = "SELECT job_id, workflow, key, state, created_at FROM walstate_chaos_pruned"
READ_PRUNED_IDS = "SELECT job_id FROM walstate_chaos_pruned"
READ_EFFECTS = "SELECT job_id, step FROM walstate_chaos_effect"
READ_EFFECT_CALLS = "SELECT job_id, step, pid, call_no FROM walstate_chaos_effect"
CREATE_EFFECTS = ("CREATE TABLE IF NOT EXISTS walstate_chaos_effect "
                  "(job_id BIGINT, step TEXT, attempt INTEGER, pid INTEGER, call_no INTEGER)")
INSERT_EFFECT = "INSERT INTO walstate_chaos_effect (job_id, step, attempt, pid, call_no) VALUES (?, ?, ?, ?, ?)"


class Ledger:
    """One process's append-only ledger file in ``directory`` (``ROLE-PID.jsonl``)."""

    def __init__(self, directory: str | os.PathLike[str], role: str) -> None:
        self.directory = os.fspath(directory)
        self.role = role
        self._lock = threading.Lock()
        self._pid = -1
        self._fd = -1

    def append(self, kind: str, **fields: Any) -> None:
        """Write one line now (a single ``write()``); safe from any thread, and after ``fork()``."""
        line = json.dumps({"kind": kind, "pid": os.getpid(), "t": time.monotonic(), **fields}, default=repr) + "\n"
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                path = os.path.join(self.directory, f"{self.role}-{self._pid}.jsonl")
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.write(self._fd, line.encode())


def read_ledgers(directory: str | os.PathLike[str], pattern: str = "*") -> list[dict[str, Any]]:
    """Every line of the ledgers in ``directory`` (``pattern``: of these roles, e.g. ``"submit-*"``), in time order.

    A torn last line (its writer killed mid-``write()``) is skipped.
    """
    lines: list[dict[str, Any]] = []
    for path in glob.glob(os.path.join(os.fspath(directory), pattern + ".jsonl")):
        with open(path, encoding="utf-8") as f:
            for text in f:
                try:
                    lines.append(json.loads(text))
                except json.JSONDecodeError:
                    continue
    lines.sort(key=lambda r: float(r["t"]))
    return lines


@dataclass(frozen=True)
class Violation:
    """One broken rule: which, what happened, and the ledger lines and journal rows that show it."""

    rule: str
    message: str
    evidence: tuple[str, ...] = ()

    def __str__(self) -> str:
        return "\n".join([f"[{self.rule}] {self.message}", *(f"    {e}" for e in self.evidence)])


class HistoryViolation(AssertionError):
    """A chaos run's history broke a rule; the message is the whole report (with the seed)."""


@dataclass
class HistoryReport:
    """What a run did (``counts``) and every rule it broke (``violations``), with the seed that replays it."""

    seed: int | None
    target: str
    counts: Counter[str] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No violation."""
        return not self.violations

    def rules_broken(self) -> set[str]:
        """The names of the rules some violation broke."""
        return {v.rule for v in self.violations}

    def __str__(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        head = f"chaos history of {self.target} (seed {self.seed}): {counts}"
        if self.ok:
            return head + "\nno violation"
        shown = self.violations[:10]
        more = len(self.violations) - len(shown)
        return "\n".join([head, f"{len(self.violations)} violation(s) ({', '.join(sorted(self.rules_broken()))}):",
                          *map(str, shown), *([f"... and {more} more"] if more else [])])

    def raise_on_violation(self) -> None:
        """Raise :class:`HistoryViolation` with the report when a rule was broken."""
        if not self.ok:
            raise HistoryViolation(str(self))


def _line(r: Mapping[str, Any]) -> str:
    return "ledger " + json.dumps(dict(r), sort_keys=True)


class _Losses:
    """When each process lost its claims: killed, or stopped for longer than the lease."""

    def __init__(self, lines: Sequence[Mapping[str, Any]], lease: float) -> None:
        self.kills: dict[int, float] = {}
        self.stops: dict[int, list[tuple[float, float]]] = defaultdict(list)
        for r in lines:
            if r["kind"] == "nemesis" and r["action"] == "kill":
                self.kills.setdefault(int(r["target"]), float(r["t"]))
            elif r["kind"] == "nemesis" and r["action"] == "stop" and float(r["seconds"]) > lease:
                self.stops[int(r["target"])].append((float(r["t"]), float(r["seconds"])))
            elif r["kind"] == "nemesis" and r["action"] == "hang":  # stopped for good
                self.stops[int(r["target"])].append((float(r["t"]), float("inf")))

    def lost(self, pid: int, after: float, before: float) -> str | None:
        """Why ``pid`` lost its claims between ``after`` and ``before`` (None: it did not)."""
        killed = self.kills.get(pid)
        if killed is not None and after <= killed <= before:
            return f"pid {pid} was killed at t={killed:.3f}"
        for start, seconds in self.stops.get(pid, ()):
            if after <= start <= before:
                return f"pid {pid} was stopped at t={start:.3f} for {seconds:.1f}s (past its lease)"
        return None

    def end_of(self, pid: int, after: float) -> float | None:
        """When ``pid``'s run started at ``after`` stopped being live, if it was cut short."""
        ends = [k for k in [self.kills.get(pid)] if k is not None and k >= after]
        ends += [s for s, _ in self.stops.get(pid, ()) if s >= after]
        return min(ends) if ends else None


def check_history(target: str, ledger_dir: str | os.PathLike[str], *, lease: float, seed: int | None = None,
                  expect: str = "succeeded", limits: Mapping[str, int] | None = None,
                  transactional: Iterable[tuple[str, str]] = (), schedules: Iterable[Schedule] = ()) -> HistoryReport:
    """Check the history of a run on ``target`` (a SQLite path or PostgreSQL URL) against its ledgers.

    ``lease`` is the workers' lease (a stop longer than it counts as a lost
    claim); ``expect`` the state every acknowledged job must end in;
    ``limits`` each workflow's ``concurrency``; ``transactional`` the
    ``(workflow, step)`` pairs declared transactional; ``schedules`` the
    engine's schedules (``engine.schedules.values()``). See the README's
    "History checker" section for the rules.
    """
    from .testing import connect

    lines = read_ledgers(ledger_dir)
    report = HistoryReport(seed, target)
    conn = connect(target, timeout=30.0)
    try:
        db = _Database(conn)
    finally:
        conn.close()
    losses = _Losses(lines, lease)
    _count(report, lines, db)
    _check_jobs(report, lines, db, expect)
    _check_messages(report, lines, db)
    _check_runs(report, lines, losses, db, set(transactional))
    _check_once(report, lines, losses, db)
    _check_effects(report, lines, db, set(transactional))
    _check_limits(report, lines, losses, limits or {})
    _check_journal(report, db)
    _check_schedules(report, lines, db, schedules)
    return report


class _Database:
    """The rows the checker reads, read once."""

    def __init__(self, conn: Any) -> None:
        rows = conn.execute("SELECT id, workflow, key, state, error, created_at FROM walstate_job").fetchall()
        self.jobs = {int(r[0]): (str(r[1]), r[2], str(r[3]), r[4]) for r in rows}
        self.created = {int(r[0]): float(r[5]) for r in rows}
        #: Every job row a prune deleted, by id: (workflow, key, state, created_at), in deletion order.
        self.pruned: dict[int, list[tuple[str, Any, str, float]]] = defaultdict(list)
        for r in conn.execute(READ_PRUNED).fetchall():
            self.pruned[int(r[0])].append((str(r[1]), r[2], str(r[3]), float(r[4])))
        self.steps = {(int(r[0]), str(r[1])): (str(r[2]), int(r[3])) for r in conn.execute(
            "SELECT job_id, name, state, attempt FROM walstate_step").fetchall()}
        self.journal = [(int(r[0]), int(r[1]), r[2], str(r[3]), str(r[4]), int(r[5]), r[6]) for r in conn.execute(
            "SELECT id, job_id, step, from_state, to_state, attempt, note FROM walstate_journal ORDER BY id").fetchall()]
        self.messages = {(int(r[0]), str(r[1])): (str(r[2]), r[3]) for r in conn.execute(
            "SELECT job_id, key, topic, consumed_by FROM walstate_message WHERE key IS NOT NULL").fetchall()}
        self.once = {(int(r[0]), str(r[1]), str(r[2])): str(r[3]) for r in conn.execute(
            "SELECT job_id, step, name, result FROM walstate_once").fetchall()}
        self.effects: Counter[tuple[int, str]] = Counter(
            (int(job_id), str(step)) for job_id, step in conn.execute(READ_EFFECTS).fetchall())
        #: The (job, step, pid, call) of every transactional call whose transaction committed.
        self.committed = {(int(r[0]), str(r[1]), int(r[2]), int(r[3]))
                          for r in conn.execute(READ_EFFECT_CALLS).fetchall()}

    def journal_of(self, job_id: int, step: str | None = None) -> list[str]:
        return [f"journal row {r[0]}: job {r[1]} step {r[2]} {r[3]} -> {r[4]} attempt {r[5]} ({r[6]})"
                for r in self.journal if r[1] == job_id and (step is None or r[2] == step)][-8:]


def _count(report: HistoryReport, lines: Sequence[Mapping[str, Any]], db: _Database) -> None:
    c = report.counts
    for r in lines:
        kind = r["kind"]
        if kind == "nemesis":
            c[{"kill": "kills", "stop": "stops", "clock": "clock jumps", "pg_restart": "server restarts",
               "pg_terminate": "session kills"}.get(r["action"], r["action"])] += 1
        elif kind == "spawn":
            c["processes"] += 1
        elif kind == "submit":
            c["jobs"] += 1
        elif kind == "send":
            c["messages"] += 1
        elif kind == "enter":
            c["handler calls"] += 1
        elif kind == "exit" and r["outcome"] == "returned":
            c["completions"] += 1
        elif kind == "prune":
            c["prunes"] += 1
    acked = {(int(r["job"]), r["key"]) for r in lines if r["kind"] == "submit"}
    ended = [(i, j[1], j[2]) for i, j in db.jobs.items()] + [(i, p[1], p[2]) for i, ps in db.pruned.items() for p in ps]
    c["jobs succeeded"] = sum(1 for i, key, state in ended if (i, key) in acked and state == "succeeded")
    c["jobs pruned"] = sum(len(ps) for ps in db.pruned.values())
    c["scheduled jobs"] = sum(1 for _, key, _ in ended if schedule_of_key(key) is not None)


def _check_jobs(report: HistoryReport, lines: Sequence[Mapping[str, Any]], db: _Database, expect: str) -> None:
    """Every acknowledged submit is a job of that key, ended in ``expect``; no id was returned for two keys."""
    for job_id, ps in db.pruned.items():  # the database's own evidence: a deleted id came back
        held = [(p[0], p[1]) for p in ps] + ([db.jobs[job_id][:2]] if job_id in db.jobs else [])
        if len(set(held)) > 1:
            report.violations.append(Violation("job-id-reused", f"job id {job_id} was used for several jobs, the "
                                               f"earlier pruned: {held}", tuple(f"pruned row {p}" for p in ps)))
    keys: dict[int, Mapping[str, Any]] = {}
    for r in lines:
        if r["kind"] == "submit":
            first = keys.setdefault(int(r["job"]), r)
            if first["key"] != r["key"]:
                report.violations.append(Violation("job-id-reused", f"submit returned job {r['job']} for key "
                                                   f"{first['key']!r} and again for key {r['key']!r}",
                                                   (_line(first), _line(r))))
    for r in lines:
        if r["kind"] != "submit":
            continue
        job = db.jobs.get(int(r["job"]))
        pruned = [p for p in db.pruned.get(int(r["job"]), ()) if p[:2] == (r["workflow"], r["key"])]
        if pruned:  # a prune deletes finished jobs only
            if pruned[0][2] != expect:
                report.violations.append(Violation("job-not-" + expect, f"job {r['job']} ended {pruned[0][2]!r} "
                                                   "(then it was pruned)", (_line(r),)))
        elif job is None or job[1] != r["key"] or job[0] != r["workflow"]:
            report.violations.append(Violation("acknowledged-submit-lost", f"submit returned job {r['job']} "
                                               f"(key {r['key']!r}) but the database has {job!r}", (_line(r),)))
        elif job[2] not in ("succeeded", "failed", "cancelled"):
            report.violations.append(Violation("job-stuck", f"job {r['job']} is still {job[2]!r} after the nemeses "
                                               "stopped and the run settled", (_line(r), *db.journal_of(r["job"]))))
        elif job[2] != expect:
            report.violations.append(Violation("job-not-" + expect, f"job {r['job']} ended {job[2]!r}: {job[3]}",
                                               (_line(r), *db.journal_of(r["job"]))))


def _check_messages(report: HistoryReport, lines: Sequence[Mapping[str, Any]], db: _Database) -> None:
    """Every acknowledged message is stored once and consumed, by one wait, whose every receipt agrees."""
    receipts: dict[tuple[int, str], set[str]] = defaultdict(set)
    for r in lines:
        if r["kind"] == "received":
            receipts[(int(r["job"]), json.dumps(r["value"], sort_keys=True))].add(str(r["step"]))
    keys: dict[tuple[int, str], set[str]] = defaultdict(set)  # the distinct messages of each (job, payload)
    for r in lines:
        if r["kind"] == "send":
            keys[(int(r["job"]), json.dumps(r["payload"], sort_keys=True))].add(str(r["key"]))
    for r in lines:
        if r["kind"] != "send":
            continue
        stored = db.messages.get((int(r["job"]), str(r["key"])))
        if stored is None and int(r["job"]) in db.pruned:
            continue  # pruned with its job, which ended (the job rules check how)
        if stored is None:
            report.violations.append(Violation("acknowledged-message-lost", f"send() to job {r['job']} (key "
                                               f"{r['key']!r}) returned {r['new']} but no such message is stored",
                                               (_line(r),)))
        elif stored[1] is None:
            report.violations.append(Violation("message-not-consumed", f"message {r['key']!r} to job {r['job']} "
                                               "was never consumed", (_line(r), *db.journal_of(r["job"]))))
        payload = (int(r["job"]), json.dumps(r["payload"], sort_keys=True))
        steps = receipts.get(payload, set())
        # A receipt names its wait and payload, not the message's key: only more waits than there are messages
        # of that payload shows one message received twice.
        if len(steps) > len(keys[payload]):
            report.violations.append(Violation("message-consumed-twice", f"message {r['key']!r} to job {r['job']} "
                                               f"was received by several waits: {sorted(steps)}", (_line(r),)))


def _runs(lines: Sequence[Mapping[str, Any]]) -> dict[tuple[int, str], list[tuple[Mapping[str, Any], Mapping[str, Any] | None]]]:
    """Each handler call as (enter, exit or None), per (job, step), in time order."""
    out: dict[tuple[int, str], list[tuple[Mapping[str, Any], Mapping[str, Any] | None]]] = defaultdict(list)
    open_: dict[tuple[int, int, str, int], int] = {}
    for r in lines:
        if r["kind"] == "enter":
            key = (int(r["job"]), str(r["step"]))
            open_[(int(r["pid"]), *key, int(r["call"]))] = len(out[key])
            out[key].append((r, None))
        elif r["kind"] == "exit":
            key = (int(r["job"]), str(r["step"]))
            i = open_.pop((int(r["pid"]), *key, int(r["call"])), None)
            if i is not None:
                out[key][i] = (out[key][i][0], r)
    return out


def _check_runs(report: HistoryReport, lines: Sequence[Mapping[str, Any]], losses: _Losses, db: _Database,
                transactional: set[tuple[str, str]]) -> None:
    """A handler ran again only after its earlier call ended or that call's claim was lost; attempts never went down.

    A transactional call whose transaction the database undid (outcome ``rolled-back``, or ``returned`` with no
    marker row of its call: the commit after the return failed) left nothing of its attempt, so the
    next call may come at the same attempt.
    """
    for (job, step), calls in _runs(lines).items():
        for (a, a_exit), (b, _) in zip(calls, calls[1:]):
            evidence = (_line(a), *([_line(a_exit)] if a_exit else []), _line(b), *db.journal_of(job, step))
            if int(b["attempt"]) < int(a["attempt"]):
                report.violations.append(Violation("attempts-went-down", f"job {job} step {step!r}: attempt "
                                                   f"{b['attempt']} after attempt {a['attempt']}", evidence))
            why = losses.lost(int(a["pid"]), float(a["t"]), float(b["t"]))
            if a_exit is None or float(a_exit["t"]) > float(b["t"]):
                if why is None and a_exit is not None:
                    report.violations.append(Violation(
                        "two-live-runs", f"job {job} step {step!r}: the handler was called in pid {b['pid']} while "
                        f"its call in pid {a['pid']} was still running and still held the claim", evidence))
                elif why is None:
                    report.violations.append(Violation(
                        "two-live-runs", f"job {job} step {step!r}: the handler was called in pid {b['pid']} while "
                        f"its call in pid {a['pid']} had not returned, and that process was neither killed nor "
                        "stopped past its lease", evidence))
                continue
            undone = (a["workflow"], step) in transactional and (
                job, step, int(a["pid"]), int(a["call"])) not in db.committed
            if a_exit["outcome"] == "returned" and why is None and not undone:
                report.violations.append(Violation(
                    "re-run-after-return", f"job {job} step {step!r}: the handler returned in pid {a['pid']} and "
                    f"was called again (pid {b['pid']}), though the first call's claim was never lost", evidence))
            elif a_exit["outcome"] == "raised" and int(b["attempt"]) <= int(a["attempt"]) and why is None:
                report.violations.append(Violation(
                    "attempts-went-down", f"job {job} step {step!r}: a failed attempt {a['attempt']} was followed "
                    f"by attempt {b['attempt']}", evidence))


def _check_once(report: HistoryReport, lines: Sequence[Mapping[str, Any]], losses: _Losses, db: _Database) -> None:
    """A once() function ran again only when its earlier caller lost its claim first; every caller got the record."""
    ran: dict[tuple[int, str, str], list[Mapping[str, Any]]] = defaultdict(list)
    got: dict[tuple[int, str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for r in lines:
        if r["kind"] in ("once_fn", "once"):
            (ran if r["kind"] == "once_fn" else got)[(int(r["job"]), str(r["step"]), str(r["name"]))].append(r)
    for (job, step, name), rs in ran.items():
        rs.sort(key=lambda r: float(r["start"]))
        # Legitimate only when the earlier caller lost its claim after it began its call (a kill or a stop
        # in the middle of the outside call is a crash there), before the later call began.
        for a, b in zip(rs, rs[1:]):
            if losses.lost(int(a["pid"]), float(a["start"]), float(b["start"])) is None:
                report.violations.append(Violation(
                    "once-called-twice", f"job {job} step {step!r}: once({name!r})'s function ran in pid {a['pid']} "
                    f"and again in pid {b['pid']}, though the first caller never lost its claim",
                    (_line(a), _line(b), *db.journal_of(job, step))))
    # A record is a superseded run's when a run of a later epoch had entered the job before it was written.
    enters = [r for r in lines if r["kind"] == "enter" and r.get("epoch") is not None]
    entry = {(int(r["pid"]), int(r["call"])): r for r in enters}
    returned = {(int(r["pid"]), str(r["name"]), json.dumps(r["value"], sort_keys=True)): float(r["t"])
                for r in lines if r["kind"] == "once"}
    for (job, step, name), rs in ran.items():
        stored = db.once.get((job, step, name))
        if stored is None:
            continue
        for maker in (r for r in rs if r["value"] == json.loads(stored)):
            mine = entry.get((int(maker["pid"]), int(maker["call"])))
            written = returned.get((int(maker["pid"]), name, json.dumps(maker["value"], sort_keys=True)))
            if mine is None or written is None:
                continue
            later = [e for e in enters if int(e["job"]) == job and int(e["epoch"]) > int(mine["epoch"])
                     and float(mine["t"]) < float(e["t"]) < written]
            if later:
                report.violations.append(Violation(
                    "superseded-write-committed", f"job {job} step {step!r}: the stored once({name!r}) record was "
                    f"written by the run of epoch {mine['epoch']} (pid {maker['pid']}) after a run of epoch "
                    f"{later[0]['epoch']} (pid {later[0]['pid']}) had taken the job over",
                    (_line(mine), _line(later[0]), _line(maker), *db.journal_of(job, step))))
                break
    for (job, step, name), rs in got.items():
        stored = db.once.get((job, step, name))
        if stored is None:
            continue
        value = json.loads(stored)
        for r in rs:
            if r["value"] != value and losses.lost(int(r["pid"]), float(r["t"]), float("inf")) is None:
                report.violations.append(Violation(
                    "once-result-differs", f"job {job} step {step!r}: once({name!r}) returned {r['value']!r} to a "
                    f"live run, but the stored record is {value!r}", (_line(r), *db.journal_of(job, step))))
                break


def _check_effects(report: HistoryReport, lines: Sequence[Mapping[str, Any]], db: _Database,
                   transactional: set[tuple[str, str]]) -> None:
    """Each transactional step that succeeded has its marker row exactly once; one that did not, none."""
    if not transactional:
        return
    for (job_id, step), (state, _) in db.steps.items():
        job = db.jobs.get(job_id)
        if job is None or (job[0], step) not in transactional:
            continue
        n = db.effects[(job_id, step)]
        if n != (1 if state == "succeeded" else 0):
            ev = [_line(r) for r in lines if r["kind"] == "effect" and r["job"] == job_id and r["step"] == step]
            report.violations.append(Violation(
                "transactional-effect-not-once", f"job {job_id} step {step!r} is {state!r} and its transactional "
                f"effect is in the database {n} time(s)", (*ev[-6:], *db.journal_of(job_id, step))))


def _check_limits(report: HistoryReport, lines: Sequence[Mapping[str, Any]], losses: _Losses,
                  limits: Mapping[str, int]) -> None:
    """At no moment did more jobs of a workflow than its ``concurrency`` run a handler with a live claim."""
    for workflow, limit in limits.items():
        events: list[tuple[float, int, int]] = []
        for (job, _), calls in _runs(lines).items():
            for a, a_exit in calls:
                if a["workflow"] != workflow:
                    continue
                end = float(a_exit["t"]) if a_exit else float("inf")
                cut = losses.end_of(int(a["pid"]), float(a["t"]))
                events += [(float(a["t"]), 1, job), (min(end, cut if cut is not None else end), -1, job)]
        live: Counter[int] = Counter()
        for t, delta, job in sorted(events, key=lambda e: (e[0], e[1])):
            live[job] += delta
            if live[job] <= 0:
                del live[job]
            if len(live) > limit:
                report.violations.append(Violation(
                    "concurrency-exceeded", f"workflow {workflow!r} (concurrency={limit}) had {len(live)} jobs "
                    f"running handlers at t={t:.3f}: {sorted(live)}"))
                break


def _check_journal(report: HistoryReport, db: _Database) -> None:
    """Each step's journal is a legal path of the sub-step machine; attempts are numbered 1, 2, ... and never go down."""
    rows: dict[tuple[int, str], list[tuple[int, int, Any, str, str, int, Any]]] = defaultdict(list)
    for r in db.journal:
        if r[2] is not None:
            rows[(r[1], str(r[2]))].append(r)
    for (job_id, step), (state, attempt) in db.steps.items():
        mine = rows.get((job_id, step), [])
        path = ["pending"] + [r[4] for r in mine]
        problem = None
        if any(r[3] != p for r, p in zip(mine, path)) or not STEP.is_legal_path(path):
            problem = f"its journal is not a legal path of the sub-step machine: {path}"
        elif path[-1] != state:
            problem = f"it is {state!r} but its journal ends at {path[-1]!r}"
        elif [r[5] for r in mine if r[4] == "running"] != list(range(1, 1 + sum(r[4] == "running" for r in mine))):
            problem = f"its attempt numbers repeat or skip: {[r[5] for r in mine if r[4] == 'running']}"
        elif [r[5] for r in mine] != sorted(r[5] for r in mine) or (mine and mine[-1][5] != attempt):
            problem = f"its attempts go down or disagree with the row ({attempt}): {[r[5] for r in mine]}"
        elif path.count("succeeded") > 1:
            problem = "it succeeded more than once"
        if problem is not None:
            report.violations.append(Violation("journal-illegal", f"job {job_id} step {step!r}: {problem}",
                                               tuple(db.journal_of(job_id, step))))


def _check_schedules(report: HistoryReport, lines: Sequence[Mapping[str, Any]], db: _Database,
                     schedules: Iterable[Schedule]) -> None:
    """Each slot of a schedule had one job; between its first and last slot with a job, none was skipped unless missed.

    A slot is missed (no job, by the rules of :mod:`walstate.schedules`) only when the job of the next slot
    was made more than ``grace`` seconds after it: a check within ``grace`` would have made its job first.
    A job's ``created_at`` is wall-clock time, and a worker whose clock jumped ahead checked with its own:
    the furthest any one worker's clock jumped widens that bound.
    """
    ahead: dict[int, float] = defaultdict(float)
    for r in lines:
        if r["kind"] == "nemesis" and r["action"] == "clock":
            ahead[int(r["target"])] += float(r["seconds"])
    jumped = max(ahead.values(), default=0.0)
    import datetime as dt

    from croniter import croniter

    for sched in schedules:
        slots: dict[str, dict[int, float]] = defaultdict(dict)
        jobs = [(i, j[1], db.created[i]) for i, j in db.jobs.items() if j[0] == sched.flow.name]
        jobs += [(i, p[1], p[3]) for i, ps in db.pruned.items() for p in ps if p[0] == sched.flow.name]
        for job_id, key, created in jobs:
            of = schedule_of_key(key)
            if of is not None and of[0] == sched.name:
                slots[of[1]].setdefault(job_id, created)
        for slot, made in sorted(slots.items()):
            if len(made) > 1:
                report.violations.append(Violation(
                    "schedule-slot-twice", f"schedule {sched.name!r}: slot {slot} produced {len(made)} jobs: "
                    f"{sorted(made)}", tuple(f"job {i} made at {t:.3f}" for i, t in sorted(made.items()))))
        at = {dt.datetime.strptime(s, SLOT_FORMAT).replace(tzinfo=dt.timezone.utc).timestamp(): min(m.values())
              for s, m in slots.items()}
        seen = sorted(at)
        for first, nxt in zip(seen, seen[1:]):
            it = croniter(sched.cron, dt.datetime.fromtimestamp(first, tz=dt.timezone.utc))
            while (t := float(it.get_next(float))) < nxt:
                if at[nxt] + jumped - sched.grace < t:
                    stamp = dt.datetime.fromtimestamp(t, tz=dt.timezone.utc).strftime(SLOT_FORMAT)
                    report.violations.append(Violation(
                        "schedule-slot-missing", f"schedule {sched.name!r}: slot {stamp} has no job, though the "
                        f"next slot's job was made {at[nxt] - t:.1f}s after it (grace {sched.grace}s, clocks jumped "
                        f"{jumped:.0f}s)"))
                    break


__all__ = ["EFFECT_TABLE", "PRUNED_TABLE", "HistoryReport", "HistoryViolation", "Ledger", "Violation", "check_history", "read_ledgers"]
