# The README's contract: `make test` and `make demo` work from a fresh clone with only Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.spicewire-installed

.PHONY: test lint bench demo build wheel clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel "Cython>=3.0" "numpy>=1.24"

# Editable install without build isolation: rebuilding after a .pyx edit then takes seconds.
$(STAMP): $(PY) pyproject.toml setup.py spicewire/_codec.pyx $(wildcard spicewire/*.h)
	$(PY) -m pip install -q --no-build-isolation -e '.[test,lint]'
	touch $(STAMP)

build: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# Both checkers run even when the first one fails, so one run shows every finding.
lint: $(STAMP)
	status=0; \
	$(PY) -m ruff check spicewire tests benchmarks || status=1; \
	$(PY) -m mypy spicewire || status=1; \
	exit $$status

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-json=bench-report.json \
	    --benchmark-columns=min,median,mean,rounds --benchmark-sort=name
	$(PY) benchmarks/report.py bench-report.json
	$(PY) benchmarks/bench_migration.py --json bench-migration.json
	$(PY) benchmarks/bench_display_migration.py --json bench-display-migration.json
	$(PY) benchmarks/bench_spicegtk_display.py
	$(PY) benchmarks/bench_tls.py
	$(PY) benchmarks/bench_precopy.py

demo: $(STAMP)
	$(PY) -m spicewire.demo

wheel: $(PY)
	$(PY) -m pip wheel --no-deps -w dist .

clean:
	rm -rf build dist *.egg-info spicewire/*.c spicewire/*.so spicewire/*.html
