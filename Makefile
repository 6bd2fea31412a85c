# Two commands on a fresh machine:
#   make demo   install into .venv (idempotent) and run the main job
#   make test   install and run the whole test suite (multi-process tests included)
# And:
#   make test-hf-matrix   the Hugging Face facing tests against the oldest and the newest transformers
#   make test-lmms-eval   exports in the real lmms-eval (its newest release, in a venv of its own)
#   make lock             regenerate requirements/lock-cpu.txt (tools/lock_requirements.sh)

VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LOCK   := requirements/lock-cpu.txt

.PHONY: install demo test test-fast test-hf-matrix test-lmms-eval lock clean

# CPU machines install exactly the versions of $(LOCK) (pip constraints), torch's CPU build included, so nothing
# pulls in CUDA wheels. GPU machines (nvidia-smi; e.g. the NGC container) install without the lock: it pins the
# CPU torch, and its other pins (numpy, pillow, sympy, ...) would replace the container's own builds, which its
# CUDA torch, Transformer Engine and flash-attn were built against; setup.py's ranges keep what is there.
$(STAMP): setup.py $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install --quiet -e '.[test,mpi,wandb]'; \
	else \
		$(PY) -m pip install --quiet -c $(LOCK) -e '.[test,mpi,wandb]'; \
	fi
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/cpu_demo.py

test: install
	$(VENV)/bin/pytest -q

# Single-process tests only, for a quick edit loop.
test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"

lock:
	tools/lock_requirements.sh

# The tests that import transformers, in two more venvs: .venv-hf-oldest with the oldest release of
# TESTED_TRANSFORMERS (himix_megatron/hf/__init__.py, the lower bound setup.py names), .venv-hf-newest with the
# newest release setup.py allows. Each starts from the lock's pins and moves only transformers and what it
# requires (uv keeps the lock's versions as preferences), so a failure here is transformers'. torch is the lock's
# CPU wheel from pip's find-links. CPU machines only (the lock's torch is the CPU build).
HF_TESTS  := tests/test_hf_modeling.py tests/test_convert.py tests/test_convert_layout.py tests/test_vision.py tests/test_lmms_eval_interop.py \
             tests/eval/test_eval_generate.py tests/test_gamma_mod_export.py tests/test_llava_baselines.py \
             tests/test_clip_convert.py tests/data/test_image_clip.py
HF_TESTED := $(shell sed -n 's/^TESTED_TRANSFORMERS = "\(.*\)"$$/\1/p' himix_megatron/hf/__init__.py)
HF_OLDEST := $(shell sed -n 's/^TESTED_TRANSFORMERS = ">=\([0-9.]*\),<=[0-9.]*"$$/\1/p' himix_megatron/hf/__init__.py)
HF_NEWEST_TESTED := $(shell sed -n 's/^TESTED_TRANSFORMERS = ">=[0-9.]*,<=\([0-9.]*\)"$$/\1/p' himix_megatron/hf/__init__.py)

