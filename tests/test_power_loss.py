"""Power loss: every cut point of a real run, under several honest (and one dishonest) disk models.

An LD_PRELOAD shim (tests/powerloss/shim.c, compiled here) logs the real
write path of a walstate workload, with its acknowledgements, in one ordered
log; the checker (tests/powerloss/checker.py) rebuilds what a disk could hold
after a power cut at each event and opens it with sqlite3. The quick version
samples cut points; ``WALSTATE_HYPOTHESIS_PROFILE=deep`` checks every one, on
more workloads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from walstate.storage.errors import ConfigurationError
from walstate.storage import Store

from .conftest import PROFILE
from .powerloss.checker import MODELS, Result
from .powerloss.harness import Run, build_shim, record, recover_image, unavailable

DEEP = PROFILE == "deep"
STEP = 1 if DEEP else 4  # every cut point in the deep profile, every 4th in CI
PER_CUT = 3 if DEEP else 1

needs_shim = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shim(tmp_path_factory.mktemp("shim"))


def _recorded(shim: Path, tmp: Path, workload: str, **kw: object) -> Run:
    run = record(shim, tmp, workload, **kw)  # type: ignore[arg-type]
    assert not run.checker.reference_errors, run.checker.reference_errors
    # A system call the shim missed would make the replayed log differ from the real files.
    assert run.checker.real_files_mismatch(run.directory) == []
    assert run.checker.acks, "the workload acknowledged nothing"
    return run


def _cuts(run: Run) -> list[int]:
    return run.checker.cuts()[::STEP] + [len(run.checker.events)]


def _no_failures(result: Result) -> None:
    assert result.failures == [], f"{len(result.failures)} failing images, first: {result.failures[:3]}"


@pytest.fixture(scope="module")
def full_run(shim: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _recorded(shim, tmp_path_factory.mktemp("full"), "chain", durability="full", jobs=3)


@needs_shim
def test_full_loses_no_acknowledged_change_at_any_cut_under_any_disk_model(full_run: Run, tmp_path: Path) -> None:
    result = full_run.checker.check(MODELS, "all", _cuts(full_run), per_cut=PER_CUT, sample_every=50)
    _no_failures(result)
    assert set(result.checked_per_model) == set(MODELS)
    # recover() finishes the jobs of a sample of images, and every invariant holds after it.
    samples = result.samples if DEEP else result.samples[:: max(1, len(result.samples) // 3)]
    assert samples
    for i, (_, _, files) in enumerate(samples):
        recover_image(files, tmp_path / f"recover-{i}")


@needs_shim
def test_full_holds_on_the_group_commit_path_with_several_threads(shim: Path, tmp_path: Path) -> None:
    run = _recorded(shim, tmp_path, "threads", durability="full", jobs=4 if DEEP else 1)
    _no_failures(run.checker.check(MODELS, "all", _cuts(run), per_cut=PER_CUT))


@needs_shim
def test_normal_survives_a_process_crash_and_loses_only_the_newest_commits_to_a_power_cut(
        shim: Path, tmp_path: Path) -> None:
    run = _recorded(shim, tmp_path, "chain", durability="normal", sync_interval=None, jobs=2)
    result = run.checker.check(MODELS, "prefix", _cuts(run), per_cut=PER_CUT)
    _no_failures(result)  # never corrupt, never out of order; under `crash` nothing is lost
    # The models have teeth: without a sync, a power cut does lose commits.
    assert result.lossy_images > 0 and result.max_lost_commits > 1


@needs_shim
def test_a_disk_that_drops_fsyncs_is_caught(full_run: Run) -> None:
    result = full_run.checker.check(("nofsync",), "all", _cuts(full_run))
    assert result.per_model.get("nofsync", 0) > 0


@needs_shim
@pytest.mark.skipif(not DEEP, reason="deep profile only (WALSTATE_HYPOTHESIS_PROFILE=deep)")
def test_synchronous_off_is_caught(shim: Path, tmp_path: Path) -> None:
    run = _recorded(shim, tmp_path, "raw-off", durability="normal", jobs=400)
    result = run.checker.check(MODELS, "prefix", _cuts(run), per_cut=PER_CUT)
    assert any(f.reason.startswith("corrupt") for f in result.failures), result.per_model


@needs_shim
def test_an_acknowledgement_sent_before_commit_is_caught(shim: Path, tmp_path: Path) -> None:
    run = _recorded(shim, tmp_path, "raw-early", durability="full", jobs=10)
    result = run.checker.check(("crash",), "all")
    assert result.per_model.get("crash", 0) > 0
    assert all("acknowledged change" in f.reason for f in result.failures)


@needs_shim
def test_sync_interval_bounds_what_a_power_cut_takes_from_normal(shim: Path, tmp_path: Path) -> None:
    jobs, pace, interval = (20, 0.02, 0.05) if DEEP else (8, 0.04, 0.05)
    unbounded = _recorded(shim, tmp_path / "off", "chain", durability="normal", sync_interval=None,
                          jobs=jobs, pace=pace)
    bounded = _recorded(shim, tmp_path / "on", "chain", durability="normal", sync_interval=interval,
                        jobs=jobs, pace=pace)
    models = ("sync", "dirsync") if not DEEP else MODELS
    lost_off = unbounded.checker.check(models, "prefix", _cuts(unbounded))
    lost_on = bounded.checker.check(models, "prefix", _cuts(bounded))
    _no_failures(lost_off)
    _no_failures(lost_on)
    # Without the syncer, everything since the last checkpoint (here: the whole run) can go;
    # with it, only the commits of about the last interval. The margin absorbs a loaded machine.
    assert lost_off.max_lost_ms > jobs * pace * 1000 / 2
    assert lost_on.max_lost_ms < lost_off.max_lost_ms / 2
    assert lost_on.max_lost_commits < lost_off.max_lost_commits


@needs_shim
@pytest.mark.skipif(not DEEP, reason="deep profile only (WALSTATE_HYPOTHESIS_PROFILE=deep)")
@pytest.mark.parametrize("durability", ["full", "normal"])
def test_every_cut_of_the_threaded_workload_under_every_model(shim: Path, tmp_path: Path, durability: str) -> None:
    run = _recorded(shim, tmp_path, "threads", durability=durability, jobs=6, pace=0.01)
    result = run.checker.check(MODELS, "all" if durability == "full" else "prefix", per_cut=PER_CUT,
                               sample_every=200)
    _no_failures(result)
    for i, (_, _, files) in enumerate(result.samples):
        recover_image(files, tmp_path / f"recover-{i}")


# -- the syncer itself (no shim needed) ----------------------------------------


@pytest.fixture
def slow_syncer_store(db_path: str) -> Iterator[Store]:
    # An interval so long the thread never ticks during the test: the test drives sync_if_needed().
    s = Store(db_path, sync_interval=3600)
    yield s
    s.close()


def _one_commit(store: Store) -> None:
    store.write.create_job("wf", None, "{}", [("s", "p", 0)])


def test_the_syncer_fsyncs_the_wal_only_when_something_was_committed_since(slow_syncer_store: Store) -> None:
    syncer = slow_syncer_store.syncer
    assert syncer is not None
    syncer.sync_if_needed()
    assert syncer.sync_if_needed() is False  # nothing new
    _one_commit(slow_syncer_store)
    assert syncer.sync_if_needed() is True
    assert syncer.sync_if_needed() is False
    _one_commit(slow_syncer_store)
    assert syncer.sync_if_needed() is True


def test_the_syncer_thread_syncs_a_commit_within_its_interval(db_path: str) -> None:
    import time

    store = Store(db_path, sync_interval=0.01)
    try:
        assert store.syncer is not None
        before = store.syncer.syncs
        _one_commit(store)
        deadline = time.monotonic() + 10
        while store.syncer.syncs == before and time.monotonic() < deadline:
            time.sleep(0.005)
        assert store.syncer.syncs > before
    finally:
        store.close()
    assert store.syncer is not None and not store.syncer._thread.is_alive()


def test_full_durability_and_sync_interval_none_run_no_syncer(tmp_path: Path) -> None:
    from walstate import Engine

    for kw in ({"durability": "full"}, {"sync_interval": None}):
        with Engine(tmp_path / f"{len(kw)}-{'-'.join(map(str, kw.values()))}.db", **kw) as engine:  # type: ignore[arg-type]
            assert engine.store.syncer is None
    with Engine(tmp_path / "default.db") as engine:
        assert engine.store.syncer is not None and engine.store.syncer.interval == 0.1


def test_a_sync_interval_that_is_not_positive_is_a_configuration_error(db_path: str) -> None:
    with pytest.raises(ConfigurationError, match="sync_interval"):
        Store(db_path, sync_interval=0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_drops_the_inherited_syncer_and_runs_its_own(db_path: str, tmp_path: Path) -> None:
    store = Store(db_path, sync_interval=0.01)
    try:
        pid = os.fork()
        if pid == 0:  # child: close what it inherited without using it, then work on its own store
            code = 1
            try:
                store.close()
                child = Store(db_path, sync_interval=3600)
                _one_commit(child)
                assert child.syncer is not None and child.syncer.sync_if_needed() is True
                child.close()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        # The parent's syncer still runs after the fork.
        assert store.syncer is not None and store.syncer._thread.is_alive()
        _one_commit(store)
    finally:
        store.close()


# -- checkpoints off the commit path (issue 16) ------------------------------------------


def _autocheckpoint(store: Store) -> int:
    return int(store.db.writer().execute("PRAGMA wal_autocheckpoint").fetchone()[0])


def test_the_syncer_checkpoints_a_large_wal_so_no_commit_has_to(slow_syncer_store: Store) -> None:
    from walstate.storage.syncer import BACKSTOP_PAGES, CHECKPOINT_PAGES

    store, syncer = slow_syncer_store, slow_syncer_store.syncer
    assert syncer is not None
    # The writers checkpoint only past the backstop; below it that is the syncer's job.
    assert _autocheckpoint(store) == BACKSTOP_PAGES > CHECKPOINT_PAGES
    assert syncer.checkpoint_if_needed() is False  # a small WAL: nothing to do
    big = "x" * 3000
    while os.path.getsize(store.path + "-wal") < CHECKPOINT_PAGES * syncer._page_size:
        store.write.create_job("wf", None, json.dumps({"pad": big}), [("s", "p", 0)])
    assert syncer.checkpoint_if_needed() is True and syncer.checkpoints == 1
    assert syncer.checkpoint_if_needed() is False  # the file is still large, but nothing new was committed
    _one_commit(store)
    assert syncer.checkpoint_if_needed() is True and syncer.checkpoints == 2
    # Nothing left to copy: every frame of the WAL is in the database file.
    busy, frames, copied = store.db.writer().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert busy == 0 and frames == copied


def test_without_a_syncer_commits_checkpoint_as_sqlite_does_by_default(tmp_path: Path) -> None:
    for name, kw in (("full.db", {"durability": "full"}), ("nosync.db", {"sync_interval": None})):
        s = Store(tmp_path / name, **kw)  # type: ignore[arg-type]
        try:
            assert s.syncer is None and _autocheckpoint(s) == 1000
        finally:
            s.close()
