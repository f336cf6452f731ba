"""The awaitable Engine API (issue 27.1): every database operation has an ``_async`` form that never blocks the loop."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
from pydantic import BaseModel

from walstate import Engine, JobFinished, StepContext, UnknownJob, Workflow


class Ctx(BaseModel):
    n: int = 0


def _flow() -> Workflow[Ctx]:
    flow = Workflow("async_api", context=Ctx, phases=["wait", "done"])

    @flow.step(phase="wait")
    def hook(ctx: Ctx, step: StepContext) -> dict[str, Any]:
        return {"n": step.wait_for("paid")["n"]}

    @flow.step(phase="done")
    def finish(ctx: Ctx, step: StepContext) -> None:
        return None

    return flow


#: Another process: takes the file's write lock (BEGIN IMMEDIATE), says so, and holds it until told to let go.
HOLDER = textwrap.dedent("""
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    sys.stdin.readline()
    conn.execute("COMMIT")
    print("released", flush=True)
""")


class Ticker:
    """A task that ticks every 10 ms and records the longest gap the loop let it go without running."""

    def __init__(self) -> None:
        self.max_gap = 0.0
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - last)
            self.ticks += 1
            last = now

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task


def test_awaiting_send_and_submit_while_another_process_holds_the_write_lock_never_stalls_the_loop(
        tmp_path: Any) -> None:
    path = str(tmp_path / "app.db")
    flow = _flow()
    hold = 2.0

    async def main() -> None:
        with Engine(path, busy_timeout=60) as engine:
            engine.register(flow)
            job = await engine.submit_async(flow, Ctx())
            for op in ("send", "submit"):
                with subprocess.Popen([sys.executable, "-c", HOLDER, path], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True) as holder:
                    try:
                        assert holder.stdout is not None and holder.stdin is not None
                        line = await asyncio.to_thread(holder.stdout.readline)
                        assert line.strip() == "locked"
                        ticker = Ticker()
                        ticker.start()
                        if op == "send":
                            call = asyncio.ensure_future(engine.send_async(job, "paid", {"n": 7}, key="k1"))
                        else:
                            call = asyncio.ensure_future(engine.submit_async(flow, Ctx(n=1), key="second"))
                        # The lock is held for `hold` seconds while the operation waits for it ...
                        await asyncio.sleep(hold)
                        assert not call.done(), f"{op} committed while another process held the write lock"
                        holder.stdin.write("go\n")
                        holder.stdin.flush()
                        result = await asyncio.wait_for(call, 60)
                        await ticker.stop()
                        assert holder.wait(60) == 0
                    finally:
                        if holder.poll() is None:
                            holder.kill()
                # ... and the loop went on ticking all along: its longest gap is a small part of the hold
                # (a blocking call would have stopped it for the whole of it).
                print(f"{op}: longest loop gap {ticker.max_gap:.3f} s over a {hold:g} s lock, {ticker.ticks} ticks")
                assert ticker.max_gap < hold / 4, (op, ticker.max_gap)
                assert result is True if op == "send" else result == job + 1

    asyncio.run(main())
    with Engine(path) as engine:
        engine.register(flow)
        assert engine.run(1).context.n == 7
        assert engine.status(2).context.n == 1


def test_every_awaitable_form_returns_what_its_blocking_form_does_and_raises_the_same_errors(tmp_path: Any) -> None:
    path = str(tmp_path / "app.db")
    flow = _flow()

    async def main() -> None:
        engine = Engine(path)
        engine.register(flow)
        job = await engine.submit_async(flow, Ctx())
        handle = await engine.handle_async(job)
        assert await handle.done_async() is False
        assert await engine.send_async(job, "paid", {"n": 3}, key="k") is True
        assert await engine.send_async(job, "paid", {"n": 3}, key="k") is False
        assert (await engine.recover_async()) == [job]
        assert (await handle.status_async()).state == "succeeded"
        assert await handle.done_async() is True
        status = await engine.status_async(job)
        assert status == engine.status(job) and status.context.n == 3
        assert await engine.history_async(job) == engine.history(job)
        page = await engine.jobs_async(state="succeeded")
        assert [j.id for j in page] == [j.id for j in engine.jobs(state="succeeded")] == [job]
        assert (await handle.result_async(timeout=5)).state == "succeeded"
        assert await engine.migrate_jobs_async() == []
        other = await engine.submit_async("async_api", {"n": 1})
        assert sorted(await engine.cancel_async(other)) == ["finish", "hook"]
        assert sorted(await engine.retry_async(other)) == ["finish", "hook"]
        assert await engine.prune_async(0, dry_run=True) == engine.prune(0, dry_run=True) == 1
        with pytest.raises(UnknownJob):
            await engine.status_async(999)
        with pytest.raises(JobFinished):
            await engine.send_async(job, "paid", {"n": 4})
        await engine.stop_worker_async()
        await engine.close_async()

    asyncio.run(main())
