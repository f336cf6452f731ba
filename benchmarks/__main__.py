"""Run every benchmark: ``python -m benchmarks`` (or ``make bench``)."""

from __future__ import annotations

from . import dedup_bench, jobs_bench, transitions_bench


def main() -> None:
    transitions_bench.main()
    jobs_bench.main()
    dedup_bench.main()


if __name__ == "__main__":
    main()
