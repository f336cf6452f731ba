"""Run every benchmark: ``python -m benchmarks`` (or ``make bench``).

Each benchmark prints its table and writes its JSON; this runner then prints
one summary table of every ratio with its target and draws them in
``benchmarks/results/summary.png`` (when matplotlib is installed).
"""

from __future__ import annotations

import json
import re

from . import (async_bench, dedup_bench, group_commit_bench, harness_bench, jobs_bench, peers_bench, postgres_bench,
               power_loss_bench, prune_bench, recovery_bench, runtime_bench, small_jobs_bench, transitions_bench,
               waits_bench)
from .common import RESULTS, Figure


def chart(figures: list[Figure]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [f for f in figures if f.ratio is not None]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    names = [f"{f.name}  (vs {f.baseline})" for f in rows]
    ax.barh(names, [f.ratio for f in rows], color=["#c64" if _meets(f) is False else "#3a7" for f in rows])
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("ratio against the baseline measured in the same run (log scale); green: target met")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    path = RESULTS / "summary.png"
    fig.savefig(path, dpi=110)
    return str(path)


def _meets(f: Figure) -> bool | None:
    """Whether a ratio target like '>= 2.5x' is met; None when the target is not a ratio bound."""
    match = re.fullmatch(r"(>=|<=) ([0-9.]+)x", f.target)
    if match is None or f.ratio is None:
        return None
    bound = float(match.group(2))
    return f.ratio >= bound if match.group(1) == ">=" else f.ratio <= bound


def main() -> None:
    figures: list[Figure] = []
    for bench in (transitions_bench, group_commit_bench, jobs_bench, recovery_bench, peers_bench, dedup_bench,
                  power_loss_bench, prune_bench, runtime_bench, small_jobs_bench, waits_bench, async_bench,
                  harness_bench, postgres_bench):
        figures += bench.main()
    print("\n### Summary: every ratio, with its target\n")
    print("| figure | baseline | ratio | target | met |")
    print("| --- | --- | ---: | --- | --- |")
    for f in figures:
        if f.ratio is not None:
            met = {True: "yes", False: "no", None: ""}[_meets(f)]
            print(f"| {f.name} | {f.baseline} | {f.ratio:.2f}x | {f.target} | {met} |")
    (RESULTS / "summary.json").write_text(json.dumps([f.__dict__ for f in figures], indent=2))
    png = chart(figures)
    print(f"\nJSON in {RESULTS}/" + (f", chart in {png}" if png else " (install matplotlib for the chart)"))


if __name__ == "__main__":
    main()
