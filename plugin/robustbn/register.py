"""The one place where robustbn registers its components with mmengine.

Everything goes to mmengine's *root* registries: mmcv's ``build_norm_layer`` and the
runners look types up from the current scope's registry, and child registries (mmseg,
...) search their parents, so a root entry is visible from every OpenMMLab scope.
"""
from mmengine.registry import (DATASETS, HOOKS, LOOPS, METRICS, MODELS, OPTIM_WRAPPERS,
                               TRANSFORMS)

from .adversarial import AdversarialEvalHook
from .amp import CPUAmpOptimWrapper
from .convert import BatchNormXd
from .datasets import (CIFAR10, CIFAR10C, DigitsDataset, ImageFolder, ImageNetCorruption,
                       PackClsInputs, SeededAlbu, VolumeDataset)
from .evaluation import Accuracy
from .gprebn import GpreBN1d, GpreBN2d, GpreBN3d, SyncGpreBN
from .hooks import BufferConsistencyHook, ShrinkageMonitorHook
from .jsbn import JSBN1d, JSBN2d, JSBN3d, SyncJSBN
from .models import (CNN3d, CifarResNet, ImageClassifier, TorchvisionResNet,
                     VolumeDataPreprocessor)
from .tta import TestTimeAdaptLoop

# norm layers ('JSBN' and 'GpreBN' are the 2d layers, as mmcv's 'BN' is BatchNorm2d)
MODELS.register_module('JSBN', module=JSBN2d)
MODELS.register_module('GpreBN', module=GpreBN2d)
for _cls in (JSBN1d, JSBN2d, JSBN3d, SyncJSBN, GpreBN1d, GpreBN2d, GpreBN3d, SyncGpreBN,
             BatchNormXd):
    MODELS.register_module(module=_cls)

# classification
for _cls in (ImageClassifier, VolumeDataPreprocessor, CifarResNet, TorchvisionResNet, CNN3d):
    MODELS.register_module(module=_cls)
for _cls in (CIFAR10, CIFAR10C, ImageFolder, VolumeDataset, DigitsDataset):
    DATASETS.register_module(module=_cls)
for _cls in (PackClsInputs, SeededAlbu, ImageNetCorruption):
    TRANSFORMS.register_module(module=_cls)
METRICS.register_module(module=Accuracy)

# training
HOOKS.register_module(module=ShrinkageMonitorHook)
HOOKS.register_module(module=BufferConsistencyHook)  # ranks' running statistics agree
OPTIM_WRAPPERS.register_module(module=CPUAmpOptimWrapper)  # --amp without a GPU

# adversarial evaluation (after validation and at test)
HOOKS.register_module(module=AdversarialEvalHook)

# test-time adaptation (as test_cfg or val_cfg)
LOOPS.register_module(module=TestTimeAdaptLoop)
