#!/usr/bin/env bash
# Regenerates requirements/lock-cpu.txt: every Python package that `make install` puts into .venv on a CPU
# machine (setup.py's install_requires with the test, mpi and wandb extras, requirements/lock-cpu.in's CPU torch, and
# everything they pull in), each at one exact version, for CPython 3.11 on x86_64 Linux.
#
#   tools/lock_requirements.sh                          keep every pin that still satisfies the inputs; add or
#                                                       drop only what a change of setup.py / lock-cpu.in asks
#   tools/lock_requirements.sh --upgrade-package NAME   NAME (and only what it needs) to its newest release
#   tools/lock_requirements.sh --upgrade                everything to its newest release
#
# Extra arguments go to `uv pip compile`, which keeps the pins of the existing lock as preferences, so a plain
# rerun reproduces the committed file. After a change: `make test` (the install stamp depends on the lock), and
# commit the lock with a green suite only. uv runs from its own venv .venv-lock, so it is not in the lock.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9
# Another output (make test-hf-matrix's per-venv locks) through LOCK=FILE; an existing FILE seeds the preferences.
LOCK=${LOCK:-requirements/lock-cpu.txt}
# setup.py's extras to lock (make test-lmms-eval locks "test" only: lmms-eval pins a wandb the wandb extra excludes).
EXTRAS=${EXTRAS:-test mpi wandb}
extras=()
for extra in $EXTRAS; do
    extras+=(--extra "$extra")
done

if ! .venv-lock/bin/uv --version 2>/dev/null | grep -qF "uv $UV_VERSION "; then
    python3 -m venv .venv-lock
    .venv-lock/bin/pip install --quiet "uv==$UV_VERSION"
fi

# The CPU torch wheel comes from pip's find-links (PyPI's torch is the CUDA build): give uv the same ones.
find_links=()
for location in ${PIP_FIND_LINKS:-} $(python3 -m pip config get global.find-links 2>/dev/null || true); do
    find_links+=(--find-links "$location")
done

.venv-lock/bin/uv pip compile --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    "${find_links[@]}" --custom-compile-command "tools/lock_requirements.sh" \
    setup.py "${extras[@]}" requirements/lock-cpu.in -o "$LOCK" "$@"

if ! grep -qE '^torch==[0-9.]+\+cpu$' "$LOCK"; then
    echo "error: torch resolved to $(grep '^torch==' "$LOCK" || echo nothing), not a +cpu build: no CPU wheel" \
         "among pip's find-links (${find_links[*]:-none}); $LOCK must not pull in CUDA" >&2
    exit 1
fi
echo "wrote $LOCK ($(grep -cE '^[a-z0-9]' "$LOCK") packages)"
