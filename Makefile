# Two commands do everything on a fresh machine (each creates .venv on first use):
#   make demo   the main job on built-in data: SpaM vs MAP, pruned by OPD and baselines
#   make test   the full test suite (CPU; Triton kernels through the interpreter)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install lint bench

install:
	VENV=$(VENV) bash scripts/install.sh

demo: install
	$(PY) -m spamkern --out results

test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(PY) -m pytest bench -q --benchmark-only
