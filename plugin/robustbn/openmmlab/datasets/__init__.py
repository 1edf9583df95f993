from .albu import SeededAlbu
from .cifar10 import CIFAR10
from .cifar10c import CIFAR10C, CIFAR10C_CORRUPTIONS
from .corruptions import CORRUPTIONS, NOT_EXPRESSIBLE, ImageNetCorruption
from .digits import DigitsDataset
from .digits_c import DigitsC
from .image_folder import ImageFolder
from .pack import PackClsInputs
from .volumes import VolumeDataset

__all__ = ['SeededAlbu', 'CIFAR10', 'CIFAR10C', 'CIFAR10C_CORRUPTIONS', 'CORRUPTIONS',
           'NOT_EXPRESSIBLE', 'ImageNetCorruption', 'DigitsDataset', 'DigitsC', 'ImageFolder',
           'PackClsInputs', 'VolumeDataset']
