"""``make chaos``: the big chaos run, on SQLite and on a throwaway PostgreSQL server it starts itself.

``python -m tests.chaos_run [--scale S] [--seed N] [--backend sqlite|postgres|both]``: at scale 1,
SQLite takes 700 SIGKILLs and 60 SIGSTOPs, PostgreSQL 320 SIGKILLs, 30 SIGSTOPs, 5 immediate
server restarts and 20 rounds of killed sessions (over 1,000 SIGKILLs together), each with clock
jumps, a pruner deleting every finished job every 2 s and the app's one-second schedule; prints each history report and exits 1 on a violation. The PostgreSQL nemeses that need
issue 26's fixes (item 8: a transient error inside once() fails the job) are reported, not hidden.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from tests import chaos_app, pgserver
from walstate.testing import ChaosJob, Nemeses, Workload, run_chaos


def workload(n: int) -> Workload:
    return Workload([ChaosJob(chaos_app.capped, {"n": i}) if i % 3 == 2 else
                     ChaosJob(chaos_app.order, {"n": i}, messages=(("go", {"m": i}),)) for i in range(n)])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos_run")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    args = parser.parse_args(argv)
    s = args.scale
    failed = False
    with tempfile.TemporaryDirectory(prefix="walstate-chaos-") as tmp:
        base = Path(tmp)
        if args.backend in ("sqlite", "both"):
            n = Nemeses(kills=int(700 * s), stops=int(60 * s), clock_jumps=int(20 * s), gap=(0.05, 0.4),
                        prune_every=2.0)
            failed |= not run("sqlite", str(base / "chaos.db"), None, base / "sqlite", n, int(900 * s), args.seed)
        if args.backend in ("postgres", "both"):
            server = pgserver.start()
            try:
                import psycopg

                with psycopg.connect(server.url, autocommit=True) as conn:
                    conn.execute("CREATE DATABASE chaos")
                url = urllib.parse.urlsplit(server.url)._replace(path="/chaos").geturl()
                n = Nemeses(kills=int(320 * s), stops=int(30 * s), clock_jumps=int(10 * s), restarts=max(1, int(5 * s)),
                            terminations=int(20 * s), gap=(0.05, 0.4), prune_every=2.0)
                failed |= not run("postgres", url, chaos_app.PgServer(server), base / "postgres", n, int(500 * s),
                                  args.seed)
            finally:
                server.stop()
    return 1 if failed else 0


def run(name: str, db: str, server: chaos_app.PgServer | None, directory: Path, nemeses: Nemeses, jobs: int,
        seed: int) -> bool:
    started = time.monotonic()
    # Long enough for every nemesis at the mean gap, plus the stops themselves and the restarts.
    duration = (nemeses.kills + nemeses.stops + nemeses.clock_jumps + nemeses.terminations) * 1.0 \
        + nemeses.stops * 3.0 + nemeses.restarts * 5.0
    report = run_chaos("tests.chaos_app:make_engine", db, workload(jobs), directory, workers=4, seed=seed,
                       nemeses=nemeses, duration=duration, settle=300.0, server=server)
    print(f"== {name}: {time.monotonic() - started:.0f}s")
    print(report, flush=True)
    return report.ok


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
