"""The one place where robustbn registers its components with mmengine.

Everything goes to mmengine's *root* registries: mmcv's ``build_norm_layer`` and the
runners look types up from the current scope's registry, and child registries (mmseg,
...) search their parents, so a root entry is visible from every OpenMMLab scope.
"""
from mmengine.registry import MODELS

from .convert import BatchNormXd
from .jsbn import JSBN1d, JSBN2d, JSBN3d, SyncJSBN

# --- norm layers
MODELS.register_module('JSBN', module=JSBN2d)
for _cls in (JSBN1d, JSBN2d, JSBN3d, SyncJSBN, BatchNormXd):
    MODELS.register_module(module=_cls)

# --- classification: models, datasets, transforms, metrics

# --- hooks
from mmengine.registry import HOOKS  # noqa: E402

from .hooks import ShrinkageMonitorHook  # noqa: E402

HOOKS.register_module(module=ShrinkageMonitorHook)

# --- launch and tools
