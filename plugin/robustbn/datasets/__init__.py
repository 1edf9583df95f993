from .albu import SeededAlbu
from .cifar10 import CIFAR10
from .digits import DigitsDataset
from .image_folder import ImageFolder
from .pack import PackClsInputs
from .volumes import VolumeDataset

__all__ = ['SeededAlbu', 'CIFAR10', 'DigitsDataset', 'ImageFolder', 'PackClsInputs',
           'VolumeDataset']
