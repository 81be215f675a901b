# Two entry points: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dsunlearn-installed
# pytest-xdist workers; a file's tests stay on one worker (module fixtures, the Slurm cluster).
# A rank spends much of its life importing or waiting on a collective: more workers than cores.
# Files go out longest first (tests/conftest.py orders them from tests/durations.json; refresh it
# with `pytest -n 3 --dist loadfile --store-durations`), not xdist's default most-tests first.
# Three workers, not two: with two, the cores sat idle 8% of the suite (ranks rendezvousing,
# tests waiting on a signal or a Slurm poll); benchmarks/RESULTS.md has both timings.
TEST_WORKERS ?= 3

.PHONY: demo test lint venv clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dsunlearn demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# tests/test_slurm.py starts a one-node Slurm cluster: as root, install Slurm and munge if missing
# (if that fails, those tests skip and say why).
test: lint
	@if [ "$$(id -u)" = 0 ] && ! PATH="$$PATH:/usr/sbin:/sbin" sh -c 'command -v slurmctld' >/dev/null; then \
		echo "installing slurm-wlm and munge for tests/test_slurm.py"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && \
		  apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null 2>&1; } || \
		echo "could not install slurm-wlm and munge: tests/test_slurm.py will skip"; \
	fi
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

clean:
	rm -rf $(VENV) runs data
