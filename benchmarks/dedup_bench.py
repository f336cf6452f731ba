"""Deduper: memory stays bounded over 1,000,000 distinct keys; a hit costs little next to a set lookup.

Peak RSS is read in a fresh child process (``ru_maxrss``), so the figure is
the growth caused by the key stream alone.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time

from walstate.storage.dedup import Deduper

from .common import Figure, measure, report

KEYS = 1_000_000
HITS = 200_000


def rss_growth_mb() -> float:
    code = (
        "import resource\nfrom walstate.storage.dedup import Deduper\n"
        "d = Deduper(max_entries=1000)\nbase = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"for k in range({KEYS}):\n    d.run_once(k, lambda: None)\n"
        "assert len(d) == 1000\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def unbounded_set_growth_mb() -> float:
    code = (
        "import resource\nbase = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"s = set()\nfor k in range({KEYS}):\n    s.add(k)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def hit_ns() -> float:
    d = Deduper()
    d.run_once("k", lambda: None)
    t = time.perf_counter()
    for _ in range(HITS):
        d.run_once("k", _noop)
    return (time.perf_counter() - t) / HITS * 1e9


def set_ns() -> float:
    s = {"k"}
    t = time.perf_counter()
    for _ in range(HITS):
        if "k" not in s:
            s.add("k")
    return (time.perf_counter() - t) / HITS * 1e9


def _noop() -> None:
    pass


def main() -> list[Figure]:
    grow, gs = measure(rss_growth_mb, reps=3)
    unbounded, us = measure(unbounded_set_growth_mb, reps=3)
    hit, hs = measure(hit_ns)
    plain, ps = measure(set_ns)
    figures = [
        Figure("unbounded set, 1M distinct keys: peak RSS growth", unbounded, us, "MB"),
        Figure("Deduper(max_entries=1000), 1M distinct keys: peak RSS growth", grow, gs, "MB",
               "unbounded set", grow / unbounded if unbounded else None, "a few MB"),
        Figure("plain set lookup", plain, ps, "ns/call"),
        Figure("Deduper.run_once on a hit", hit, hs, "ns/call", "plain set lookup", hit / plain),
    ]
    report("Deduper: bounded memory and per-call cost", figures, "dedup.json")
    return figures


if __name__ == "__main__":
    main()
