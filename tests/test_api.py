"""The public API's contract at its edges: what submit() accepts, and what mypy --strict accepts.

The type checks run mypy (one run for every snippet, in a module fixture) on
the README's python blocks and on snippets that must be refused.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from walstate import ContextInvalid, Engine, JobId, JobStatus, StepContext, Workflow

ROOT = Path(__file__).resolve().parent.parent


class Order(BaseModel):
    customer: str
    items: int = 0


class Invoice(BaseModel):
    customer: str
    items: int = 0


class OrderPlus(Order):
    coupon: str = ""


def _flow() -> Workflow[Order]:
    flow = Workflow("orders", context=Order, phases=["only"])

    @flow.step(phase="only")
    def count(ctx: Order, step: StepContext) -> dict[str, int]:
        return {"items": ctx.items + 1}

    return flow


def _jobs(path: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM walstate_job").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.parametrize("context, message", [
    (Invoice(customer="c"), "the context is a Invoice, but this workflow's context model is Order"),
    (OrderPlus(customer="c", coupon="X"), "the context is a OrderPlus"),
    ({"customer": "c", "itmes": 3}, "unknown fields 'itmes' (did you mean 'items'?)"),
    ({"customer": "c", "colour": "red"}, "unknown fields 'colour'"),
    ({"items": 3}, "does not validate"),
    (["customer", "c"], "must be a Order or a dict"),
])
def test_submit_refuses_another_model_or_unknown_fields_and_creates_nothing(
        db_path: str, context: object, message: str) -> None:
    with Engine(db_path) as engine:
        flow = engine.register(_flow())
        with pytest.raises(ContextInvalid, match=re.escape(message)):
            engine.submit("orders", context)  # type: ignore[arg-type]
        with pytest.raises(ContextInvalid):
            engine.submit(flow, context)  # type: ignore[arg-type]
    assert _jobs(db_path) == 0


def test_submit_accepts_the_model_a_dict_of_its_fields_and_a_model_that_allows_extra_fields(db_path: str) -> None:
    class Open(BaseModel):
        model_config = ConfigDict(extra="allow")
        customer: str

    loose = Workflow("loose", context=Open, phases=["only"])
    loose.step(phase="only")(lambda ctx, step: None)
    with Engine(db_path) as engine:
        flow = _flow()
        a = engine.submit(flow, Order(customer="a"))
        b = engine.submit(flow, {"customer": "b", "items": 2})
        c = engine.submit(loose, {"customer": "c", "note": "kept"})
        assert engine.run(a).context == Order(customer="a", items=1)
        assert engine.run(b).context.items == 3
        assert engine.status(c).context.model_dump() == {"customer": "c", "note": "kept"}


def test_a_job_id_from_submit_is_an_int_and_a_typed_status_carries_the_model(db_path: str) -> None:
    with Engine(db_path) as engine:
        job = engine.submit(_flow(), Order(customer="a"))
        assert isinstance(job, int) and isinstance(job, JobId)
        assert engine.status(int(job)).id == job
        status: JobStatus[Order] = engine.run(JobId[Order](int(job)))
        assert isinstance(status.context, Order)


# -- mypy --strict -------------------------------------------------------------

README_BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)

REFUSED = textwrap.dedent("""\
    from pydantic import BaseModel
    from walstate import Engine, StepContext, Workflow

    class Order(BaseModel):
        customer: str

    class Invoice(BaseModel):
        customer: str

    flow = Workflow("orders", context=Order, phases=["only"])

    @flow.step(phase="only")
    def no_step_parameter(ctx: Order) -> None:  # line 13
        pass

    @flow.step(phase="only")
    def another_model(ctx: Invoice, step: StepContext) -> None:  # line 17
        pass

    with Engine("x.db") as engine:
        engine.submit(flow, Invoice(customer="c"))  # line 21
        job = engine.submit(flow, Order(customer="c"))
        reveal_type(engine.run(job).context)  # line 23
        reveal_type(engine.status(3).context)  # line 24

    def once_keeps_the_type(step: StepContext) -> None:
        reveal_type(step.once("n", lambda: 3))  # line 27
""")


@pytest.fixture(scope="module")
def mypy_output(tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("mypy")
    # The blocks are read in order, as a reader does: later ones use names of earlier ones.
    (tmp / "readme_blocks.py").write_text("\n".join(README_BLOCKS))
    (tmp / "refused.py").write_text(REFUSED)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--hide-error-context",
         "--no-error-summary", "--show-error-codes", "readme_blocks.py", "refused.py"],
        cwd=tmp, capture_output=True, text=True, timeout=300)
    return done.stdout + done.stderr


def test_the_readme_examples_pass_mypy_strict(mypy_output: str) -> None:
    assert README_BLOCKS
    errors = [line for line in mypy_output.splitlines() if line.startswith("readme_blocks.py")]
    assert errors == [], "\n".join(errors)


def _on_line(output: str, line: int) -> str:
    return "\n".join(x for x in output.splitlines() if x.startswith(f"refused.py:{line}:"))


def test_mypy_refuses_a_handler_of_the_wrong_signature(mypy_output: str) -> None:
    assert "[arg-type]" in _on_line(mypy_output, 12) + _on_line(mypy_output, 13), mypy_output
    assert "[arg-type]" in _on_line(mypy_output, 16) + _on_line(mypy_output, 17), mypy_output


def test_mypy_refuses_a_submit_with_another_model(mypy_output: str) -> None:
    assert ": error:" in _on_line(mypy_output, 21), mypy_output


def test_mypy_knows_the_context_type_of_a_submitted_job_and_the_result_type_of_once(mypy_output: str) -> None:
    assert 'Revealed type is "refused.Order"' in _on_line(mypy_output, 23), mypy_output
    assert 'Revealed type is "Any"' in _on_line(mypy_output, 24), mypy_output
    assert re.search(r'Revealed type is "(builtins\.)?int"', _on_line(mypy_output, 27)), mypy_output


def test_walstate_version_dir_and_help_show_the_public_api_and_the_plugin_imports_nothing_heavy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, pydoc\n"
        "import walstate.pytest_plugin\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('walstate.', 'pydantic', 'peewee', 'transitions')))\n"
        "assert loaded == ['walstate.pytest_plugin'], loaded\n"
        "import walstate\n"
        "names = dir(walstate)\n"
        "assert {'Engine', 'JobStatus', 'JobHandle', 'Workflow', 'WalstateError', '__version__'} <= set(names), names\n"
        "assert not {'Any', 'TYPE_CHECKING', 'importlib'} & set(names), names\n"
        "text = pydoc.render_doc(walstate, renderer=pydoc.plaintext)\n"
        "assert 'class Engine' in text and 'class JobHandle' in text and 'class JobStatus' in text\n"
        "assert 'TYPE_CHECKING' not in text and 'importlib' not in text\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    version = subprocess.run([sys.executable, "-m", "walstate", "--version"], capture_output=True, text=True,
                             timeout=120)
    import walstate

    assert version.returncode == 0 and version.stdout.strip() == f"walstate {walstate.__version__}", version
    assert walstate.__version__[0].isdigit()
