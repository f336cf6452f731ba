"""Workflow versions: old jobs run on the definition they were made for, wait for it, or are migrated onto a new one."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from walstate import (
    DefinitionError,
    Engine,
    MigrationRefused,
    Retry,
    StepContext,
    UnknownJob,
    VersionNotRegistered,
    Workflow,
)
from walstate.storage.versions import migrate_job

from walstate.testing import connect

pytestmark = pytest.mark.backends

ROOT = Path(__file__).resolve().parent.parent


class Ctx(BaseModel):
    n: int = 0


class CtxV2(BaseModel):
    n: int = 0
    label: str


def flow_of(steps: dict[str, list[str]], version: int = 1, calls: list[str] | None = None,
            context: type[BaseModel] = Ctx) -> Workflow[Any]:
    """A workflow whose steps (``{phase: [step, ...]}``) append ``"vN:step"`` to ``calls``."""
    flow: Workflow[Any] = Workflow("w", context=context, phases=list(steps), version=version)
    for phase, names in steps.items():
        for name in names:
            def handler(ctx: Any, step: StepContext, name: str = name) -> None:
                if calls is not None:
                    calls.append(f"v{version}:{name}")
            flow.step(phase=phase, name=name)(handler)
    return flow


def engine_for(path: str, *flows: Workflow[Any]) -> Engine:
    engine = Engine(path, workers=1)
    for flow in flows:
        engine.register(flow)
    return engine


def rows(path: str, job: int) -> tuple[Any, ...]:
    """Everything stored about a job, to prove that nothing of it changed."""
    conn = connect(path)
    try:
        return (conn.execute("SELECT * FROM walstate_job WHERE id=?", (job,)).fetchall(),
                conn.execute("SELECT * FROM walstate_step WHERE job_id=? ORDER BY id", (job,)).fetchall(),
                conn.execute("SELECT * FROM walstate_journal WHERE job_id=? ORDER BY id", (job,)).fetchall())
    finally:
        conn.close()


def finish_step(path: str, job: int, step: str) -> None:
    """As if step ``step`` of the job had succeeded before the deploy (test setup)."""
    conn = connect(path)
    with conn:
        conn.execute("UPDATE walstate_step SET state='succeeded', attempt=1 WHERE job_id=? AND name=?", (job, step))
    conn.close()


# -- adding a step and restarting no longer strands pending jobs --------------------


def test_adding_a_step_and_restarting_runs_old_jobs_on_the_old_version_registered_beside_the_new(db_path: str) -> None:
    calls: list[str] = []
    v1 = flow_of({"p": ["one", "two"]}, 1, calls)
    with engine_for(db_path, v1) as e:
        old = e.submit("w", Ctx())
    # The deploy: a step is added, the old definition kept as version 1.
    v1 = flow_of({"p": ["one", "two"]}, 1, calls)
    v2 = flow_of({"p": ["one", "three", "two"]}, 2, calls)
    with engine_for(db_path, v1, v2) as e:
        new = e.submit("w", Ctx())
        report = e.recover()
        assert sorted(report) == [old, new] and report.skipped == {}
        assert (e.status(old).state, e.status(old).version, sorted(e.status(old).steps)) == (
            "succeeded", 1, ["one", "two"])
        assert (e.status(new).state, e.status(new).version, sorted(e.status(new).steps)) == (
            "succeeded", 2, ["one", "three", "two"])
    assert calls == ["v1:one", "v1:two", "v2:one", "v2:three", "v2:two"]


def test_adding_a_step_and_restarting_migrates_old_jobs_when_the_new_version_declares_it(db_path: str) -> None:
    calls: list[str] = []
    with engine_for(db_path, flow_of({"p": ["one", "two"]}, 1, calls)) as e:
        old = e.submit("w", Ctx(n=4))
    v2 = flow_of({"p": ["one", "three", "two"]}, 2, calls, context=CtxV2)
    v2.migrate(1, lambda ctx: {**ctx, "label": f"was {ctx['n']}"})
    with engine_for(db_path, v2) as e:
        assert list(e.recover()) == [old]
        status = e.status(old)
        assert (status.state, status.version, status.context) == ("succeeded", 2, CtxV2(n=4, label="was 4"))
        assert [r.note for r in e.history(old) if r.note and "migrated" in r.note] == [
            "migrated from version 1 to 2; added three"]
    assert calls == ["v2:one", "v2:three", "v2:two"]


# -- two versions side by side --------------------------------------------------------


def test_two_versions_register_side_by_side_and_submit_uses_the_newest_unless_one_is_named(db_path: str) -> None:
    v1 = flow_of({"p": ["one"]}, 1)
    v2 = flow_of({"p": ["one", "two"]}, 2)
    with engine_for(db_path, v2, v1) as e:  # registration order does not decide which is newest
        e.register(v1)  # the same object again: a no-op
        by_name = e.submit("w", Ctx())
        named = e.submit("w", Ctx(), version=1)
        by_object = e.submit(v1, Ctx())
        assert [e.store.read.job(j).version for j in (by_name, named, by_object)] == [2, 1, 1]  # type: ignore[union-attr]
        assert e.store.read.job(named).fingerprint == v1.fingerprint != v2.fingerprint  # type: ignore[union-attr]
        assert [sorted(e.run(j).steps) for j in (by_name, named)] == [["one", "two"], ["one"]]
        with pytest.raises(UnknownJob, match=r"no version 3 registered.*\[1, 2\]"):
            e.submit("w", Ctx(), version=3)
        with pytest.raises(DefinitionError, match="version 1 is already registered with another definition"):
            e.register(flow_of({"p": ["one", "changed"]}, 1))


# -- a job of an unregistered version waits, reported, and runs where that version is --------


def test_a_job_of_an_unregistered_version_is_left_alone_and_reported_then_run_by_an_engine_that_has_it(
        db_path: str, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    with engine_for(db_path, flow_of({"p": ["one", "two"]}, 2, calls)) as e:
        job = e.submit("w", Ctx())
    before = rows(db_path, job)
    with engine_for(db_path, flow_of({"p": ["one"]}, 1, calls)) as e, caplog.at_level(logging.WARNING, "walstate"):
        report = e.recover()  # nothing raises
        assert list(report) == [] and "waiting for code version 2 of workflow 'w'" in report.skipped[job]
        assert e._runnable(e.store.read.job(job)) == report.skipped[job]  # type: ignore[arg-type]
        assert any(r.walstate_job == job and "waiting for code version 2" in r.getMessage()  # type: ignore[attr-defined]
                   for r in caplog.records if r.levelno == logging.WARNING)
        status = e.status(job)  # readable: the context as stored (its model is not here)
        assert (status.version, status.context) == (2, {"n": 0})
        with pytest.raises(VersionNotRegistered, match="waiting for code version 2"):
            e.run(job)
    assert rows(db_path, job) == before  # never claimed, never changed
    with engine_for(db_path, flow_of({"p": ["one", "two"]}, 2, calls)) as e:
        assert list(e.recover()) == [job] and e.status(job).state == "succeeded"
    assert calls == ["v2:one", "v2:two"]


def test_a_worker_of_version_2_never_claims_the_version_1_jobs_it_cannot_run_but_claims_those_it_can_migrate(
        db_path: str) -> None:
    with engine_for(db_path, flow_of({"p": ["one"]}, 1)) as e:
        old = [e.submit("w", Ctx(n=i)) for i in range(4)]
    before = {job: rows(db_path, job) for job in old}
    v2 = flow_of({"p": ["one", "two"]}, 2)
    with engine_for(db_path, v2) as e:
        new = e.submit("w", Ctx())
        worker = e.start_worker(1)
        # Claims go oldest first: a worker that claimed what it cannot run took every version-1 job
        # (and released it, "cannot run here") before it got to this one.
        assert e.handle(new).result(timeout=60).state == "succeeded"
        e.stop_worker()
        assert worker.claimed == 1 and worker.unrunnable == {}
        # Nor does its worker see them as work (it would try a claim at every poll).
        assert e.store.read.runnable_exists(["w"], e.clock(), (), [("w", 2)]) is False
        assert e.store.read.runnable_exists(["w"], e.clock()) is True  # any version: the old jobs are there
    assert {job: rows(db_path, job) for job in old} == before  # never claimed, never journalled
    # A version that declares a migration from version 1 claims them, migrates and runs them.
    v3 = flow_of({"p": ["one", "two"]}, 3)
    v3.migrate(1, lambda ctx: ctx)
    with engine_for(db_path, v3) as e:
        with e.start_worker(2):
            for job in old:
                assert e.handle(job).result(timeout=60).version == 3
        assert not any("cannot run here" in (r.note or "") for job in old for r in e.history(job))


# -- migrations of in-flight jobs -------------------------------------------------------


def test_a_migration_that_adds_and_removes_steps_moves_the_job_in_one_journalled_transaction(db_path: str) -> None:
    calls: list[str] = []
    v1 = flow_of({"p1": ["prep", "old"], "p2": ["keep", "gone"]}, 1, calls)
    with engine_for(db_path, v1) as e:
        job = e.submit("w", Ctx(n=1))
        other = e.submit("w", Ctx(n=2))
    for step in ("prep", "old"):
        finish_step(db_path, job, step)
    v2 = flow_of({"p1": ["prep"], "p2": ["keep", "new"]}, 2, calls, context=CtxV2)
    v2.migrate(1, lambda ctx: CtxV2(n=ctx["n"], label="moved"), drop=["gone"])
    with engine_for(db_path, v2) as e:
        epoch = e.store.read.job(job).epoch  # type: ignore[union-attr]
        report = e.migrate_jobs()
        # The other job never ran 'old', which version 2 removes without dropping it: refused, that job alone.
        assert list(report) == [job] and "removes 'old' (pending)" in report.skipped[other]
        assert report.notes[job] == "migrated from version 1 to 2; added new; dropped gone; retired old"
        moved = e.store.read.job(job)
        assert moved is not None
        assert (moved.state, moved.version, moved.fingerprint, moved.epoch) == ("pending", 2, v2.fingerprint, epoch + 1)
        assert json.loads(moved.context) == {"n": 1, "label": "moved"}
        steps = {s.name: (s.state, s.position) for s in e.store.read.steps(job)}
        # prep, keep, new ranked as version 2 declares them; old stays (finished) after them; gone is dropped.
        assert steps == {"prep": ("succeeded", 0), "keep": ("pending", 1), "new": ("pending", 2),
                         "old": ("succeeded", 3)}
        journal = [(r.step, r.from_state, r.to_state, r.note) for r in e.history(job)]
        assert journal == [(None, "pending", "pending", report.notes[job])]  # one row, for the whole move
        assert e.migrate_jobs() == []  # already on version 2: nothing to do
        assert e.run(job).state == "succeeded"
        assert e.status(job).steps["old"].state == "succeeded"
    assert calls[:2] == ["v2:keep", "v2:new"]  # prep and old did not run again


def test_a_migration_adding_a_step_to_a_phase_before_one_the_job_has_begun_is_refused_naming_the_step(
        db_path: str) -> None:
    calls: list[str] = []
    with engine_for(db_path, flow_of({"p1": ["a"], "p2": ["b"], "p3": ["c"]}, 1, calls)) as e:
        job = e.submit("w", Ctx())
    for step in ("a", "b"):  # phases p1 and p2 done before the deploy, p3 not begun
        finish_step(db_path, job, step)
    before = rows(db_path, job)
    v2 = flow_of({"p1": ["a", "late"], "p2": ["b"], "p3": ["c"]}, 2, calls)
    v2.migrate(1, lambda ctx: ctx)
    with engine_for(db_path, v2) as e:
        # 'late' could only run after phase p2, which has run: phases would no longer run in order.
        with pytest.raises(MigrationRefused, match=r"adds step 'late' to phase 'p1', but the job has begun the "
                                                   r"later phase 'p2' \(step 'b' is succeeded\).*Nothing changed"):
            e.run(job)
        report = e.migrate_jobs()
        assert list(report) == [] and "'late'" in report.skipped[job]
    assert rows(db_path, job) == before and calls == []
    # Added to the last phase the job has begun (or a later one), the step runs before the job goes on.
    v3 = flow_of({"p1": ["a"], "p2": ["b", "late"], "p3": ["c"]}, 3, calls)
    v3.migrate(1, lambda ctx: ctx)
    with engine_for(db_path, v3) as e:
        assert e.run(job).state == "succeeded"
    assert calls == ["v3:late", "v3:c"]


def test_a_migration_is_refused_when_a_removed_step_is_unfinished_and_nothing_changes(db_path: str) -> None:
    with engine_for(db_path, flow_of({"p": ["a", "b"]}, 1)) as e:
        job = e.submit("w", Ctx())
    before = rows(db_path, job)
    v2 = flow_of({"p": ["a"]}, 2)
    v2.migrate(1, lambda ctx: ctx)  # removes b without drop=
    with engine_for(db_path, v2) as e:
        with pytest.raises(MigrationRefused, match=r"removes 'b' \(pending\), which has not finished; nothing changed"):
            e.run(job)
        report = e.migrate_jobs()
        assert list(report) == [] and "MigrationRefused" in report.skipped[job]
        recovered = e.recover()
        assert list(recovered) == [] and "MigrationRefused" in recovered.skipped[job]
    assert rows(db_path, job) == before


def test_a_migration_whose_context_does_not_validate_is_refused_and_nothing_changes(db_path: str) -> None:
    with engine_for(db_path, flow_of({"p": ["a"]}, 1)) as e:
        job = e.submit("w", Ctx())
    before = rows(db_path, job)
    v2 = flow_of({"p": ["a"]}, 2, context=CtxV2)
    v2.migrate(1, lambda ctx: ctx)  # forgets the new required field
    with engine_for(db_path, v2) as e:
        with pytest.raises(MigrationRefused, match=f"(?s)job {job} .*label.*nothing changed"):
            e.run(job)
    assert rows(db_path, job) == before


def test_a_migration_is_fenced_by_the_claim_epoch_it_read(db_path: str) -> None:
    with engine_for(db_path, flow_of({"p": ["a"]}, 1)) as e:
        job = e.submit("w", Ctx())
        before = rows(db_path, job)
        stale = migrate_job(e.store.db, e.path, job, "w", epoch=7, from_version=1, to_version=2, fingerprint="x",
                            steps=[("a", "p", 0)], drop=(), context=lambda text: text)
        assert stale is None and rows(db_path, job) == before


def test_migrate_declarations_go_forward_and_drop_only_steps_the_new_version_removes() -> None:
    v2 = flow_of({"p": ["a"]}, 2)
    with pytest.raises(DefinitionError, match="goes forward"):
        v2.migrate(2, lambda ctx: ctx)
    v2.migrate(1, lambda ctx: ctx, drop=["a"])
    with pytest.raises(DefinitionError, match=r"drops \['a'\], which this version still declares"):
        v2.validate()


# -- a fingerprint that does not match is reported, never run ----------------------------


def test_a_job_whose_fingerprint_differs_from_its_registered_version_is_reported_and_never_run(db_path: str) -> None:
    with engine_for(db_path, flow_of({"p": ["a"]}, 1)) as e:
        job = e.submit("w", Ctx())
    before = rows(db_path, job)
    # Changed (a retry budget is part of the shape) but still called version 1.
    changed: Workflow[Any] = Workflow("w", context=Ctx, phases=["p"])
    changed.step(phase="p", name="a", retry=Retry(max_attempts=3))(lambda ctx, step: None)
    with engine_for(db_path, changed) as e:
        report = e.recover()
        assert list(report) == [] and "DefinitionError" in report.skipped[job]
        assert "fingerprint" in report.skipped[job] and "changed without a new version" in report.skipped[job]
        with pytest.raises(DefinitionError, match="fingerprint"):
            e.run(job)
    assert rows(db_path, job) == before


def test_the_fingerprint_ignores_handler_code_and_backoff_but_not_order_or_transactional() -> None:
    base = flow_of({"p": ["a", "b"]})
    same: Workflow[Any] = Workflow("w", context=Ctx, phases=["p"])
    same.step(phase="p", name="a", retry=Retry(backoff=5.0))(lambda ctx, step: "other code")
    same.step(phase="p", name="b")(lambda ctx, step: None)
    assert same.fingerprint == base.fingerprint
    assert flow_of({"p": ["b", "a"]}).fingerprint != base.fingerprint
    tx: Workflow[Any] = Workflow("w", context=Ctx, phases=["p"])
    tx.step(phase="p", name="a", transactional=True)(lambda ctx, step: None)
    tx.step(phase="p", name="b")(lambda ctx, step: None)
    assert tx.fingerprint != base.fingerprint


# -- the CLI shows the version, and with --app what waits for which code ---------------------


def test_walstate_jobs_and_show_say_which_jobs_wait_for_which_code_version(db_path: str, tmp_path: Path) -> None:
    with engine_for(db_path, flow_of({"p": ["one", "two"]}, 2)) as e:
        job = e.submit("w", Ctx())
    app = tmp_path / "v1app.py"
    app.write_text("from tests.test_versions import flow_of\nflow = flow_of({'p': ['one']}, 1)\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}

    def walstate(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "walstate", *args], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    plain = walstate("jobs", db_path).splitlines()
    assert plain[0].split()[4] == "VER" and plain[1].split()[4] == "2"
    assert "waiting for code version 2 of workflow 'w'" in walstate("jobs", db_path, "--app", "v1app:flow")
    shown = walstate("show", db_path, str(job), "--app", "v1app:flow")
    assert "version 2" in shown.splitlines()[0] and "waiting for code version 2" in shown
    assert json.loads(walstate("show", db_path, str(job), "--json"))["version"] == 2


def test_the_readme_versions_example_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Workflow versions"):]
    block = section[section.index("```python\n") + 10:section.index("```", section.index("```python\n") + 10)]
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
