#!/usr/bin/env bash
# Create (or update) the torch-only virtual environment of the core tests: torch,
# torchvision, numpy, pytest and timm with their requirements at the versions of
# requirements.lock (used as pip constraints, so pip proves the set is complete and pulls
# nothing from OpenMMLab), then robustbn itself as a regular (non-editable) install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-core}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
# setuptools and wheel: to build robustbn without build isolation (pinned versions).
"${PIP[@]}" -c requirements.lock torch torchvision numpy pytest expecttest timm setuptools wheel
rm -rf build  # a stale build/lib would install removed modules too
"${PIP[@]}" --no-deps --no-build-isolation --force-reinstall .
# The core must import with torch alone: no OpenMMLab package may be present.
"$VENV/bin/python" - <<'PY'
import importlib.util
import robustbn
present = [m for m in ('mmengine', 'mmcv', 'mmseg', 'torchattacks', 'albumentations',
                       'deepspeed', 'mmpretrain') if importlib.util.find_spec(m)]
assert not present, f'torch-only environment has {present}'
print('core env ok: robustbn', robustbn.__version__, 'from', robustbn.__file__)
PY
