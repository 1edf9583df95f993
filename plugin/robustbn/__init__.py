"""robustbn: James-Stein and test-time batch norm layers for OpenMMLab.

Importing the package registers its components with mmengine (``custom_imports=
dict(imports=['robustbn'])`` in a config) and lets torch >= 2.6 load mmengine checkpoints.
"""
import os

# albumentations >= 2 contacts the network on import unless told not to.
os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')

from . import compat  # noqa: F401  (mmengine checkpoints under weights_only=True)
from . import register  # noqa: F401
from .convert import BatchNormXd, convert_norm, revert_norm
from .estimators import ESTIMATORS, get_estimator
from .functional import ShrunkBatchNormFunction, shrunk_batch_norm
from .gprebn import GpreBN1d, GpreBN2d, GpreBN3d, SyncGpreBN
from .jsbn import JSBN1d, JSBN2d, JSBN3d, SyncJSBN

__version__ = '0.1.0'

__all__ = ['JSBN1d', 'JSBN2d', 'JSBN3d', 'SyncJSBN', 'GpreBN1d', 'GpreBN2d', 'GpreBN3d',
           'SyncGpreBN', 'BatchNormXd', 'convert_norm',
           'revert_norm', 'ESTIMATORS', 'get_estimator', 'ShrunkBatchNormFunction',
           'shrunk_batch_norm']
