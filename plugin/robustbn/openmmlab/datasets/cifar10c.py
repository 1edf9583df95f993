"""CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019) from the official .npy files."""
from __future__ import annotations

import os.path as osp
from typing import List

import numpy as np
from mmengine.dataset import BaseDataset

from .cifar10 import CIFAR10

# File names of the official release: the 15 benchmark corruptions, then its 4 extra ones.
CIFAR10C_CORRUPTIONS = (
    'gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'glass_blur',
    'motion_blur', 'zoom_blur', 'snow', 'frost', 'fog', 'brightness', 'contrast',
    'elastic_transform', 'pixelate', 'jpeg_compression',
    'speckle_noise', 'gaussian_blur', 'spatter', 'saturate')


class CIFAR10C(BaseDataset):
    """One corruption at one severity of CIFAR-10-C: ``data_root/<corruption>.npy``, shape
    (5 N, 32, 32, 3) uint8 RGB, severities 1..5 one after the other (N = 10000 test
    images each), and ``data_root/labels.npy`` (5 N labels, or N).

    Samples are ``dict(img=(32, 32, 3) uint8 BGR array, gt_label=int)`` like ``CIFAR10``'s,
    so CIFAR-10 configs and checkpoints apply unchanged (``bgr_to_rgb=True``). The images
    are memory-mapped and read when a sample is fetched.

    Args:
        corruption: one of ``CIFAR10C_CORRUPTIONS`` (the file name without ``.npy``).
        severity: 1 (mild) to 5 (strong).
    """

    METAINFO = CIFAR10.METAINFO
    URL = 'https://zenodo.org/record/2535967'  # CIFAR-10-C.tar

    def __init__(self, data_root: str = '', corruption: str = 'gaussian_noise',
                 severity: int = 5, **kwargs) -> None:
        if corruption not in CIFAR10C_CORRUPTIONS:
            raise ValueError(f'unknown CIFAR-10-C corruption {corruption!r}; choose from '
                             f'{CIFAR10C_CORRUPTIONS}')
        if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) \
                or not 1 <= severity <= 5:
            raise ValueError(f'severity must be an integer in 1..5, got {severity!r}')
        self.corruption, self.severity = corruption, int(severity)
        self._images = None
        super().__init__(data_root=data_root, **kwargs)

    def _path(self, name: str) -> str:
        path = osp.join(self.data_root, f'{name}.npy')
        if not osp.isfile(path):
            raise FileNotFoundError(f'{path} not found: data_root must hold the extracted '
                                    f'CIFAR-10-C files (<corruption>.npy, labels.npy) from '
                                    f'{self.URL}')
        return path

    def _open(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self._path(self.corruption), mmap_mode='r')
        return self._images

    def load_data_list(self) -> List[dict]:
        images = self._open()
        labels = np.load(self._path('labels'), mmap_mode='r')
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8 \
                or len(images) % 5:
            raise ValueError(f'{self.corruption}.npy must be (5 N, H, W, 3) uint8, got '
                             f'{images.dtype} {images.shape}')
        n = len(images) // 5
        if len(labels) not in (n, 5 * n):
            raise ValueError(f'labels.npy has {len(labels)} labels for {5 * n} images')
        start = (self.severity - 1) * n
        labels = labels[start:start + n] if len(labels) == 5 * n else labels
        return [dict(img_index=start + i, gt_label=int(label))
                for i, label in enumerate(labels.tolist())]

    def prepare_data(self, idx: int):
        data_info = self.get_data_info(idx)
        # RGB in the files; BGR as mmcv (and robustbn's CIFAR10) hand images on.
        data_info['img'] = np.ascontiguousarray(self._open()[data_info['img_index']][..., ::-1])
        return self.pipeline(data_info)

    def __getstate__(self):
        # Pickled/deep-copied datasets reopen the file instead of copying the mapped array.
        state = self.__dict__.copy()
        state['_images'] = None
        return state
