"""Bad input is refused where it comes in, with a typed error that says what to fix, and nothing stored.

Issue 27.12 (raw UnicodeEncodeError, OverflowError, ValueError, RecursionError and OSError escaping, NaN
silently stored as null, nonsense accepted), 26.10 (NaN, infinite and absurd durations failing with
internal errors, an internal error leaving the job claimed) and 27.11 (the CLI's own arguments).
Every error derives from WalstateError; the CLI prints one line and exits non-zero.
"""

from __future__ import annotations

import math
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from walstate import (ConfigurationError, ContextInvalid, DefinitionError, Engine, InvalidArgument, JobFailed,
                      NotADatabase, Retry, StepContext, StepResult, UnknownJob, Workflow, guarded_update)
from walstate.cli import main

from .helpers import query

ROOT = Path(__file__).resolve().parent.parent
WALSTATE = Path(sys.executable).parent / "walstate"
SURROGATE = "\ud800"
TABLES = ("walstate_job", "walstate_step", "walstate_journal", "walstate_once", "walstate_message")


class Ctx(BaseModel):
    n: int = 0
    extra: Any = None


def stored(db: str) -> dict[str, int]:
    """How many rows each of walstate's tables holds."""
    return {t: query(db, f"SELECT count(*) FROM {t}")[0][0] for t in TABLES}


def one_step(name: str = "w", **step: Any) -> Workflow[Ctx]:
    flow = Workflow(name, context=Ctx, phases=["p"])

    @flow.step(phase="p", **step)
    def only(ctx: Ctx, step: StepContext) -> None:
        return None

    return flow


@pytest.fixture
def engine(db_path: str) -> Iterator[Engine]:
    with Engine(db_path) as e:
        e.register(one_step())
        e.submit("w", Ctx())  # job 1, so that "nothing stored" is measured against a file with a job
        yield e


# -- text that is not valid Unicode (a lone surrogate) --------------------------------------------------

API_TEXT: dict[str, tuple[Callable[[Engine], object], str]] = {
    "a job key": (lambda e: e.submit("w", Ctx(), key=f"k{SURROGATE}"), "submit('w'): the job key 'k\\ud800'"),
    "a topic": (lambda e: e.send(1, f"t{SURROGATE}", {"ok": 1}), "send() to job 1: the topic 't\\ud800'"),
    "a message key": (lambda e: e.send(1, "t", {"ok": 1}, key=SURROGATE), "send(1, 't'): the message key"),
    "a workflow to list": (lambda e: e.jobs(workflow=SURROGATE), "the workflow to list"),
    "a step's history": (lambda e: e.history(1, step=SURROGATE), "history(1): the step"),
    "a step to retry": (lambda e: e.retry(1, step=SURROGATE), "job 1: the step to retry"),
}


@pytest.mark.backends
@pytest.mark.parametrize("case", list(API_TEXT))
def test_a_lone_surrogate_in_api_text_is_an_invalid_argument_and_stores_nothing(engine: Engine, case: str) -> None:
    call, names = API_TEXT[case]
    before = stored(engine.path)
    with pytest.raises(InvalidArgument, match="is not valid Unicode text \\(a lone surrogate") as raised:
        call(engine)
    assert names in str(raised.value)
    assert stored(engine.path) == before


@pytest.mark.parametrize("make", ["workflow", "step", "phase"])
def test_a_lone_surrogate_in_a_workflow_step_or_phase_name_is_a_definition_error(make: str) -> None:
    with pytest.raises(DefinitionError, match="not valid Unicode text"):
        if make == "workflow":
            Workflow(f"w{SURROGATE}", context=Ctx, phases=["p"])
        elif make == "phase":
            Workflow("w", context=Ctx, phases=[SURROGATE])
        else:
            Workflow("w", context=Ctx, phases=["p"]).step(phase="p", name=SURROGATE)(lambda ctx, step: None)


def test_an_empty_workflow_name_is_a_definition_error() -> None:
    with pytest.raises(DefinitionError, match="a workflow's name must not be empty"):
        Workflow("", context=Ctx, phases=["p"])


