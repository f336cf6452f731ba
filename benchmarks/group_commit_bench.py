"""Group commit: 8 threads changing state at once, with one fsync per shared commit (``full``).

Compares the same library with group commit on and off, the raw sequential
floor (one commit per change), single-thread latency on vs off, and reports
the average batch size.
"""

from __future__ import annotations

import threading

from walstate.storage import Store
from walstate.substep import LiveJob, SubStep

from .common import Figure, fresh_path, measure, rate, report
from .transitions_bench import raw_floor

THREADS = 8
PER_THREAD = 300


def threaded(group: bool, durability: str = "full") -> tuple[float, float]:
    store = Store(fresh_path("group"), durability=durability, group_commit=group)  # type: ignore[arg-type]
    job_id, _ = store.write.create_job("b", None, "{}", [(f"s{i}", "p", i) for i in range(THREADS)])
    job = LiveJob(job_id, "b", "running", None, store.write)
    steps = [SubStep(job, r) for r in store.read.steps(job_id)]
    barrier = threading.Barrier(THREADS + 1)

    def work(step: SubStep) -> None:
        barrier.wait()
        for _ in range(PER_THREAD // 2):
            step.start()
            step.retry(error="e")

    threads = [threading.Thread(target=work, args=(s,)) for s in steps]
    for t in threads:
        t.start()

    def go() -> None:
        barrier.wait()
        for t in threads:
            t.join()

    result = rate(THREADS * PER_THREAD, go)
    batch = store.write.batched_requests / store.write.batches if store.write.batches else 1.0
    store.close()
    return result, batch


def single(group: bool) -> float:
    store = Store(fresh_path("single"), group_commit=group)
    job_id, _ = store.write.create_job("b", None, "{}", [("s", "p", 0)])
    step = SubStep(LiveJob(job_id, "b", "running", None, store.write), store.read.steps(job_id)[0])

    def work() -> None:
        for _ in range(1500):
            step.start()
            step.retry(error="e")

    result = rate(3000, work)
    store.close()
    return result


def main() -> list[Figure]:
    batches: list[float] = []

    def on() -> float:
        r, b = threaded(True)
        batches.append(b)
        return r

    grouped, gs = measure(on, reps=3)
    alone, als = measure(lambda: threaded(False)[0], reps=3)
    floor, fs = measure(lambda: raw_floor("full"), reps=3)
    lat_on, los = measure(lambda: single(True))
    lat_off, lfs = measure(lambda: single(False))
    figures = [
        Figure("raw floor, sequential, full", floor, fs, "changes/s"),
        Figure("8 threads, full, group commit off", alone, als, "changes/s", "raw floor, full", alone / floor),
        Figure("8 threads, full, group commit on", grouped, gs, "changes/s", "group commit off", grouped / alone,
               ">= 2.5x"),
        Figure("8 threads, full, group commit on (vs floor)", grouped, gs, "changes/s", "raw floor, full",
               grouped / floor),
        Figure("average batch (changes per commit)", sum(batches) / len(batches), 0.0, "changes"),
        Figure("1 thread, normal, group commit off", lat_off, lfs, "changes/s"),
        Figure("1 thread, normal, latency with group commit on", lat_off / lat_on, los, "x of off",
               "group commit off", lat_off / lat_on, "<= 1.1x"),
    ]
    report("Group commit (8 threads, durability=full)", figures, "group_commit.json")
    return figures


if __name__ == "__main__":
    main()
