#!/usr/bin/env bash
# Create (or update) the virtual environment from requirements.lock.
#   - every package is installed at its locked version with --no-deps, so nothing
#     unlocked (e.g. opencv-python next to opencv-python-headless) is pulled in;
#   - mmcv has no wheel for this torch: it is built from source against the installed
#     torch (--no-build-isolation, setuptools < 82), with CUDA ops when FORCE_CUDA=1
#     (docker) and CPU ops otherwise. pip caches the built wheel for the next install.
#   - deepspeed is a source release whose setup.py imports torch: built the same way
#     against the installed torch, without pre-compiled ops (DS_BUILD_OPS=0).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
LOCK=requirements.lock

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --no-deps --disable-pip-version-check)

grep -vE '^(mmcv|deepspeed)==' "$LOCK" > "$VENV/lock-wheels.txt"
"${PIP[@]}" -r "$VENV/lock-wheels.txt"
DS_BUILD_OPS=0 "${PIP[@]}" --no-build-isolation "$(grep -E '^deepspeed==' "$LOCK")"

if ! "$VENV/bin/python" -c 'import mmcv._ext' 2>/dev/null; then
  mmcv_pin=$(grep -E '^mmcv==' "$LOCK")
  echo "building $mmcv_pin from source (several minutes on a small machine; cached afterwards)"
  MMCV_WITH_OPS=1 FORCE_CUDA=${FORCE_CUDA:-0} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "${PIP[@]}" --no-build-isolation "$mmcv_pin"
fi

"${PIP[@]}" --no-build-isolation -e .
"$VENV/bin/python" -c 'import mmcv._ext, mmseg.models, mmpretrain.models, robustbn, torch, deepspeed
print("env ok: torch", torch.__version__)'
