"""Power loss: images checked per second, failures per disk model, what `normal` loses, and what bounding it costs.

Uses the harness of the test suite (tests/powerloss: an LD_PRELOAD shim compiled
with cc, a checker of disk images). Every cut point of each recorded run is
checked under every model (three random images per cut for the random models).
For ``normal`` the loss is measured as a time window (how old the oldest lost
commit was at the cut) and in commits, with the background syncer
(``sync_interval=0.1``) and without it (``None``), on the same paced workload.
The cost of the syncer is end-to-end sub-steps/s with it against without it,
same run.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from walstate import Engine

from .common import RESULTS, Figure, fresh_path, measure, rate, report
from .jobs_bench import STEPS, Empty, flow


def _runs() -> list[tuple[str, str, dict[str, object], tuple[str, ...], str]]:
    from tests.powerloss.checker import MODELS, NEGATIVE_MODELS

    paced = {"jobs": 25, "pace": 0.02}
    return [
        ("full, chain", "chain", {"durability": "full", "jobs": 4}, MODELS, "all"),
        ("full, 3 threads (group commit)", "threads", {"durability": "full", "jobs": 3}, MODELS, "all"),
        ("normal, no syncer", "chain", {"durability": "normal", "sync_interval": None, **paced}, MODELS, "prefix"),
        ("normal, sync_interval=0.1", "chain", {"durability": "normal", "sync_interval": 0.1, **paced}, MODELS, "prefix"),
        ("control: disk drops fsyncs (full)", "chain", {"durability": "full", "jobs": 4}, NEGATIVE_MODELS, "all"),
        ("control: synchronous=OFF", "raw-off", {"durability": "normal", "jobs": 400}, MODELS, "prefix"),
        ("control: ack before COMMIT (full)", "raw-early", {"durability": "full", "jobs": 30}, MODELS, "all"),
    ]


def power_cuts() -> tuple[list[Figure], list[dict[str, object]]]:
    from tests.powerloss.harness import build_shim, record, unavailable

    why = unavailable()
    if why is not None:
        print(f"\npower-loss harness skipped: {why}")
        return [], []
    base = Path(tempfile.mkdtemp(prefix="walstate-bench-powerloss-"))
    shim = build_shim(base)
    rows: list[dict[str, object]] = []
    for i, (label, workload, kw, models, expect) in enumerate(_runs()):
        run = record(shim, base / f"run{i}", workload, **kw)  # type: ignore[arg-type]
        t = time.perf_counter()
        result = run.checker.check(models, expect, per_cut=3)
        seconds = time.perf_counter() - t
        rows.append({"run": label, "events": len(run.checker.events), "commits": len(run.checker.commits) - 1,
                     "images": result.images, "images_per_s": result.images / seconds,
                     "opened_per_s": len(run.checker._cache) / seconds,
                     "failures": len(result.failures), "per_model": result.per_model,
                     "checked_per_model": result.checked_per_model,
                     "real_files_mismatch": run.checker.real_files_mismatch(run.directory),
                     "max_lost_commits": result.max_lost_commits, "max_lost_ms": result.max_lost_ms,
                     "lossy_images": result.lossy_images})
    print("\n### Power cuts: every cut point, every disk model\n")
    print("| run | events | commits | images | images/s | failing images | per model | most commits lost | "
          "oldest lost commit |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for r in rows:
        per = ", ".join(f"{m} {n}" for m, n in sorted(r["per_model"].items())) or "none"  # type: ignore[attr-defined]
        print(f"| {r['run']} | {r['events']} | {r['commits']} | {r['images']} | {r['images_per_s']:.0f} | "
              f"{r['failures']} | {per} | {r['max_lost_commits']} | {r['max_lost_ms']:.0f} ms |")
    by = {str(r["run"]): r for r in rows}
    off, on = by["normal, no syncer"], by["normal, sync_interval=0.1"]
    full = by["full, chain"]
    figures = [
        Figure("power-loss images checked", float(full["images_per_s"]), 0.0, "images/s"),  # type: ignore[arg-type]
        Figure("normal: oldest lost commit at a power cut, no syncer", float(off["max_lost_ms"]), 0.0, "ms"),  # type: ignore[arg-type]
        Figure("normal: oldest lost commit at a power cut, sync_interval=0.1", float(on["max_lost_ms"]), 0.0, "ms",  # type: ignore[arg-type]
               "no syncer", float(on["max_lost_ms"]) / max(float(off["max_lost_ms"]), 1e-9), "<= 0.5x"),  # type: ignore[arg-type]
        Figure("normal: most commits lost, no syncer", float(off["max_lost_commits"]), 0.0, "commits"),  # type: ignore[arg-type]
        Figure("normal: most commits lost, sync_interval=0.1", float(on["max_lost_commits"]), 0.0, "commits",  # type: ignore[arg-type]
               "no syncer", float(on["max_lost_commits"]) / max(float(off["max_lost_commits"]), 1.0)),  # type: ignore[arg-type]
    ]
    return figures, rows


def substeps(sync_interval: float | None) -> float:
    e = Engine(fresh_path("syncer"), durability="normal", workers=1, sync_interval=sync_interval)
    e.register(flow(False))
    job = e.submit("bench", Empty())
    result = rate(STEPS, lambda: e.run(job) and None)
    e.close()
    return result


def main() -> list[Figure]:
    figures, rows = power_cuts()
    off, off_s = measure(lambda: substeps(None), reps=5)
    on, on_s = measure(lambda: substeps(0.1), reps=5)
    figures.append(Figure("sub-steps/s, normal, no syncer", off, off_s, "sub-steps/s"))
    figures.append(Figure("sub-steps/s, normal, sync_interval=0.1", on, on_s, "sub-steps/s", "no syncer", on / off,
                          ">= 0.9x"))
    report("Power loss: what is checked, what normal loses, what the bound costs", figures, "power_loss.json")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "power_loss_runs.json").write_text(json.dumps(rows, indent=2, default=str))
    return figures


if __name__ == "__main__":
    main()