@pytest.mark.backends
@pytest.mark.parametrize("call", ["once", "wait_for"])
def test_a_lone_surrogate_in_a_once_name_or_a_waited_topic_fails_the_step_clearly_and_stores_no_record(
        db_path: str, call: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def bad(ctx: Ctx, step: StepContext) -> None:
        if call == "once":
            step.once(f"charge{SURROGATE}", lambda: 1)
        else:
            step.wait_for(SURROGATE)

    with Engine(db_path) as e:
        e.register(flow)
        job = e.submit(flow, Ctx())
        with pytest.raises(JobFailed) as failed:
            e.run(job)
        assert "InvalidArgument" in failed.value.errors["bad"] and "not valid Unicode text" in failed.value.errors["bad"]
        assert stored(db_path)["walstate_once"] == 0
        assert query(db_path, "SELECT owner FROM walstate_job WHERE id=?", (job,)) == [(None,)]


# -- numbers out of the database's range ------------------------------------------------------------------

HUGE = 2**63
API_IDS: dict[str, Callable[[Engine], object]] = {
    "status": lambda e: e.status(HUGE),
    "run": lambda e: e.run(HUGE),
    "send": lambda e: e.send(HUGE, "t", 1),
    "retry": lambda e: e.retry(HUGE),
    "cancel": lambda e: e.cancel(HUGE),
    "history": lambda e: e.history(HUGE),
    "handle": lambda e: e.handle(HUGE),
}


@pytest.mark.backends
@pytest.mark.parametrize("call", list(API_IDS))
def test_a_job_id_of_2_to_the_63_is_no_job_rather_than_an_overflow(engine: Engine, call: str) -> None:
    before = stored(engine.path)
    with pytest.raises(UnknownJob, match=r"no job 9223372036854775808 \(job ids are whole numbers from 1 to 2\*\*63-1\)"):
        API_IDS[call](engine)
    assert stored(engine.path) == before


@pytest.mark.backends
@pytest.mark.parametrize("arg", ["limit", "offset"])
def test_a_page_limit_or_offset_of_2_to_the_63_is_an_invalid_argument(engine: Engine, arg: str) -> None:
    with pytest.raises(InvalidArgument, match=f"{arg} must be <= "):
        engine.jobs(**{arg: HUGE})
    with pytest.raises(InvalidArgument, match=f"{arg} must be a whole number"):
        engine.jobs(**{arg: 2.5})


# -- engine settings ------------------------------------------------------------------------------------

ENGINE_SETTINGS = {
    "busy_timeout=nan": ({"busy_timeout": math.nan}, "busy_timeout must be a number of seconds, not NaN"),
    "lease=inf": ({"lease": math.inf}, "lease must be at most"),
    "lease=nan": ({"lease": math.nan}, "lease must be a number of seconds, not NaN"),
    "workers=2.5": ({"workers": 2.5}, "workers must be a whole number"),
    "sync_interval=-1": ({"sync_interval": -1}, r"sync_interval \(or None\) must be > 0 seconds"),
}


@pytest.mark.parametrize("case", list(ENGINE_SETTINGS))
def test_nonsense_engine_settings_are_configuration_errors_and_create_no_file(tmp_path: Path, case: str) -> None:
    kwargs, message = ENGINE_SETTINGS[case]
    path = tmp_path / "never.db"
    with pytest.raises(ConfigurationError, match=message):
        Engine(path, **kwargs)
    assert not path.exists()


@pytest.mark.backends
def test_start_worker_with_concurrency_zero_is_refused_not_taken_for_the_default(engine: Engine) -> None:
    with pytest.raises(ConfigurationError, match=r"start_worker\(concurrency=\) must be >= 1, not 0"):
        engine.start_worker(concurrency=0)
    assert engine._worker is None  # none was started


# -- durations and counts of definitions (26.10) ------------------------------------------------------

RETRIES = {
    "backoff=nan": ({"backoff": math.nan}, "Retry.backoff must be a number of seconds, not NaN"),
    "backoff=inf": ({"backoff": math.inf}, "Retry.backoff must be at most"),
    "backoff=inf,max_backoff=inf": ({"backoff": math.inf, "max_backoff": math.inf}, "Retry.backoff must be at most"),
    "max_backoff=inf": ({"max_backoff": math.inf}, "Retry.max_backoff must be at most"),
    "jitter=nan": ({"jitter": math.nan}, "Retry.jitter must be a finite number >= 0, not nan"),
    "max_attempts=2.5": ({"max_attempts": 2.5}, "Retry.max_attempts must be a whole number, not float 2.5"),
    "max_attempts=True": ({"max_attempts": True}, "Retry.max_attempts must be a whole number, not True"),
    "max_interruptions=-1": ({"max_interruptions": -1}, "Retry.max_interruptions must be >= 0"),
}


@pytest.mark.parametrize("case", list(RETRIES))
def test_a_retry_policy_with_nan_infinite_or_fractional_settings_is_a_definition_error(case: str) -> None:
    kwargs, message = RETRIES[case]
    with pytest.raises(DefinitionError, match=message):
        Retry(**kwargs)


@pytest.mark.parametrize("timeout", [1e308, math.inf, math.nan, 0, -1])
def test_a_step_timeout_that_is_nan_infinite_absurd_or_not_positive_is_a_definition_error(timeout: float) -> None:
    with pytest.raises(DefinitionError, match="a step's timeout"):
        one_step(timeout=timeout)


@pytest.mark.backends
@pytest.mark.parametrize("wait", ["sleep(10**400)", "sleep(1e308)", "sleep(nan)", "sleep_until(inf)",
                                  "wait_for(timeout=nan)", "wait_for(timeout=inf)"])
def test_an_absurd_sleep_or_wait_fails_its_step_with_a_typed_error_records_no_wait_and_releases_the_job(
        db_path: str, wait: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def napping(ctx: Ctx, step: StepContext) -> None:
        if wait == "sleep(10**400)":
            step.sleep(10**400)
        elif wait == "sleep(1e308)":
            step.sleep(1e308)
        elif wait == "sleep(nan)":
            step.sleep(math.nan)
        elif wait == "sleep_until(inf)":
            step.sleep_until(math.inf)
        else:
            step.wait_for("paid", timeout=math.nan if "nan" in wait else math.inf)

    with Engine(db_path) as e:
        e.register(flow)
        job = e.submit(flow, Ctx())
        with pytest.raises(JobFailed) as failed:
            e.run(job)
        error = failed.value.errors["napping"]
        assert error.startswith("InvalidArgument: step 'napping' of job 1: "), error
        assert stored(db_path)["walstate_once"] == 0  # no wake-up time or deadline recorded
        assert query(db_path, "SELECT state, owner FROM walstate_job WHERE id=?", (job,)) == [("failed", None)]


class Exploding(dict[str, Any]):
    """A handler's result that breaks walstate's own handling of it (iterating it raises)."""

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("this mapping cannot be iterated")


@pytest.mark.backends
@pytest.mark.parametrize("how", ["run", "worker"])
def test_an_unexpected_error_in_a_run_fails_the_job_and_leaves_no_claim_behind(db_path: str, how: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def odd(ctx: Ctx, step: StepContext) -> dict[str, Any]:
        return Exploding(n=1)

    with Engine(db_path) as e:
        e.register(flow)
        job = e.submit(flow, Ctx())
        if how == "run":
            with pytest.raises(RuntimeError, match="cannot be iterated"):
                e.run(job)
        else:
            with e.start_worker(1):
                with pytest.raises(JobFailed):
                    e.handle(job).result(timeout=60)
        assert query(db_path, "SELECT state, owner FROM walstate_job WHERE id=?", (job,)) == [("failed", None)]
        status = e.status(job)
        assert status.error == "the run stopped on an unexpected error: RuntimeError: this mapping cannot be iterated"
        assert status.steps["odd"].state == "cancelled"


# -- context values JSON cannot hold ------------------------------------------------------------------

@pytest.mark.backends
@pytest.mark.parametrize("value", [math.nan, math.inf, [1.0, -math.inf], {"deep": {"x": math.nan}}])
def test_nan_or_infinity_in_an_any_typed_context_field_is_refused_not_stored_as_null(
        engine: Engine, value: object) -> None:
    before = stored(engine.path)
    with pytest.raises(ContextInvalid, match="which JSON cannot hold"):
        engine.submit("w", {"extra": value})
    assert stored(engine.path) == before


@pytest.mark.backends
def test_a_step_that_puts_nan_into_an_any_typed_field_fails_and_leaves_the_context_as_it_was(db_path: str) -> None:
    flow = Workflow("w", context=Ctx, phases=["p"])

    @flow.step(phase="p")
    def nan(ctx: Ctx, step: StepContext) -> StepResult:
        return StepResult(context={"n": 5, "extra": [math.nan]})

    with Engine(db_path) as e:
        e.register(flow)
        job = e.submit(flow, Ctx(extra="kept"))
        with pytest.raises(JobFailed) as failed:
            e.run(job)
        assert "ContextInvalid" in failed.value.errors["nan"] and "JSON cannot hold" in failed.value.errors["nan"]
        assert e.status(job).context == Ctx(extra="kept")


# -- files and helpers ------------------------------------------------------------------------------------

def test_a_file_whose_schema_version_is_not_a_whole_number_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "odd.db"
    Engine(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE walstate_meta SET value='1.0' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    data = path.read_bytes()
    with pytest.raises(NotADatabase, match=r"schema_version is '1.0', not a whole number"):
        Engine(path)
    assert path.read_bytes() == data


def test_guarded_update_refuses_a_name_with_a_trailing_newline(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "app.db")
    conn.execute("CREATE TABLE tenant (id INTEGER PRIMARY KEY, phase TEXT)")
    conn.execute("INSERT INTO tenant VALUES (1, NULL)")
    for table, column in (("tenant\n", "phase"), ("tenant", "phase\n")):
        with pytest.raises(ConfigurationError, match="is not a plain SQL identifier"):
            guarded_update(conn, table, {column: "x"}, {"id": 1})
    assert conn.execute("SELECT phase FROM tenant").fetchall() == [(None,)]


# -- the CLI ------------------------------------------------------------------------------------------------

@pytest.fixture
def cli_db(tmp_path: Path) -> str:
    db = str(tmp_path / "cli.db")
    with Engine(db) as e:
        flow = Workflow("w", context=Ctx, phases=["p"])

        @flow.step(phase="p")
        def waits(ctx: Ctx, step: StepContext) -> None:
            step.wait_for("go")

        e.register(flow)
        e.run(e.submit(flow, Ctx()))  # job 1 parks, waiting for "go"
    return db


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    return err[-1]


CLI_USAGE = {
    "show 2**63": (["show", "{db}", str(HUGE)], "argument JOB: '9223372036854775808' is not a job id"),
    "retry 2**63": (["retry", "{db}", str(HUGE)], "argument JOB: '9223372036854775808' is not a job id"),
    "send 2**63": (["send", "{db}", str(HUGE), "go", "1"], "argument JOB: '9223372036854775808' is not a job id"),
    "jobs --limit 2**63": (["jobs", "{db}", "--limit", str(HUGE)], "argument --limit: '9223372036854775808' is not"),
    "jobs --offset 2**63": (["jobs", "{db}", "--offset", str(HUGE)], "argument --offset: '9223372036854775808'"),
    "prune a huge age": (["prune", "{db}", "--older-than", "99999999999999d", "--dry-run"],
                         "argument --older-than: '99999999999999d' is longer than a century"),
    "watch --timeout nan": (["watch", "{db}", "1", "--timeout", "nan"], "argument --timeout: 'nan' is not a number"),
    "watch --timeout -1": (["watch", "{db}", "1", "--timeout", "-1"], "argument --timeout: '-1' is not a number"),
    "watch --interval -1": (["watch", "{db}", "1", "--interval", "-1"], "argument --interval: '-1' is not a number"),
    "watch --interval nan": (["watch", "{db}", "1", "--interval", "nan"], "argument --interval: 'nan' is not a number"),
    "watch --interval 0": (["watch", "{db}", "1", "--interval", "0"], "seconds > 0"),
    "worker --grace inf": (["worker", "{db}", "--app", "m:e", "--grace", "inf"], "argument --grace: 'inf' is not"),
    "worker --concurrency 0": (["worker", "{db}", "--app", "m:e", "--concurrency", "0"],
                               "argument --concurrency: '0' is not a whole number from 1"),
    "prune --batch 0": (["prune", "{db}", "--older-than", "1d", "--batch", "0"], "argument --batch: '0' is not"),
}


@pytest.mark.parametrize("case", list(CLI_USAGE))
def test_cli_arguments_out_of_range_are_usage_errors_naming_the_argument(
        cli_db: str, capsys: pytest.CaptureFixture[str], case: str) -> None:
    args, message = CLI_USAGE[case]
    before = stored(cli_db)
    with pytest.raises(SystemExit) as exited:
        main([a.format(db=cli_db) for a in args])
    assert exited.value.code == 2
    assert message in one_line_error(capsys)
    assert stored(cli_db) == before


def test_cli_send_of_a_json_too_deep_to_parse_is_one_clear_error(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    before = stored(cli_db)
    assert main(["send", cli_db, "1", "go", "[" * 10_000 + "]" * 10_000]) == 1
    assert one_line_error(capsys) == ("walstate: error: the payload nests arrays or objects too deeply for Python's "
                                      "JSON parser (hundreds of levels); send a flatter message")
    assert stored(cli_db) == before


@pytest.mark.parametrize("command", ["jobs", "show", "history"])
def test_cli_given_a_directory_says_it_is_a_directory_not_disk_io_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    args = [command, str(tmp_path)] + (["1"] if command != "jobs" else [])
    assert main(args) == 1
    line = one_line_error(capsys)
    assert line == (f"walstate: error: {tmp_path} is a directory, not a walstate database file; give the path of the "
                    f"file (for example {tmp_path / 'app.db'})")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args", [
    [b"send", b"{db}", b"1", b"go\xff", b"1"],
    [b"send", b"{db}", b"1", b"go", b"1", b"--key", b"\xfe"],
    [b"jobs", b"{db}", b"--workflow", b"\xff"],
    [b"history", b"{db}", b"1", b"--step", b"\xff"],
])
def test_cli_arguments_that_are_not_utf8_are_one_line_usage_errors(cli_db: str, args: list[bytes]) -> None:
    before = stored(cli_db)
    argv = [a.replace(b"{db}", os.fsencode(cli_db)) for a in args]
    done = subprocess.run([os.fsencode(WALSTATE), *argv], capture_output=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2, done
    err = done.stderr.decode("utf-8", "backslashreplace").strip().splitlines()
    assert len(err) == 1 and "is not valid Unicode text" in err[0] and "Traceback" not in err[0], err
    assert stored(cli_db) == before



def test_a_six_field_cron_takes_the_seconds_last_as_the_readme_says() -> None:
    import datetime as dt

    from walstate.schedules import Schedule

    def slots(cron: str, count: int) -> list[str]:
        sched = Schedule("s", one_step(), cron, {})
        at = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc).timestamp() - 1  # the first check is at midnight
        found = []
        while len(found) < count:
            at += 1
            slot = sched.latest_slot(at)
            stamp = dt.datetime.fromtimestamp(slot, tz=dt.timezone.utc).strftime("%H:%M:%S")
            if stamp not in found:
                found.append(stamp)
        return found

    assert "a sixth field, **last**, is the second" in (ROOT / "README.md").read_text()
    assert slots("* * * * * */10", 3) == ["00:00:00", "00:00:10", "00:00:20"]  # every 10 seconds
    assert slots("*/2 * * * * *", 3) == ["00:00:00", "00:00:01", "00:00:02"]  # every second of even minutes


@pytest.mark.parametrize("timeout", [float("nan"), -1.0, "5", float("inf")])
def test_a_result_timeout_that_is_no_number_of_seconds_raises_invalid_argument_and_never_waits_forever(
        db_path: str, timeout: Any) -> None:
    # result(timeout=nan) waited forever: NaN compares false with every deadline.
    import asyncio

    with Engine(db_path) as e:
        handle = e.handle(e.submit(e.register(one_step()), {}))  # no worker runs: the job never ends
        with pytest.raises(InvalidArgument, match=r"result\(timeout=\)"):
            handle.result(timeout=timeout)
        with pytest.raises(InvalidArgument, match=r"result_async\(timeout=\)"):
            asyncio.run(handle.result_async(timeout=timeout))
        with pytest.raises(TimeoutError):
            handle.result(timeout=0)  # zero is a valid timeout: look once
        assert e.status(handle.id).state == "pending"  # nothing written by the refusals
