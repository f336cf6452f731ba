"""The public harness: applications crash-test their own workflows from pytest."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from walstate import StepContext, Workflow
from walstate.testing import Attempt, Crash, InvariantViolation, Race, check_overlaps, crash_test, single_crashes

from .harness_flows import Memo

ROOT = Path(__file__).resolve().parent.parent


class Order(BaseModel):
    customer: str = "c1"
    charged: str | None = None
    emailed: bool = False


def test_the_harness_reports_an_outside_call_without_once_that_a_crash_repeats(tmp_path: Path) -> None:
    flow = Workflow("order", context=Order, phases=["pay", "notify"])
    charges: list[str] = []

    @flow.step(phase="pay")
    def charge(ctx: Order, step: StepContext) -> dict[str, Any]:
        charges.append(ctx.customer)  # an outside call with no key and no once(): a repeat charges twice
        return {"charged": "ch_1"}

    def mail(key: str) -> str:
        return "sent"

    @flow.step(phase="notify")
    def email(ctx: Order, step: StepContext) -> dict[str, Any]:
        step.once("send", lambda: mail(step.idempotency_key))
        return {"emailed": True}

    # A crash between charge's call and its commit re-runs it: the report says so, with the plan.
    report = crash_test(flow, Order(), tmp_path / "report", plans=[[Crash("handler_after_effect", 1)]])
    assert report.repeated_effects == {"charge": 2}
    assert report.repeat_plans["charge"] == (Crash("handler_after_effect", 1),)
    # Hypothesis finds it too (a fixed seed: a test must not depend on luck), and strict=True fails on it,
    # naming the step and the plan.
    found = crash_test(flow, Order(), tmp_path / "found", max_examples=100, races=(), seed=18)
    assert found.repeated_effects.get("charge", 0) >= 2
    with pytest.raises(InvariantViolation, match=r"(?s)'charge'.*plan: \["):
        crash_test(flow, Order(), tmp_path / "strict", max_examples=100, races=(), seed=18, strict=True)


def test_the_harness_fails_on_rows_doubled_by_a_non_transactional_insert(tmp_path: Path) -> None:
    flow = Workflow("menus", context=Order, phases=["import"])

    @flow.step(phase="import")
    def menu_import(ctx: Order, step: StepContext) -> None:
        step.execute("CREATE TABLE IF NOT EXISTS menu (customer TEXT, item TEXT)")
        step.execute("INSERT INTO menu VALUES (?, ?)", (ctx.customer, "margherita"))  # commits on its own

    with pytest.raises(InvariantViolation, match=r"(?s)table 'menu'.*1 row\(s\) more.*menu_import.*plan: \[Crash"):
        crash_test(flow, Order(), tmp_path, plans=[[Crash("handler_after_effect", 1)]])


def test_the_harness_catches_a_handler_relying_on_in_memory_state_between_steps(tmp_path: Path) -> None:
    # Killed after `compute` committed, the next process runs `use` without compute's memory.
    with pytest.raises(InvariantViolation, match="final context differs"):
        crash_test("tests.harness_flows:memory_flow", Memo(), tmp_path / "memory", processes=True,
                   plans=[[Crash("handler_before_effect", 2)]])
    # Kept in the context instead, it survives the same SIGKILL.
    report = crash_test("tests.harness_flows:stored_flow", Memo(), tmp_path / "stored", processes=True,
                        plans=[[Crash("handler_before_effect", 2)]])
    assert report.crashes == 1


def test_the_harness_catches_a_step_run_twice_by_a_race(tmp_path: Path) -> None:
    flow = Workflow("imports", context=Order, phases=["import"])

    @flow.step(phase="import")
    def menu_import(ctx: Order, step: StepContext) -> None:
        step.execute("CREATE TABLE IF NOT EXISTS menu (customer TEXT, item TEXT)")
        step.execute("INSERT INTO menu VALUES (?, ?)", (ctx.customer, "margherita"))
        # Honours a cancel, but only after its unprotected write: a retry runs it again.
        if step.cancelled.wait(0.2):
            raise RuntimeError("cancelled")

    # No crash: an operator's cancel (then retry) racing the handler doubles the rows.
    with pytest.raises(InvariantViolation, match=r"(?s)table 'menu'.*plan: \[Race\(action='cancel'"):
        crash_test(flow, Order(), tmp_path, plans=[[Race("cancel", "handler_before_effect", 1)]])


def test_ids_from_an_idempotent_outside_service_stored_in_the_context_are_not_flagged(tmp_path: Path) -> None:
    flow = Workflow("signup", context=Order, phases=["users"])
    service: dict[str, str] = {}  # an outside service that deduplicates by the key it is given

    def create_user(key: str) -> str:
        return service.setdefault(key, f"user-{len(service) + 1}")

    @flow.step(phase="users")
    def user(ctx: Order, step: StepContext) -> dict[str, Any]:
        return {"charged": create_user(step.idempotency_key)}

    assert crash_test(flow, Order(), tmp_path / "any", max_examples=40, seed=18).repeated_effects == {}
    # The crash that repeats the call: the service returns the reference run's id, the same key.
    report = crash_test(flow, Order(), tmp_path / "repeat", plans=[[Crash("handler_after_effect", 1)]])
    assert report.repeated_effects == {}
    assert report.steps["user"].most_completions >= 2 and report.steps["user"].protection == "idempotency_key"


def test_a_step_that_only_reads_and_logs_its_key_is_not_protected_and_strict_fails_on_it(tmp_path: Path) -> None:
    import logging

    flow = Workflow("mails", context=Order, phases=["notify"])
    emails: list[str] = []
    service: dict[str, str] = {}

    @flow.step(phase="notify")
    def notify(ctx: Order, step: StepContext) -> None:
        logging.getLogger("app").info("sending with key %s", step.idempotency_key)  # read and logged only
        print(f"key {step.idempotency_key}")
        emails.append(ctx.customer)  # a non-idempotent e-mail

    crash = [[Crash("handler_after_effect", 1)]]
    report = crash_test(flow, Order(), tmp_path / "logged", plans=crash)
    assert report.repeated_effects == {"notify": 2} and report.steps["notify"].protection == "none"
    with pytest.raises(InvariantViolation, match=r"(?s)\['notify'\] ran more than once.*never passed"):
        crash_test(flow, Order(), tmp_path / "strict", plans=crash, strict=True)
    # The key passed to the service (here in a dict argument, as a header): protected.
    keyed = Workflow("keyed", context=Order, phases=["notify"])

    def post(url: str, headers: dict[str, str]) -> str:
        return service.setdefault(headers["Idempotency-Key"], f"mail-{len(service)}")

    @keyed.step(phase="notify")
    def notify_keyed(ctx: Order, step: StepContext) -> None:
        post("https://mail.invalid/send", headers={"Idempotency-Key": step.idempotency_key})

    report = crash_test(keyed, Order(), tmp_path / "keyed", plans=crash, strict=True)
    assert report.repeated_effects == {} and report.steps["notify_keyed"].protection == "idempotency_key"


def test_strict_mode_flags_once_without_the_key_and_passes_once_given_the_key(tmp_path: Path) -> None:
    def mail(to: str, key: str | None = None) -> str:
        return f"mail to {to}"

    bare = Workflow("bare", context=Order, phases=["notify"])

    @bare.step(phase="notify")
    def email(ctx: Order, step: StepContext) -> None:
        step.once("send", lambda: mail(ctx.customer))  # a crash between the call and its record repeats it

    plans = [[Crash("before_once_record", 1)]]
    report = crash_test(bare, Order(), tmp_path / "bare", plans=plans)
    assert report.once_without_key == ["email"] and report.repeated_effects == {}
    with pytest.raises(InvariantViolation, match=r"(?s)\['email'\] call step.once\(\) without passing "
                                                 r"step.idempotency_key.*dies between the call and its record"):
        crash_test(bare, Order(), tmp_path / "strict", plans=plans, strict=True)
    keyed = Workflow("keyed", context=Order, phases=["notify"])

    @keyed.step(phase="notify")
    def email_keyed(ctx: Order, step: StepContext) -> None:
        step.once("send", lambda: mail(ctx.customer, key=step.idempotency_key))

    report = crash_test(keyed, Order(), tmp_path / "keyed", plans=plans, strict=True)
    assert report.once_without_key == [] and report.steps["email_keyed"].once_calls == 2


def test_a_counter_bumped_before_a_wait_is_reported_as_run_twice_by_the_crash_free_run(tmp_path: Path) -> None:
    flow = Workflow("counted", context=Order, phases=["wait"])

    @flow.step(phase="wait")
    def hook(ctx: Order, step: StepContext) -> dict[str, Any]:
        step.execute("CREATE TABLE IF NOT EXISTS visits (customer TEXT)")
        step.execute("INSERT INTO visits VALUES (?)", (ctx.customer,))  # before the wait: again on each resume
        return {"charged": step.wait_for("paid")["id"]}

    report = crash_test(flow, Order(), tmp_path, plans=[[]], messages={"paid": {"id": "ch_1"}})
    assert report.reruns == {"hook": 2} and report.steps["hook"].most_runs == 2
    # Not a repeat a crash caused (the reference run has it too), so not a repeated effect.
    assert report.repeated_effects == {}


def test_transactional_and_once_protected_steps_are_not_flagged(tmp_path: Path) -> None:
    flow = Workflow("menus", context=Order, phases=["one", "two"])
    sent: list[str] = []

    @flow.step(phase="one", transactional=True)
    def menu_import(ctx: Order, step: StepContext) -> None:
        step.execute("CREATE TABLE IF NOT EXISTS menu (customer TEXT, item TEXT)")
        step.execute("INSERT INTO menu VALUES (?, ?)", (ctx.customer, "margherita"))

    @flow.step(phase="two")
    def email(ctx: Order, step: StepContext) -> dict[str, Any]:
        step.once("send", lambda: sent.append(ctx.customer))
        return {"emailed": True}

    report = crash_test(flow, Order(), tmp_path / "search", max_examples=80, seed=18)
    assert report.crashes > 0 and report.races > 0
    assert report.repeated_effects == {}
    # Plans that surely repeat both handlers' completions: a crash after the
    # transactional handler returned (before its commit), and one after email returned.
    replay = crash_test(flow, Order(), tmp_path / "replay",
                        plans=[[Crash("handler_after_effect", 1)], [Crash("handler_after_effect", 2)]])
    assert replay.repeated_effects == {}
    assert replay.steps["menu_import"].most_completions >= 2
    assert replay.steps["menu_import"].protection == "transactional"
    assert replay.steps["email"].most_completions >= 2 and replay.steps["email"].protection == "once"


def test_two_attempts_of_a_step_that_overlap_in_time_are_a_violation() -> None:
    check_overlaps([Attempt("a", 1, 0.0, 1.0), Attempt("a", 2, 1.5, 2.0), Attempt("b", 1, 0.5, 3.0)])
    with pytest.raises(InvariantViolation, match="step 'a' overlapped"):
        check_overlaps([Attempt("a", 1, 0.0, 1.0, pid=1), Attempt("a", 2, 0.5, 2.0, pid=2)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_doubled_row_one_crash_causes_is_found_whatever_the_seed(tmp_path: Path, seed: int) -> None:
    """One crash at each reachable position comes first: finding what a single crash breaks is no draw.

    With 26 examples of Hypothesis's plans alone, 12 seeds of 40 missed the README's doubled
    row (these three among them).
    """
    flow = Workflow("menus", context=Order, phases=["import"])

    @flow.step(phase="import")
    def menu_import(ctx: Order, step: StepContext) -> None:
        step.execute("CREATE TABLE IF NOT EXISTS menu (customer TEXT, item TEXT)")
        step.execute("INSERT INTO menu VALUES (?, ?)", (ctx.customer, "margherita"))

    with pytest.raises(InvariantViolation, match=r"table 'menu'.*1 row\(s\) more"):
        crash_test(flow, Order(), tmp_path, max_examples=26, seed=seed)


def test_single_crashes_lists_each_reachable_position_once_in_fault_point_order() -> None:
    plans = single_crashes({"after_commit": 2, "before_begin": 1, "handler_after_effect": 0, "after_update": 12},
                           max_hit=8)
    assert plans == [[Crash("before_begin", 1)], *([[Crash("after_update", n)] for n in range(1, 9)]),
                     [Crash("after_commit", 1)], [Crash("after_commit", 2)]]


def test_the_pytest_plugin_prints_the_seed_and_the_minimal_plan_and_honours_walstate_examples(
        tmp_path: Path) -> None:
    (tmp_path / "test_app.py").write_text(textwrap.dedent("""
        from pydantic import BaseModel
        from walstate import StepContext, Workflow

        class Ctx(BaseModel):
            n: int = 0

        flow = Workflow("app", context=Ctx, phases=["one"])

        @flow.step(phase="one")
        def insert(ctx: Ctx, step: StepContext) -> None:
            step.execute("CREATE TABLE IF NOT EXISTS t (x INT)")
            step.execute("INSERT INTO t VALUES (1)")

        quiet = Workflow("quiet", context=Ctx, phases=["one"])

        @quiet.step(phase="one")
        def count(ctx: Ctx, step: StepContext) -> dict[str, int]:
            return {"n": 1}

        def test_counts_examples(walstate_crash):
            assert walstate_crash(quiet, Ctx()).examples == 7

        def test_doubles_rows(walstate_crash):
            walstate_crash(flow, Ctx())
    """))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--walstate-examples",
                           "7", "--walstate-seed", "1234", "test_app.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert "1 failed, 1 passed" in out, out
    assert "table 't' differs" in out and "--walstate-seed 1234" in out, out
    assert "plans=[[" in out, out


def test_a_cancel_cut_short_by_a_crash_then_retried_ends_as_a_crash_free_run(tmp_path: Path) -> None:
    # Found by the harness: an in-process cancel lived only in memory, so a crash lost it and the
    # recovering run went on with later phases. The request is now stored with the job.
    from benchmarks.harness_bench import Onboarding, registration

    crash_test(registration(), Onboarding(tenant="t1"), tmp_path, plans=[[
        Race("run", "before_begin", 1), Race("cancel", "before_begin", 1), Crash("before_begin", 4)]])


def test_the_harness_crash_tests_a_workflow_that_sleeps_and_waits_for_a_message_without_sleeping(
        tmp_path: Path) -> None:
    import time as _time

    flow = Workflow("waits", context=Order, phases=["one", "two"])

    @flow.step(phase="one")
    def nap(ctx: Order, step: StepContext) -> None:
        step.sleep(3600)  # an hour: reached by moving the run's clock, not by sleeping

    @flow.step(phase="two")
    def hook(ctx: Order, step: StepContext) -> dict[str, Any]:
        step.wait_for("confirmed")
        return {"emailed": True}

    started = _time.monotonic()
    report = crash_test(flow, Order(), tmp_path, max_examples=15, seed=3, races=(),
                        messages={"confirmed": {"ok": True}})
    assert report.crashes > 0
    assert _time.monotonic() - started < 60


@pytest.mark.parametrize("processes", [False, True], ids=["in-process", "processes"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correct_waiting_workflows_pass_and_a_planted_bug_after_a_wait_is_caught_in_both_modes(
        tmp_path: Path, processes: bool, seed: int) -> None:
    from .harness_flows import Paid

    examples = 5 if processes else 15
    # One step whose only line is a wait for a message, one that sleeps 30 s: both end succeeded.
    paid = crash_test("tests.harness_flows:paid_flow", Paid(), tmp_path / "paid", processes=processes, races=(),
                      max_examples=examples, seed=seed, messages={"paid": {"id": "ch_1"}})
    nap = crash_test("tests.harness_flows:nap_flow", Paid(), tmp_path / "nap", processes=processes, races=(),
                     max_examples=examples, seed=seed)
    assert paid.examples == nap.examples == examples and paid.crashes > 0 and nap.crashes > 0
    # The same wait followed by a row written outside the step's transaction: a crash after it doubles the row.
    with pytest.raises(InvariantViolation, match=r"(?s)table 'payments'.*1 row\(s\) more"):
        crash_test("tests.harness_flows:paid_insert_flow", Paid(), tmp_path / "bug", processes=processes, races=(),
                   max_examples=examples, seed=seed, messages={"paid": {"id": "ch_1"}},
                   points=("handler_after_effect",))
    # And in-memory state between steps is still caught with a SIGKILL.
    if processes:
        with pytest.raises(InvariantViolation, match="final context differs"):
            crash_test("tests.harness_flows:memory_flow", Memo(), tmp_path / "memory", processes=True, races=(),
                       max_examples=examples, seed=seed, points=("handler_before_effect",))


def test_a_worker_racing_the_run_never_runs_a_step_twice(tmp_path: Path) -> None:
    flow = Workflow("raced", context=Order, phases=["one", "two"])
    calls = Counter[str]()

    @flow.step(phase="one", transactional=True)
    def book(ctx: Order, step: StepContext) -> None:
        step.execute("CREATE TABLE IF NOT EXISTS booked (customer TEXT)")
        step.execute("INSERT INTO booked VALUES (?)", (ctx.customer,))

    @flow.step(phase="two")
    def email(ctx: Order, step: StepContext) -> dict[str, Any]:
        step.once("send", lambda: calls.update(["send"]) or True)
        return {"emailed": True}

    report = crash_test(flow, Order(), tmp_path, max_examples=25, seed=7, races=("worker",))
    assert report.races > 0 and report.repeated_effects == {}


def test_without_hypothesis_walstate_testing_says_which_extra_to_install() -> None:
    # An interpreter where Hypothesis cannot be imported, as after `pip install walstate` without [testing].
    code = textwrap.dedent("""
        import sys
        class NoHypothesis:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "hypothesis":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, NoHypothesis())
        import walstate.testing
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 1
    assert "ModuleNotFoundError" in done.stderr and "pip install 'walstate[testing]'" in done.stderr, done.stderr
