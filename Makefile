# Two commands on a fresh machine:
#   make demo   install into .venv (idempotent) and run the main job
#   make test   install and run the whole test suite (multi-process tests included)

VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU machines get the pinned CPU build first, so nothing pulls in CUDA wheels. On GPU machines
	# (e.g. the NGC container) the installed CUDA torch satisfies setup.py's range and is kept.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install --quiet torch==2.13.0; fi
	$(PY) -m pip install --quiet -e '.[test,mpi]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/cpu_demo.py

test: install
	$(VENV)/bin/pytest -q

# Single-process tests only, for a quick edit loop.
test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
