"""robustbn's OpenMMLab integration: configs, datasets, models, hooks, loops and tools'
helpers on top of the torch-only layers.

``import robustbn`` imports this subpackage when mmengine is installed, which registers
every component with mmengine's root registries (``custom_imports=dict(imports=
['robustbn'])`` in a config) and lets torch >= 2.6 load mmengine checkpoints.
"""
import os

# albumentations >= 2 contacts the network on import unless told not to.
os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')

from . import (
    compat,  # noqa: E402,F401  (mmengine checkpoints under weights_only=True)
    register,  # noqa: E402,F401
)
