"""Run every benchmark: ``python -m benchmarks`` (or ``make bench``)."""

from __future__ import annotations

from . import transitions_bench


def main() -> None:
    transitions_bench.main()


if __name__ == "__main__":
    main()
