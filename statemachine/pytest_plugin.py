"""walstate's pytest plugin (entry point ``pytest11``): the ``walstate_crash`` fixture.

::

    def test_registration_resumes_exactly_once(walstate_crash):
        report = walstate_crash(flow, Onboarding(tenant="t1"))   # crash_test(...) in the test's tmp_path

Options: ``--walstate-examples N`` (examples per crash test; default: the
active Hypothesis profile's ``max_examples``) and ``--walstate-seed N``
(Hypothesis's seed; default: a random one). On a failure the test's report
shows the seed and the minimal plan, and how to replay either.

Nothing heavy is imported at collection: walstate.testing (and Hypothesis)
load when a test first uses the fixture.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("walstate", "walstate crash tests")
    group.addoption("--walstate-examples", type=int, default=None, metavar="N",
                    help="examples per walstate crash test (default: the active Hypothesis profile's max_examples)")
    group.addoption("--walstate-seed", type=int, default=None, metavar="N",
                    help="Hypothesis seed of walstate crash tests (default: random, printed on failure)")


@pytest.fixture
def walstate_crash(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Any]:
    """``crash_test`` bound to this test: its tmp_path, ``--walstate-examples`` and ``--walstate-seed``.

    Call it as ``walstate_crash(flow, context, **crash_test_options)``.
    """
    examples = request.config.getoption("--walstate-examples")
    chosen = request.config.getoption("--walstate-seed")
    calls = iter(range(1 << 30))

    def run(flow: Any, context: Any, **options: Any) -> Any:
        from .testing import InvariantViolation, crash_test

        seed = chosen if chosen is not None else random.randrange(1 << 32)
        if examples is not None:
            options.setdefault("max_examples", examples)
        options.setdefault("seed", seed)
        try:
            return crash_test(flow, context, tmp_path / f"crash-{next(calls)}", **options)
        except InvariantViolation as exc:
            raise InvariantViolation(
                f"{exc}\n\nwalstate crash test failed with seed {options['seed']}: replay it with "
                f"`pytest {request.node.nodeid} --walstate-seed {options['seed']}`, or the plan above with "
                "crash_test(..., plans=[...])") from None

    return run
