"""robustbn: James-Stein (JS-BN) and test-time (GpreBN) batch norm layers.

The layers, the estimators and ``convert_norm`` need torch alone and work in any PyTorch
model. When mmengine is installed, importing the package also registers every component
with mmengine (``custom_imports=dict(imports=['robustbn'])`` in a config): see
``robustbn.openmmlab``.
"""
from .base import ShrunkBatchNorm
from .convert import BatchNormXd, convert_norm, revert_norm
from .estimators import ESTIMATORS, EstimatorSpec, get_estimator, register_estimator
from .functional import ShrunkBatchNormFunction, shrunk_batch_norm
from .gprebn import GpreBatchNorm, GpreBN1d, GpreBN2d, GpreBN3d, SyncGpreBN
from .jsbn import JSBatchNorm, JSBN1d, JSBN2d, JSBN3d, SyncJSBN

__version__ = '0.1.0'

try:
    import mmengine  # noqa: F401
except ModuleNotFoundError as err:
    if err.name != 'mmengine':  # an installed but broken mmengine
        raise
else:
    from . import openmmlab  # noqa: F401  (registers the components with mmengine)

__all__ = ['JSBN1d', 'JSBN2d', 'JSBN3d', 'SyncJSBN', 'GpreBN1d', 'GpreBN2d', 'GpreBN3d',
           'SyncGpreBN', 'JSBatchNorm', 'GpreBatchNorm', 'ShrunkBatchNorm', 'BatchNormXd',
           'convert_norm', 'revert_norm', 'ESTIMATORS', 'EstimatorSpec', 'get_estimator',
           'register_estimator', 'ShrunkBatchNormFunction', 'shrunk_batch_norm']
