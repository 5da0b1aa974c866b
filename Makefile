# Set-up and everyday targets. `make quickstart` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch installed when none >= 2.6 is importable yet (override, e.g. TORCH='torch>=2.6').
TORCH ?= torch==2.13.0

.PHONY: venv install install-test quickstart test lint format clean

# Reuse a system torch >= 2.6 (venv with system site-packages); otherwise a plain venv plus $(TORCH).
$(VENV)/.created:
	@if $(PYTHON) -c "import torch, sys; v=tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 6))" 2>/dev/null; then \
		echo "reusing the installed torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	@touch $@

venv: $(VENV)/.created

install: venv
	$(PY) -m pip install -q -e .

install-test: venv
	$(PY) -m pip install -q -e ".[test]"

quickstart: install
	$(VENV)/bin/lmforge quickstart

test: install-test
	$(PY) -m pytest -q

lint: install-test
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: install-test
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) runs data .pytest_cache
