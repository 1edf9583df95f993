"""The one place where robustbn registers its components with mmengine.

Everything goes to mmengine's *root* registries: mmcv's ``build_norm_layer`` and the
runners look types up from the current scope's registry, and child registries (mmseg,
mmpretrain, ...) search their parents, so a root entry is visible from every OpenMMLab
scope.

The norm layers need mmengine alone, so they are registered first: an mmengine (or
mmpretrain) user without mmcv/mmseg still gets ``norm_cfg=dict(type='SyncJSBN')``. The
other components need the ``openmmlab`` extra (mmcv, mmsegmentation, albumentations, ...);
when one of those packages is missing they are skipped with a warning that names it.
"""
import warnings

from mmengine.registry import DATASETS, HOOKS, LOOPS, METRICS, MODELS, OPTIM_WRAPPERS, TRANSFORMS

from ..convert import BatchNormXd
from ..gprebn import GpreBN1d, GpreBN2d, GpreBN3d, SyncGpreBN
from ..jsbn import JSBN1d, JSBN2d, JSBN3d, SyncJSBN

# Packages of the 'openmmlab' extra whose absence skips the components (anything else
# missing is a broken install and raises).
OPTIONAL_PACKAGES = ('mmcv', 'mmseg', 'albumentations', 'albucore', 'cv2', 'sklearn',
                     'torchattacks', 'torchvision')


def register_norm_layers() -> None:
    # 'JSBN' and 'GpreBN' are the 2d layers, as mmcv's 'BN' is BatchNorm2d.
    MODELS.register_module('JSBN', module=JSBN2d)
    MODELS.register_module('GpreBN', module=GpreBN2d)
    for cls in (JSBN1d, JSBN2d, JSBN3d, SyncJSBN, GpreBN1d, GpreBN2d, GpreBN3d, SyncGpreBN,
                BatchNormXd):
        MODELS.register_module(module=cls)


def register_components() -> None:
    from .adversarial import AdversarialEvalHook
    from .amp import CPUAmpOptimWrapper
    from .datasets import (
        CIFAR10,
        CIFAR10C,
        DigitsC,
        DigitsDataset,
        ImageFolder,
        ImageNetCorruption,
        PackClsInputs,
        SeededAlbu,
        VolumeDataset,
    )
    from .evaluation import Accuracy
    from .hooks import BufferConsistencyHook, ShrinkageMonitorHook
    from .models import (
        CifarResNet,
        CNN3d,
        ImageClassifier,
        TorchvisionResNet,
        VolumeDataPreprocessor,
    )
    from .tta import TestTimeAdaptLoop

    # classification
    for cls in (ImageClassifier, VolumeDataPreprocessor, CifarResNet, TorchvisionResNet,
                CNN3d):
        MODELS.register_module(module=cls)
    for cls in (CIFAR10, CIFAR10C, ImageFolder, VolumeDataset, DigitsDataset, DigitsC):
        DATASETS.register_module(module=cls)
    for cls in (PackClsInputs, SeededAlbu, ImageNetCorruption):
        TRANSFORMS.register_module(module=cls)
    METRICS.register_module(module=Accuracy)

    # training
    HOOKS.register_module(module=ShrinkageMonitorHook)
    HOOKS.register_module(module=BufferConsistencyHook)  # ranks' running statistics agree
    OPTIM_WRAPPERS.register_module(module=CPUAmpOptimWrapper)  # --amp without a GPU

    # adversarial evaluation (after validation and at test)
    HOOKS.register_module(module=AdversarialEvalHook)

    # test-time adaptation (as test_cfg or val_cfg)
    LOOPS.register_module(module=TestTimeAdaptLoop)


register_norm_layers()
try:
    register_components()
except ModuleNotFoundError as err:
    if (err.name or '').split('.')[0] not in OPTIONAL_PACKAGES:
        raise
    warnings.warn(f'robustbn: only the norm layers are registered with mmengine: {err.name} '
                  "is not installed (pip install 'robustbn[openmmlab]' for the datasets, "
                  'models, hooks and loops)', stacklevel=2)
