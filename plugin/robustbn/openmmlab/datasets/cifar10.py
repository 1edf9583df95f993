"""CIFAR-10 from the official python batches."""
from __future__ import annotations

import os.path as osp
import pickle
from typing import List

import numpy as np
import torch
from mmengine.dataset import BaseDataset

SPLITS = ('train', 'val', 'test')


class CIFAR10(BaseDataset):
    """CIFAR-10 from ``<data_root>/cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``).

    Samples are ``dict(img=(32, 32, 3) uint8 BGR array, gt_label=int)``: BGR as mmcv loads
    image files, so every image config converts with ``bgr_to_rgb=True``.

    Args:
        split: ``'train'`` (the 50000 training images, or all but a held-out ``val_size``),
            ``'val'`` (the held-out ``val_size`` training images) or ``'test'``.
        val_size: training images held out for validation, chosen as
            ``torch.utils.data.random_split`` with a generator seeded ``split_seed`` does.
        download: fetch and extract the official archive into ``data_root`` when the batches
            are missing (only then, and only if set).
    """

    METAINFO = dict(classes=('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog',
                             'horse', 'ship', 'truck'))
    URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
    MD5 = 'c58f30108f718f92721af3b95e74349a'
    FOLDER = 'cifar-10-batches-py'

    def __init__(self, data_root: str = '', split: str = 'train', val_size: int = 0,
                 split_seed: int = 0, download: bool = False, **kwargs) -> None:
        if split not in SPLITS:
            raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
        if split == 'val' and val_size <= 0:
            raise ValueError("split='val' needs val_size > 0")
        self.split, self.val_size, self.split_seed = split, val_size, split_seed
        self.download = download
        super().__init__(data_root=data_root, **kwargs)

    def load_data_list(self) -> List[dict]:
        folder = osp.join(self.data_root, self.FOLDER)
        if not osp.isdir(folder):
            if not self.download:
                raise FileNotFoundError(f'{folder} not found; set download=True to fetch '
                                        f'{self.URL} into {self.data_root!r}')
            from torchvision.datasets.utils import download_and_extract_archive
            download_and_extract_archive(self.URL, self.data_root, md5=self.MD5)

        names = ['test_batch'] if self.split == 'test' else [f'data_batch_{i}' for i in range(1, 6)]
        imgs, labels = [], []
        for name in names:
            with open(osp.join(folder, name), 'rb') as f:
                batch = pickle.load(f, encoding='latin1')
            imgs.append(batch['data'])
            labels.extend(batch['labels'])
        imgs = np.concatenate(imgs).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)[..., ::-1]

        index = np.arange(len(labels))
        if self.split != 'test' and self.val_size:
            if not 0 < self.val_size < len(labels):
                raise ValueError(f'val_size must be in (0, {len(labels)}), got {self.val_size}')
            perm = torch.randperm(len(labels),
                                  generator=torch.Generator().manual_seed(self.split_seed))
            cut = len(labels) - self.val_size
            index = perm[:cut] if self.split == 'train' else perm[cut:]
        return [dict(img=np.ascontiguousarray(imgs[i]), gt_label=int(labels[i]))
                for i in index.tolist()]
