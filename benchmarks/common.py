"""Shared benchmark plumbing: repetitions, medians with spread, a table, JSON."""

from __future__ import annotations

import json
import os
import platform
import resource
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


@dataclass
class Figure:
    name: str
    value: float        # median
    spread: float       # (max - min) / median over the repetitions
    unit: str
    baseline: str = ""
    ratio: float | None = None
    target: str = ""


def measure(fn: Callable[[], float], reps: int = 5) -> tuple[float, float]:
    """Run ``fn`` (which returns a rate or a duration) ``reps`` times: (median, relative spread)."""
    values = [fn() for _ in range(reps)]
    med = statistics.median(values)
    return med, (max(values) - min(values)) / med if med else 0.0


def fresh_path(tag: str) -> str:
    d = tempfile.mkdtemp(prefix=f"walstate-bench-{tag}-")
    return os.path.join(d, "bench.db")


def rate(n: int, fn: Callable[[], None], costs: list[tuple[float, float]] | None = None) -> float:
    """Units per second of ``fn`` doing ``n`` units; with ``costs``, also append what each unit cost the process.

    The cost is ``(CPU microseconds, context switches)`` per unit: the whole
    process's user + system time and voluntary + involuntary switches (every
    thread's, the library's own included) while ``fn`` ran.
    """
    before = resource.getrusage(resource.RUSAGE_SELF) if costs is not None else None
    t = time.perf_counter()
    fn()
    result = n / (time.perf_counter() - t)
    if before is not None and costs is not None:
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        switches = after.ru_nvcsw + after.ru_nivcsw - before.ru_nvcsw - before.ru_nivcsw
        costs.append((1e6 * cpu / n, switches / n))
    return result


def report(title: str, figures: list[Figure], json_name: str) -> None:
    print(f"\n### {title}\n")
    print("| figure | median | spread | baseline | ratio | target |")
    print("| --- | ---: | ---: | --- | ---: | --- |")
    for f in figures:
        ratio = "" if f.ratio is None else f"{f.ratio:.2f}x"
        print(f"| {f.name} | {f.value:,.1f} {f.unit} | ±{f.spread * 50:.0f}% | {f.baseline} | {ratio} | {f.target} |")
    RESULTS.mkdir(exist_ok=True)
    meta = {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version, "cpus": os.cpu_count(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (RESULTS / json_name).write_text(json.dumps({"title": title, "meta": meta,
                                                 "figures": [asdict(f) for f in figures]}, indent=2))
