# A newcomer's two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test quick unit bench bench-alembic bench-backup bench-agent bench-lock bench-lint bench-recovery bench-audit clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,embedded]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/dbagent demo

# Everything, the slow fault matrices included (a plain `pytest` skips those).
test: install
	$(PY) -m pytest -m ""

quick: install
	$(PY) -m pytest

unit: install
	$(PY) -m pytest tests/unit

bench: install
	$(PY) bench/bench_migrate.py

bench-backup: install
	$(PY) bench/bench_backup.py

bench-agent: install
	$(PY) bench/bench_agent.py

bench-lock: install
	$(PY) bench/bench_lock.py

bench-lint: install
	$(PY) bench/bench_lint.py

bench-recovery: install
	$(PY) bench/bench_recovery.py

clean:
	rm -rf $(VENV) .dbagent .pytest_cache

bench-alembic: install
	$(PY) bench/bench_alembic_project.py

bench-audit: install
	$(PY) bench/bench_audit.py
