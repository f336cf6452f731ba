"""Rebuild what an honest disk could hold after a power cut, and check each image.

One recorded run (the shim's log, see shim.c) serves every cut point: for a
cut after event ``k``, :class:`Replay` knows each file's bytes as the program
left them, as of its last fsync, and the writes in between; a disk *model*
decides which of those writes survived:

``crash``     process crash only: everything written is there (page cache survives).
``sync``      only what was fsynced survives; every later write is lost.
``prefix``    the disk wrote in issue order and stopped somewhere after the last fsync.
``reorder``   any subset of the unsynced writes survived, each whole.
``torn512``   any subset of the unsynced writes' 512 B sectors survived.
``torn4k``    the same with 4 KiB pages.
``dirsync``   fsynced data, and only the directory entries as of the last directory fsync.
``nofsync``   (negative control) a disk that ignores fsync: any subset of all writes ever made.

Each image is written to a fresh directory (no ``-shm``) and opened with
``sqlite3``: ``integrity_check`` must be ok and its content must equal a
state the program committed (the ``crash`` image right after some commit).
Then the acknowledgements issued before the cut are checked against it:
every one present (``expect="all"``: ``durability="full"``, and any
durability under ``crash``), or a prefix (``expect="prefix"``: the lost
commits are the newest ones, and nothing acknowledged before the surviving
commit is lost). For ``prefix`` the loss is measured in commits and in
milliseconds (how old the oldest lost commit was at the cut).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sqlite3
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MODELS = ("crash", "sync", "prefix", "reorder", "torn512", "torn4k", "dirsync")
NEGATIVE_MODELS = ("nofsync",)

Fact = tuple[Any, ...]
Files = dict[str, bytes]


@dataclass(slots=True)
class Event:
    index: int
    kind: str  # W T S D C U R A
    ns: int
    a: int
    name: str
    name2: str
    data: bytes


def read_log(path: str) -> list[Event]:
    """Parse the shim's log into events, in the order the calls took effect."""
    events: list[Event] = []
    with open(path, "rb") as f:
        while True:
            line = f.readline()
            if not line:
                break
            head, *names = line.rstrip(b"\n").split(b"\t")
            kind, ns, a, _b, n = head.split(b" ")
            data = f.read(int(n))
            if len(data) != int(n):
                raise ValueError(f"{path}: truncated record {line!r}")
            events.append(Event(len(events), kind.decode(), int(ns), int(a), names[0].decode() if names else "",
                                names[1].decode() if len(names) > 1 else "", data))
    return events


Op = tuple[int, str, int, bytes]  # (event index, "W"/"T", offset or size, data)


def apply_ops(base: bytes, ops: list[Op]) -> bytes:
    buf = bytearray(base)
    for _, kind, a, data in ops:
        if kind == "W":
            if a > len(buf):
                buf.extend(bytes(a - len(buf)))
            buf[a:a + len(data)] = data
        else:
            if a < len(buf):
                del buf[a:]
            else:
                buf.extend(bytes(a - len(buf)))
    return bytes(buf)


@dataclass
class Inode:
    cur: bytearray = field(default_factory=bytearray)
    durable: bytes = b""
    pending: list[Op] = field(default_factory=list)  # since the last fsync
    history: list[Op] = field(default_factory=list)  # every op (for the disk that ignores fsync)


