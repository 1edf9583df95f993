"""Digits-C: the digits test split under the ImageNet-C corruptions, cached on disk."""
from __future__ import annotations

import hashlib
import json
import os
import os.path as osp
import tempfile
from typing import List, Optional

import cv2
import numpy as np
from mmengine.dataset import BaseDataset

from .corruptions import CORRUPTIONS, ImageNetCorruption
from .digits import DigitsDataset

# Bump when the generated images change for the same arguments (invalidates caches).
VERSION = 1


class DigitsC(BaseDataset):
    """scikit-learn's digits (``DigitsDataset``) under one ``ImageNetCorruption`` at one
    severity: a distribution-shift benchmark that needs no download and runs on a CPU.

    Every image of the split is corrupted with ``ImageNetCorruption(corruption, severity,
    seed)``, whose noise is a function of the seed and the image's bytes, so the data set
    is the same bytes in any process for the same arguments. The corruption is applied at
    ``corrupt_size`` pixels (the digit resized bilinearly from 8x8, as ``DigitsDataset``
    does) and the result resized to ``img_size`` with area averaging when the two differ;
    by default both are ``img_size``, i.e. ImageNet-C's constants in pixels of the 32x32
    image (strong for the blurs: ImageNet-C's lengths are for 224x224 images). Pass
    ``corrupt_size=224`` for ImageNet-C's lengths relative to the image.

    The corrupted split is cached as ``cache_dir/<key>.npz`` (key: a hash of the
    arguments and the generator version), written atomically, so parallel processes may
    share a cache; ``cache_dir=None`` keeps it in memory only. Samples are
    ``dict(img=(img_size, img_size, 3) uint8 BGR, gt_label=int)`` like ``DigitsDataset``'s,
    so digits configs and checkpoints apply unchanged. Registered in mmengine's root
    ``DATASETS``; ``tools/tta_test.py`` sets ``corruption`` and ``severity``.

    Args:
        corruption: one of ``CORRUPTIONS`` (the ones ``ImageNetCorruption`` supports).
        severity: 1 (mild) to 5 (strong).
        seed: the corruption noise seed. Default: 0
        split: ``'test'`` (the usual shift benchmark) or ``'train'``.
        test_size, split_seed, img_size: ``DigitsDataset``'s ``test_size``, ``seed``
            and ``img_size``.
        corrupt_size: the size the corruption is applied at; None: ``img_size``.
        cache_dir: where the generated splits are kept; None: no cache.
    """

    METAINFO = DigitsDataset.METAINFO

    def __init__(self, corruption: str = 'gaussian_noise', severity: int = 5, seed: int = 0,
                 split: str = 'test', test_size: float = 0.25, split_seed: int = 0,
                 img_size: int = 32, corrupt_size: Optional[int] = None,
                 cache_dir: Optional[str] = 'data/digits_c', **kwargs) -> None:
        if corruption not in CORRUPTIONS:
            raise ValueError(f'unknown corruption {corruption!r}; DigitsC supports '
                             f'{", ".join(CORRUPTIONS)}')
        # ImageNetCorruption checks severity and seed; build it now to fail early.
        self.transform = ImageNetCorruption(corruption, severity, seed)
        if corrupt_size is not None and (not isinstance(corrupt_size, int) or corrupt_size < 8):
            raise ValueError(f'corrupt_size must be None or an integer >= 8, got {corrupt_size!r}')
        self.corruption, self.severity, self.seed = corruption, int(severity), seed
        self.clean_args = dict(split=split, test_size=test_size, seed=split_seed,
                               img_size=corrupt_size or img_size)
        self.img_size, self.cache_dir = img_size, cache_dir
        super().__init__(**kwargs)

    def cache_key(self) -> str:
        args = dict(version=VERSION, corruption=self.corruption, severity=self.severity,
                    seed=self.seed, img_size=self.img_size, clean=self.clean_args)
        digest = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
        return f'{self.corruption}_s{self.severity}_{digest}'

    def generate(self):
        """(images (N, H, W, 3) uint8, labels (N,) int64), computed (no cache)."""
        clean = DigitsDataset(**self.clean_args, lazy_init=False, serialize_data=False)
        images, labels = [], []
        for i in range(len(clean)):
            info = clean.get_data_info(i)
            img = self.transform.transform(dict(img=info['img']))['img']
            if img.shape[0] != self.img_size:
                img = cv2.resize(img, (self.img_size, self.img_size),
                                 interpolation=cv2.INTER_AREA)
            images.append(img)
            labels.append(info['gt_label'])
        return np.stack(images), np.asarray(labels, dtype=np.int64)

    def load_arrays(self):
        """(images, labels) from the cache, generated and cached when missing."""
        if self.cache_dir is None:
            return self.generate()
        path = osp.join(self.cache_dir, self.cache_key() + '.npz')
        if osp.isfile(path):
            with np.load(path) as f:
                return f['images'], f['labels']
        images, labels = self.generate()
        os.makedirs(self.cache_dir, exist_ok=True)
        # Atomic: a parallel reader sees the whole file or none.
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix='.npz.tmp')
        try:
            with os.fdopen(fd, 'wb') as f:
                np.savez(f, images=images, labels=labels)
            os.replace(tmp, path)
        except BaseException:
            if osp.exists(tmp):
                os.remove(tmp)
            raise
        return images, labels

    def load_data_list(self) -> List[dict]:
        images, labels = self.load_arrays()
        return [dict(img=np.ascontiguousarray(img), gt_label=int(label))
                for img, label in zip(images, labels)]
