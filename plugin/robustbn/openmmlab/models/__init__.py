from .cifar_resnet import CifarResNet
from .classifier import ImageClassifier, LinearClsHead
from .cnn3d import CNN3d
from .data_preprocessor import VolumeDataPreprocessor
from .tv_resnet import TorchvisionResNet

__all__ = ['CifarResNet', 'ImageClassifier', 'LinearClsHead', 'CNN3d',
           'VolumeDataPreprocessor', 'TorchvisionResNet']