class Replay:
    """Apply events one by one; :meth:`image` gives what a disk model holds at this point."""

    def __init__(self) -> None:
        self.inodes: list[Inode] = []
        self.names: dict[str, int] = {}
        self.durable_names: dict[str, int] = {}
        self.last_barrier = 0  # index after the last fsync of any file or directory
        self.k = 0

    def apply(self, e: Event) -> None:
        self.k = e.index + 1
        if e.kind == "C":
            self.inodes.append(Inode())
            self.names[e.name] = len(self.inodes) - 1
        elif e.kind in ("W", "T"):
            if e.name not in self.names:  # opened before the log began: start empty
                self.inodes.append(Inode())
                self.names[e.name] = len(self.inodes) - 1
            node = self.inodes[self.names[e.name]]
            op: Op = (e.index, e.kind, e.a, e.data)
            if e.a > len(node.cur):
                node.cur.extend(bytes(e.a - len(node.cur)))
            if e.kind == "W":
                node.cur[e.a:e.a + len(e.data)] = e.data
            else:
                del node.cur[e.a:]
            node.pending.append(op)
            node.history.append(op)
        elif e.kind == "S":
            if e.name in self.names:
                node = self.inodes[self.names[e.name]]
                node.durable = bytes(node.cur)
                node.pending = []
            self.last_barrier = self.k
        elif e.kind == "D":
            self.durable_names = dict(self.names)
            self.last_barrier = self.k
        elif e.kind == "U":
            self.names.pop(e.name, None)
        elif e.kind == "R":
            ino = self.names.pop(e.name, None) if e.name else None
            if e.name2:
                if ino is None:
                    self.inodes.append(Inode())
                    ino = len(self.inodes) - 1
                self.names[e.name2] = ino

    def image(self, model: str, rng: random.Random) -> Files:
        names = self.durable_names if model == "dirsync" else self.names
        out: Files = {}
        keep = rng.random()  # how lossy this image is: from nearly nothing kept to nearly everything
        cutoff = rng.randint(self.last_barrier, self.k) if model == "prefix" else 0
        for name, ino in names.items():
            node = self.inodes[ino]
            if model == "crash":
                out[name] = bytes(node.cur)
            elif model in ("sync", "dirsync"):
                out[name] = node.durable
            elif model == "prefix":
                out[name] = apply_ops(node.durable, [op for op in node.pending if op[0] < cutoff])
            elif model == "reorder":
                out[name] = apply_ops(node.durable, [op for op in node.pending if rng.random() < keep])
            elif model in ("torn512", "torn4k"):
                out[name] = apply_ops(node.durable, _torn(node.pending, 512 if model == "torn512" else 4096, keep, rng))
            elif model == "nofsync":
                out[name] = apply_ops(b"", [op for op in node.history if rng.random() < keep])
            else:
                raise ValueError(f"unknown disk model {model!r}")
        return out


