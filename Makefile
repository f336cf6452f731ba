# Every target builds its own virtual environment from pyproject.toml, so a
# fresh clone needs nothing but python3 (>= 3.10) and make.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-postgres test-deep chaos typecheck bench mutmut clean

# The package is installed editable in "strict" mode: a tree of links that
# maps statemachine/ -> walstate/ and storage/ -> walstate/storage/, which is
# what lets mypy see the package under its installed name. A new source file
# needs a new link, so the stamp depends on the list of source files too.
SOURCES := $(wildcard statemachine/*.py storage/*.py)

$(VENV)/.installed-%: pyproject.toml $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[$*]' --config-settings editable_mode=strict
	touch $@

demo: $(VENV)/.installed-test
	$(VENV)/bin/walstate demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

# Only the tests against a real PostgreSQL: the session starts a throwaway server
# (tests/pgserver.py) when Debian's postgresql is installed, or uses the one
# named by WALSTATE_TEST_POSTGRES; WALSTATE_REQUIRE_POSTGRES=1 fails instead of skipping.
test-postgres: $(VENV)/.installed-test
	$(PY) -m pytest -q -m 'postgres and not chaos'

test-deep: $(VENV)/.installed-test
	WALSTATE_HYPOTHESIS_PROFILE=deep $(PY) -m pytest -q

# The big chaos run (minutes; not part of `test`): worker processes of tests/chaos_app.py under
# >= 1,000 SIGKILLs plus SIGSTOPs, clock jumps, 5 PostgreSQL restarts and killed sessions, then the
# history checked (walstate.testing.run_chaos); first every chaos test and negative control on both
# backends (the tests marked `chaos`, which `make test` leaves out). CHAOS_ARGS passes options to the
# big run, e.g. '--scale 0.2 --seed 7'.
CHAOS_ARGS ?=
chaos: $(VENV)/.installed-test
	$(PY) -m pytest -q -m 'slow or chaos' tests/test_chaos.py
	$(PY) -m tests.chaos_run $(CHAOS_ARGS)

# The peer (DBOS) and the chart (matplotlib) are optional: if they cannot be
# installed, the suite says so and measures the rest.
typecheck: $(VENV)/.installed-test
	$(PY) -m mypy

bench: $(VENV)/.installed-test
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,bench]' --config-settings editable_mode=strict || \
	  echo "bench extra (dbos, matplotlib) not installed: peer figures and the chart are skipped"
	$(PY) -m benchmarks

# Mutation testing of the write path, ownership, engine, runner and operator, then the
# hand-made SQL mutants (tests/sql_mutants.py: every owner/epoch condition weakened in turn)
# (see [tool.mutmut] in pyproject.toml for why it runs in .mutmut/). The
# staging tree is rebuilt every time so new or removed source files follow;
# mutmut itself keeps its results in .mutmut/mutants/ and retests only what
# changed. MUTMUT_ARGS passes more options, e.g. MUTMUT_ARGS='walstate.ownership*'.
MUTMUT_ARGS ?=
mutmut: $(VENV)/.installed-test $(VENV)/.installed-mutation
	rm -rf .mutmut/walstate && mkdir -p .mutmut/walstate/storage
	for f in statemachine/*.py statemachine/py.typed; do ln -s $(CURDIR)/$$f .mutmut/walstate/; done
	for f in storage/*.py storage/py.typed; do ln -s $(CURDIR)/$$f .mutmut/walstate/storage/; done
	ln -sfn $(CURDIR)/tests .mutmut/tests
	ln -sf $(CURDIR)/pyproject.toml .mutmut/
	cd .mutmut && WALSTATE_HYPOTHESIS_PROFILE=mutation $(CURDIR)/$(VENV)/bin/mutmut run --max-children 2 $(MUTMUT_ARGS)
	cd .mutmut && $(CURDIR)/$(VENV)/bin/mutmut results > results.txt; \
	  echo "survivors and timeouts: .mutmut/results.txt; inspect one with: cd .mutmut && ../$(VENV)/bin/mutmut show NAME"
	# mutmut never mutates SQL: the owner/epoch conditions of the statements, weakened one at a time.
	$(PY) tests/sql_mutants.py | tee .mutmut/sql_mutants.txt

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info .mutmut