# The venvs are kept between runs; only creating one (torch's wheel, ~1 min) is slow. Every run re-resolves (uv,
# a second) and re-syncs (pip, a no-op when nothing moved), so "newest" is always the newest on the index.
test-hf-matrix: $(LOCK) requirements/lock-cpu.in
	@test -n "$(HF_OLDEST)" || { echo "TESTED_TRANSFORMERS in himix_megatron/hf/__init__.py is not '>=X,<=Y'"; exit 1; }
	@set -e; for leg in oldest newest; do \
		venv=.venv-hf-$$leg; \
		test -x $$venv/bin/python || $(PYTHON) -m venv $$venv; \
		if [ $$leg = oldest ]; then echo 'transformers==$(HF_OLDEST)'; else echo transformers; fi > $$venv/pin.txt; \
		cp $(LOCK) $$venv/lock.txt; \
		LOCK=$$venv/lock.txt tools/lock_requirements.sh --upgrade-package transformers -c $$venv/pin.txt; \
		$$venv/bin/python -m pip install --quiet -c $$venv/lock.txt -e '.[test]'; \
		version=$$($$venv/bin/python -c 'import transformers; print(transformers.__version__)'); \
		if [ $$leg = oldest ] && [ "$$version" != "$(HF_OLDEST)" ]; then \
			echo "test-hf-matrix: $$venv has transformers $$version, not $(HF_OLDEST)"; exit 1; fi; \
		echo "== test-hf-matrix: transformers $$version ($$venv; TESTED_TRANSFORMERS $(HF_TESTED))"; \
		$$venv/bin/python -m pytest -q -p no:cacheprovider $(HF_TESTS) || \
			{ echo "test-hf-matrix: FAILED with transformers $$version"; exit 1; }; \
		if [ $$leg = newest ] && [ "$$version" != "$(HF_NEWEST_TESTED)" ]; then \
			echo "note: transformers $$version passed, but TESTED_TRANSFORMERS ends at $(HF_NEWEST_TESTED):" \
			     "raise it in himix_megatron/hf/__init__.py and docs/gpu-and-containers.md's Install details"; fi; \
	done

# tests/test_lmms_eval_real.py in .venv-lmms-eval, with the newest lmms-eval release: a HiMix export in its
# `huggingface` model and a vanilla export in its `llava_hf` model, their prompts and answers against himix-eval's.
# A venv of its own because lmms-eval cannot install beside the lock: 0.7.1-0.7.3 pin wandb 0.25.0, which needs
# protobuf < 7, while the lock has protobuf 7.x (through tensorboard) and wandb >= 0.26 (the wandb extra); pip then
# silently takes lmms-eval 0.7, which cannot load remote code (so >=0.7.1 is asked for, and an unresolvable newest
# release fails here, loudly). Like test-hf-matrix the venv starts from the lock's pins (without the wandb extra)
# and moves only what lmms-eval needs (protobuf and wandb among them), plus: filelock < 4 (lmms-eval's evaluator
# imports filelock._api, which filelock 4 removed); decord (its llava_hf imports it at module level but does not
# require it); and no torchvision: PyPI's wheel is a CUDA build that fails to import beside the CPU torch
# ("operator torchvision::nms does not exist") and with it transformers' processors, which without it use their
# PIL image processors. CPU machines only, as test-hf-matrix.
LMMS_EVAL_VENV := .venv-lmms-eval
test-lmms-eval: $(LOCK) requirements/lock-cpu.in
	@set -e; venv=$(LMMS_EVAL_VENV); \
	test -x $$venv/bin/python || $(PYTHON) -m venv $$venv; \
	printf 'lmms-eval>=0.7.1\ndecord\n' > $$venv/eval.in; \
	echo 'filelock<4' > $$venv/pin.txt; \
	cp $(LOCK) $$venv/lock.txt; \
	EXTRAS=test LOCK=$$venv/lock.txt tools/lock_requirements.sh --upgrade-package lmms-eval -c $$venv/pin.txt \
		$$venv/eval.in; \
	$$venv/bin/python -m pip install --quiet -c $$venv/lock.txt -e '.[test]' -r $$venv/eval.in; \
	$$venv/bin/python -m pip uninstall --quiet --yes torchvision; \
	version=$$($$venv/bin/python -c 'from importlib.metadata import version; print(version("lmms-eval"))'); \
	echo "== test-lmms-eval: lmms-eval $$version ($$venv)"; \
	$$venv/bin/python -m pytest -q -p no:cacheprovider tests/test_lmms_eval_real.py || \
		{ echo "test-lmms-eval: FAILED with lmms-eval $$version"; exit 1; }

clean:
	rm -rf $(VENV) .venv-hf-oldest .venv-hf-newest .venv-lock $(LMMS_EVAL_VENV) build *.egg-info
