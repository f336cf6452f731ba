# Every target builds its own virtual environment from pyproject.toml, so a
# fresh clone needs nothing but python3 (>= 3.10) and make.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-deep typecheck bench clean

$(VENV)/.installed-%: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[$*]'
	touch $@

demo: $(VENV)/.installed-test
	$(VENV)/bin/walstate demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

test-deep: $(VENV)/.installed-test
	WALSTATE_HYPOTHESIS_PROFILE=deep $(PY) -m pytest -q

# The peer (DBOS) and the chart (matplotlib) are optional: if they cannot be
# installed, the suite says so and measures the rest.
typecheck: $(VENV)/.installed-test
	$(PY) -m mypy

bench: $(VENV)/.installed-test
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]' || \
	  echo "bench extra (dbos, matplotlib) not installed: peer figures and the chart are skipped"
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
