"""What a change did: small-jobs figures of a git revision against the working tree, interleaved.

``python -m benchmarks.compare REV [FIGURE ...]`` builds the ``walstate``
package of revision ``REV`` (``git archive`` of ``statemachine/`` and
``storage/``, laid out as the installed package is) in a temporary folder,
then runs each figure in fresh child processes, alternating the revision and
the working tree ``REPS`` times (``WALSTATE_COMPARE_REPS``, default 3), so a
machine that speeds up or slows down during the run weighs on both alike.
``OLD..NEW`` compares two revisions (one commit's effect: ``C~1..C``). The
benchmark code is the working tree's; only the library differs.

Figures (sub-steps/s of ``WALSTATE_SMALL_JOBS`` jobs of 10 no-op steps, default
300): ``run`` (``run()`` per job, ``normal``), ``rt8`` (the runtime with 8
jobs in flight, ``normal``), ``rt8-1cpu`` (the same on one CPU), ``full8``
(8 in flight, ``full``), ``raw`` (the raw sqlite3 floor, a control: it should
not move). Prints each figure's median for both and their ratio.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("run", "rt8", "rt8-1cpu", "full8", "raw")
REPS = int(os.environ.get("WALSTATE_COMPARE_REPS", "3"))


def package(rev: str, into: Path) -> Path:
    """The ``walstate`` package of revision ``rev`` under ``into``; returns the folder to put on sys.path."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "statemachine", "storage"],
                             check=True, capture_output=True).stdout
    into.mkdir(parents=True)
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into / "src", filter="data")
    pkg = into / "walstate"
    (into / "src" / "statemachine").rename(pkg)
    (into / "src" / "storage").rename(pkg / "storage")
    return into


def child(figure: str) -> float:
    from . import small_jobs_bench as b

    b.JOBS = int(os.environ.get("WALSTATE_SMALL_JOBS", "300"))
    runs = {
        "run": lambda: b.run_per_job("normal", jobs=b.JOBS),
        "rt8": lambda: b.runtime("normal", concurrency=8),
        "rt8-1cpu": b.pinned(lambda: b.runtime("normal", concurrency=8)),
        "full8": lambda: b.runtime("full", concurrency=8),
        "raw": lambda: b.raw_floor("normal", jobs=b.JOBS),
    }
    return runs[figure]()


def measure(figure: str, path: Path | None) -> float:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = str(path)  # ahead of the installed walstate
    out = subprocess.run([sys.executable, "-m", "benchmarks.compare", "--child", figure], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        print(child(argv[1]))
        return
    if not argv:
        raise SystemExit(__doc__)
    rev, figures = argv[0], argv[1:] or list(FIGURES[:4])
    unknown = set(figures) - set(FIGURES)
    if unknown:
        raise SystemExit(f"unknown figures {sorted(unknown)}; known: {', '.join(FIGURES)}")
    old_rev, _, new_rev = rev.partition("..")
    with tempfile.TemporaryDirectory(prefix="walstate-compare-") as tmp:
        old = package(old_rev, Path(tmp) / "old")
        new = package(new_rev, Path(tmp) / "new") if new_rev else None
        print(f"| figure | {old_rev} | {new_rev or 'working tree'} | ratio |\n| --- | ---: | ---: | ---: |")
        for figure in figures:
            before: list[float] = []
            after: list[float] = []
            for _ in range(REPS):
                before.append(measure(figure, old))
                after.append(measure(figure, new))
            b, a = statistics.median(before), statistics.median(after)
            print(f"| {figure} | {b:,.0f} | {a:,.0f} | {a / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
