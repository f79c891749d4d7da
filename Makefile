# `make demo` and `make test` each create .venv if it is missing, install what they need, and run.
# Every pip call passes -c constraints.txt: torch/torchvision are pinned there (and nowhere else).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-slow lint docs install benchmarks teacher teacher-dense clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VENV)/bin/python pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/onestep demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# style (ruff) and the import contracts of pyproject.toml; both also run inside `make test`
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) tests/lint_imports.py

# the docs site in site/ (tests/test_docs.py builds it with --strict in `make test`)
docs: $(STAMP)
	$(PY) benchmarks/report.py --check
	$(PY) -m mkdocs build --strict

benchmarks: $(STAMP)
	$(PY) benchmarks/objectives.py
	$(PY) benchmarks/step_cost.py
	$(PY) benchmarks/attention.py

# Re-train the shipped digits teacher (about 40 min on 2 CPU cores).
teacher: $(STAMP)
	$(VENV)/bin/onestep teacher-train --out onestep/assets/digits_teacher

# the shipped teacher fine-tuned with a dense time embedding (timestep = t), for MeanFlow and sCM (~5 min)
teacher-dense: $(STAMP)
	$(VENV)/bin/onestep teacher-train --config digits_teacher_dense --out onestep/assets/digits_teacher_dense

clean:
	rm -rf runs .pytest_cache
