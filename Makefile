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

# the multi-process tests run in a pytest process of their own: after the whole suite has
# been collected in one process, their spawned gloo ranks can abort at start-up
# Both runs always happen; the target fails if either fails (pytest's exit code is kept).
test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q --ignore=tests/distributed; a=$$?; \
	$(PY) -m pytest -q tests/distributed; b=$$?; \
	if [ $$a -ne 0 ]; then exit $$a; fi; exit $$b

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(PY) -m pytest bench -q --benchmark-only
