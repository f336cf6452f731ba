"""Hand-made SQL mutants: every owner and epoch condition of walstate's SQL, weakened one at a time.

mutmut mutates Python, never the text of a statement, so the fencing of the write path (every
write of a run is conditioned on the job's owner and claim epoch) would go untested by it. This
script finds each such condition in the statements of ``storage/`` (``owner IS ?``, ``owner=?``,
``epoch=?`` after ``WHERE``/``AND``, the multi-row update's ``owner IS v.column13`` and
``epoch=v.column14``, and the epoch of the claim's ``(id, epoch) IN`` list of dead owners),
weakens it (``epoch=?`` -> ``(epoch=? OR 1=1)``; the epoch of ``(id, epoch) IN`` compared with
itself), and runs the fencing tests against that one mutant, on SQLite and on PostgreSQL.

The sources are never edited: each mutant is a copy of the package (``statemachine/`` as
``walstate``, ``storage/`` as ``walstate.storage``) in a temporary directory put first on
``PYTHONPATH``. A statement only one backend runs (PostgreSQL's own spellings in
``postgres.py``, SQLite's multi-row update, base statements PostgreSQL overrides) is tested on
that backend only ("n/a" on the other).

Usage: ``python tests/sql_mutants.py [--only SUBSTRING] [--backend sqlite|postgres]``; ``make
mutmut`` runs it after mutmut. Prints a table and exits 1 if a mutant survived.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The fencing tests every mutant runs against (in-process: the mutated copy is what they import).
TESTS = [
    "tests/test_sql_fencing.py",
    "tests/test_ownership.py",
    "tests/test_mutants_ownership.py",
    "tests/test_waits.py",
    "tests/test_versions.py",
    "tests/test_contract.py",
]

#: Conditions on a job's owner or epoch, in a WHERE clause (not ``SET owner=?``).
CONDITION = re.compile(r"(?<=(?:AND|ERE) )((?:walstate_job\.)?(?:owner IS \?|owner=\?|epoch=\?|"
                       r"owner IS v\.column13|epoch=v\.column14))")
#: The epoch of each (id, epoch) pair of the claim's list of jobs whose owner was found dead.
DEAD_EPOCH = re.compile(r"(?<=\(id, epoch\) IN \(SELECT )(json_extract\(value, '\$\[0\]'\), )"
                        r"(json_extract\(value, '\$\[1\]'\))|(?<=\(id, epoch\) IN \(SELECT )(\(d->>0\)::bigint, )"
                        r"(\(d->>1\)::bigint)")
#: Statements of writepath.py that PostgreSQL replaces with its own (see PgWritePath), or never runs.
PG_OVERRIDES = {"_UPDATE_STEP", "_OWNED", "_RUNNABLE", "_update_steps"}
#: Conditions that cannot matter on one backend, and why (the mutant is reported as equivalent there).
EQUIVALENT = {
    ("_MOVE_JOB", "sqlite"): "equivalent: the migration reads the epoch and writes under one BEGIN IMMEDIATE, "
                             "so no claim comes between (PostgreSQL's READ COMMITTED lets one: tested there)",
}


@dataclass
class Mutant:
    file: str       # relative to ROOT, e.g. storage/writepath.py
    line: int
    where: str      # the statement's attribute or method
    original: str   # the condition, as the table names it
    piece: str      # the text replaced
    weakened: str   # what replaces it
    start: int
    end: int

    @property
    def name(self) -> str:
        return f"{Path(self.file).stem}:{self.line} {self.where} {self.original}"

    def backends(self) -> list[str]:
        if self.file.endswith("postgres.py"):
            return ["postgres"]
        if self.where in PG_OVERRIDES:
            return ["sqlite"]
        return ["sqlite", "postgres"]


def _where(text: str, offset: int) -> str:
    """The class attribute or method the statement at ``offset`` belongs to."""
    head = text[:offset]
    found = None
    for m in re.finditer(r"^[ \t]*(?:(_[A-Za-z_]+) = |def (\w+)\()", head, re.M):
        found = m.group(1) or m.group(2)
    return found or "?"


def find_mutants() -> list[Mutant]:
    out = []
    for path in sorted((ROOT / "storage").glob("*.py")):
        text = path.read_text()
        rel = str(path.relative_to(ROOT))
        for m in CONDITION.finditer(text):
            original = m.group(1)
            out.append(Mutant(rel, text.count("\n", 0, m.start()) + 1, _where(text, m.start()), original, original,
                              f"({original} OR 1=1)", m.start(), m.end()))
        for m in DEAD_EPOCH.finditer(text):
            idx = 2 if m.group(2) is not None else 4
            out.append(Mutant(rel, text.count("\n", 0, m.start()) + 1, _where(text, m.start()),
                              "(id, epoch) IN dead", m.group(idx), "epoch", m.start(idx), m.end(idx)))
    return out


def package_copy(dest: Path, mutant: Mutant) -> None:
    """``dest/walstate``: the package as installed, with ``mutant`` applied to its one file."""
    pkg = dest / "walstate"
    shutil.copytree(ROOT / "statemachine", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "storage", pkg / "storage", ignore=shutil.ignore_patterns("__pycache__"))
    target = (pkg / "storage" / Path(mutant.file).name)
    text = target.read_text()
    assert text[mutant.start:mutant.end] == mutant.piece, f"{mutant.name}: the source changed under the script"
    target.write_text(text[:mutant.start] + mutant.weakened + text[mutant.end:])


def run_tests(pythonpath: Path, backend: str, tests: list[str]) -> tuple[str, float]:
    """``"killed by TEST"`` or ``"SURVIVED"`` (or what went wrong), and the seconds it took."""
    selector = "postgres" if backend == "postgres" else "not postgres"
    env = {**os.environ, "PYTHONPATH": f"{pythonpath}{os.pathsep}{ROOT}", "WALSTATE_HYPOTHESIS_PROFILE": "mutation"}
    if backend == "postgres":
        env["WALSTATE_REQUIRE_POSTGRES"] = "1"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           "-k", selector, *tests], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    took = time.monotonic() - started
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.M)
    if done.returncode == 0:
        return "SURVIVED", took
    if failed:
        return "killed by " + failed[0].split("::", 1)[-1], took
    if done.returncode == 5:
        return "no test ran", took
    return f"pytest exit {done.returncode}: {done.stdout[-300:]}{done.stderr[-300:]}", took


def check_importable(pythonpath: Path) -> None:
    done = subprocess.run([sys.executable, "-c", "import walstate.storage.writepath as w; print(w.__file__)"],
                          env={**os.environ, "PYTHONPATH": str(pythonpath)}, capture_output=True, text=True)
    assert done.stdout.strip().startswith(str(pythonpath)), f"the mutated copy is not what imports: {done}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="only mutants whose name contains this")
    p.add_argument("--backend", choices=["sqlite", "postgres"], help="only this backend")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--tests", nargs="+", default=TESTS, metavar="FILE", help="test files to run (default: %(default)s)")
    args = p.parse_args(argv)
    mutants = [m for m in find_mutants() if args.only is None or args.only in m.name]
    if args.list:
        for m in mutants:
            print(f"{m.name}  ->  {m.weakened}  [{', '.join(m.backends())}]")
        return 0
    rows = []
    survived = 0
    for m in mutants:
        results = {}
        for backend in ("sqlite", "postgres"):
            if backend not in m.backends():
                results[backend] = "n/a"
                continue
            if (m.where, backend) in EQUIVALENT:
                results[backend] = EQUIVALENT[(m.where, backend)].split(":")[0]
                print(f"{m.name} [{backend}]: {EQUIVALENT[(m.where, backend)]}", flush=True)
                continue
            if args.backend and backend != args.backend:
                results[backend] = "(not run)"
                continue
            with tempfile.TemporaryDirectory(prefix="walstate-sql-mutant-") as tmp:
                package_copy(Path(tmp), m)
                check_importable(Path(tmp))
                result, took = run_tests(Path(tmp), backend, args.tests)
            survived += result == "SURVIVED" or not result.startswith("killed")
            results[backend] = f"{result} ({took:.0f}s)"
            print(f"{m.name} [{backend}]: {results[backend]}", flush=True)
        rows.append((m, results))
    print()
    print("| mutant (file:line statement condition) | weakened to | SQLite | PostgreSQL |")
    print("| --- | --- | --- | --- |")
    for m, results in rows:
        print(f"| {m.name} | `{m.weakened}` | {results['sqlite']} | {results['postgres']} |")
    print(f"\n{len(mutants)} mutants, {survived} run(s) not killed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