def _torn(ops: list[Op], sector: int, keep: float, rng: random.Random) -> list[Op]:
    out: list[Op] = []
    for op in ops:
        idx, kind, a, data = op
        if kind == "T":
            if rng.random() < keep:
                out.append(op)
            continue
        pos = a
        while pos < a + len(data):
            end = min((pos // sector + 1) * sector, a + len(data))
            if rng.random() < keep:
                out.append((idx, "W", pos, data[pos - a:end - a]))
            pos = end
    return out


def commit_points(events: list[Event]) -> list[int]:
    """Indices ``k`` (cut after ``k`` events) at which a commit had just become visible.

    WAL: the page written after a frame header whose "database size after
    commit" field is non-zero. Rollback journal (how SQLite creates the file,
    before WAL mode is on): the journal's deletion or truncation.
    """
    points = [0]
    page_size = 0
    header: tuple[int, bool] | None = None
    for e in events:
        if e.kind == "W" and e.name.endswith("-wal"):
            if e.a == 0 and len(e.data) >= 32:
                page_size = struct.unpack(">I", e.data[8:12])[0]
            elif len(e.data) == 24:
                header = (e.a, struct.unpack(">I", e.data[4:8])[0] != 0)
            elif page_size and len(e.data) == 24 + page_size:
                if struct.unpack(">I", e.data[4:8])[0] != 0:
                    points.append(e.index + 1)
            elif header is not None and e.a == header[0] + 24:
                if header[1]:
                    points.append(e.index + 1)
                header = None
        elif e.name.endswith("-journal") and (e.kind == "U" or (e.kind == "T" and e.a == 0)):
            points.append(e.index + 1)
    points.append(len(events))
    return sorted(set(points))


FactsOf = Callable[[sqlite3.Connection], set[Fact]]


def walstate_facts(conn: sqlite3.Connection) -> set[Fact]:
    """What a walstate database holds, in the vocabulary of the workloads' acknowledgements."""
    facts: set[Fact] = set()
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "walstate_job" not in tables:
        return facts
    facts.update(("job", r[0]) for r in conn.execute("SELECT id FROM walstate_job"))
    position: dict[int, int] = {}
    for job, step, to_state, attempt in conn.execute(
            "SELECT job_id, step, to_state, attempt FROM walstate_journal ORDER BY id"):
        position[job] = position.get(job, 0) + 1
        facts.add(("journal", job, position[job], step, to_state, attempt))
        facts.add(("step", job, step, to_state, attempt))
    if "effects" in tables:
        facts.update(("effect", j, s) for j, s in conn.execute("SELECT job, step FROM effects"))
    return facts


def raw_facts(conn: sqlite3.Connection) -> set[Fact]:
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    return {("row", r[0]) for r in conn.execute("SELECT id FROM t")} if "t" in tables else set()


def walstate_journal_errors(conn: sqlite3.Connection) -> list[str]:
    """walstate's own invariants on any committed state (finished or not).

    Each step's and each job's journal chains (every move starts where the
    previous one ended, from ``pending``) and ends at the row's state;
    attempts never go down and end at the row's count; a step's rows name
    an existing job.
    """
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "walstate_job" not in tables:
        return []
    errors: list[str] = []
    chains: dict[tuple[int, str | None], list[tuple[str, str, int]]] = {}
    for job, step, src, dst, attempt in conn.execute(
            "SELECT job_id, step, from_state, to_state, attempt FROM walstate_journal ORDER BY id"):
        chains.setdefault((job, step), []).append((src, dst, attempt))
    rows: dict[tuple[int, str | None], tuple[str, int]] = {}
    for job, state in conn.execute("SELECT id, state FROM walstate_job"):
        rows[(job, None)] = (state, -1)
    for job, name, state, attempt in conn.execute("SELECT job_id, name, state, attempt FROM walstate_step"):
        if (job, None) not in rows:
            errors.append(f"step {name!r} of missing job {job}")
        rows[(job, name)] = (state, attempt)
    for key, (state, attempt) in rows.items():
        chain = chains.get(key, [])
        at = "pending"
        for src, dst, _ in chain:
            if src != at:
                errors.append(f"{key}: journal jumps from {at!r} to a move from {src!r}")
            at = dst
        if at != state:
            errors.append(f"{key}: row is {state!r} but its journal ends at {at!r}")
        attempts = [a for _, _, a in chain]
        if key[1] is not None and (attempts != sorted(attempts) or (attempts and attempts[-1] != attempt)):
            errors.append(f"{key}: attempts {attempts} vs row {attempt}")
    for key in chains:
        if key not in rows:
            errors.append(f"{key}: journal rows for a missing job or step")
    return errors


@dataclass
class Opened:
    """What one image holds when SQLite opens it."""

    error: str | None
    digest: str = ""
    facts: frozenset[Fact] = frozenset()
    invariant_errors: tuple[str, ...] = ()


def open_image(files: Files, db_name: str, facts_of: FactsOf, scratch: str) -> Opened:
    """Write ``files`` to a fresh directory, open the database with sqlite3 and read it."""
    directory = tempfile.mkdtemp(dir=scratch)
    try:
        # A database file that is absent or empty opens as the empty database:
        # the state before the first commit (commit point 0).
        for name, data in files.items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
        conn = sqlite3.connect(os.path.join(directory, db_name), isolation_level=None)
        try:
            # The checker's own copy needs no durability: no fsync when closing it checkpoints.
            conn.execute("PRAGMA synchronous=OFF")
            check = conn.execute("PRAGMA integrity_check").fetchall()
            if check != [("ok",)]:
                return Opened(f"integrity_check: {check[:3]}")
            h = hashlib.sha256()
            for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name"):
                h.update(table.encode())
                for row in conn.execute(f'SELECT * FROM "{table}" ORDER BY rowid'):  # name read from the schema
                    h.update(repr(row).encode())
            return Opened(None, h.hexdigest(), frozenset(facts_of(conn)),
                          tuple(walstate_journal_errors(conn)))
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return Opened(f"sqlite3: {exc}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Failure:
    k: int
    model: str
    reason: str


@dataclass
class Result:
    images: int = 0
    failures: list[Failure] = field(default_factory=list)
    per_model: dict[str, int] = field(default_factory=dict)  # failures per model
    checked_per_model: dict[str, int] = field(default_factory=dict)
    max_lost_commits: int = 0
    max_lost_ms: float = 0.0
    lossy_images: int = 0
    #: Image files (per model and cut) kept for recover(): (k, model, files).
    samples: list[tuple[int, str, Files]] = field(default_factory=list)


class Checker:
    """Check the images of one recorded run."""

    def __init__(self, events: list[Event], db_name: str, facts_of: FactsOf, scratch: str) -> None:
        self.events = events
        self.db_name = db_name
        self.facts_of = facts_of
        self.scratch = scratch
        self._cache: dict[str, Opened] = {}
        # acks[i] = (event index, fact)
        self.acks: list[tuple[int, Fact]] = [(e.index, tuple(json.loads(line)))
                                            for e in events if e.kind == "A"
                                            for line in e.data.decode().splitlines() if line]
        self.commits = commit_points(events)
        self.states: dict[str, list[int]] = {}  # digest -> commit ordinals
        self.state_facts: dict[str, frozenset[Fact]] = {}
        self.reference_errors: list[str] = []
        self._build_states()

    def _open(self, files: Files) -> Opened:
        h = hashlib.sha256()
        for name in sorted(files):
            h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        key = h.hexdigest()
        if key not in self._cache:
            self._cache[key] = open_image(files, self.db_name, self.facts_of, self.scratch)
        return self._cache[key]

    def _build_states(self) -> None:
        replay = Replay()
        rng = random.Random(0)
        points = iter(self.commits)
        nxt = next(points)
        ordinal = 0
        for k in range(len(self.events) + 1):
            if k > 0:
                replay.apply(self.events[k - 1])
            if k != nxt:
                continue
            opened = self._open(replay.image("crash", rng))
            if opened.error:
                self.reference_errors.append(f"crash image after event {k} does not open: {opened.error}")
            else:
                self.states.setdefault(opened.digest, []).append(ordinal)
                self.state_facts[opened.digest] = opened.facts
            ordinal += 1
            nxt = next(points, -1)

    def cuts(self) -> list[int]:
        return list(range(1, len(self.events) + 1))

    def check(self, models: tuple[str, ...], expect: str, cuts: list[int] | None = None, seed: int = 0,
              per_cut: int = 1, sample_every: int = 0) -> Result:
        """Check images at ``cuts`` (default: every event) under ``models``."""
        result = Result()
        wanted = sorted(set(self.cuts() if cuts is None else cuts))
        replay = Replay()
        nxt_i = 0
        acks_before = 0
        for k in range(1, len(self.events) + 1):
            replay.apply(self.events[k - 1])
            while acks_before < len(self.acks) and self.acks[acks_before][0] < k:
                acks_before += 1
            if nxt_i >= len(wanted) or wanted[nxt_i] != k:
                continue
            nxt_i += 1
            for model in models:
                tries = 1 if model in ("crash", "sync", "dirsync") else per_cut
                for t in range(tries):
                    rng = random.Random(f"{seed}-{k}-{model}-{t}")
                    files = replay.image(model, rng)
                    result.images += 1
                    result.checked_per_model[model] = result.checked_per_model.get(model, 0) + 1
                    reason = self._judge(files, k, acks_before, "all" if model == "crash" else expect, result)
                    if reason is not None:
                        result.failures.append(Failure(k, model, reason))
                        result.per_model[model] = result.per_model.get(model, 0) + 1
                    elif sample_every and result.images % sample_every == 0:
                        result.samples.append((k, model, files))
        return result

    def _judge(self, files: Files, k: int, acks_before: int, expect: str, result: Result) -> str | None:
        opened = self._open(files)
        if opened.error:
            return f"corrupt: {opened.error}"
        ordinals = [o for o in self.states.get(opened.digest, []) if self.commits[o] <= k]
        if not ordinals:
            return "content is not a state the program committed (before this cut)"
        if opened.invariant_errors:
            return "walstate invariant: " + "; ".join(opened.invariant_errors[:3])
        j = max(ordinals)
        facts = self.state_facts[opened.digest]
        missing = [(e, f) for e, f in self.acks[:acks_before] if f not in facts]
        if expect == "all":
            if missing:
                return f"{len(missing)} acknowledged change(s) lost, first {list(missing[0][1])}"
            return None
        # prefix: nothing acknowledged before the surviving commit may be missing.
        early = [(e, f) for e, f in missing if e < self.commits[j]]
        if early:
            return f"lost change is not a suffix: {list(early[0][1])} acknowledged before the surviving commit"
        visible = sum(1 for c in self.commits[1:] if c <= k)  # commits made before the cut
        lost = visible - j
        if lost > 0:
            result.lossy_images += 1
            result.max_lost_commits = max(result.max_lost_commits, lost)
            first_lost = self.commits[j + 1]
            ms = (self.events[k - 1].ns - self.events[first_lost - 1].ns) / 1e6
            result.max_lost_ms = max(result.max_lost_ms, ms)
        return None

    def real_files_mismatch(self, directory: str) -> list[str]:
        """Compare the files really in ``directory`` with the log replayed to its end (a missed call shows here)."""
        replay = Replay()
        for e in self.events:
            replay.apply(e)
        expected = replay.image("crash", random.Random(0))
        real: Files = {}
        for n in os.listdir(directory):
            if not n.endswith("-shm"):
                with open(os.path.join(directory, n), "rb") as f:
                    real[n] = f.read()
        problems = [f"{n}: on disk but not in the log" for n in sorted(set(real) - set(expected))]
        problems += [f"{n}: in the log but not on disk" for n in sorted(set(expected) - set(real))]
        problems += [f"{n}: {len(real[n])} bytes on disk, the log replays to {len(expected[n])} bytes or other content"
                     for n in sorted(set(real) & set(expected)) if real[n] != expected[n]]
        return problems

