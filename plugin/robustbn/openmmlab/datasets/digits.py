"""scikit-learn's bundled handwritten digits as small colour images."""
from __future__ import annotations

from typing import List

import cv2
import numpy as np
from mmengine.dataset import BaseDataset


class DigitsDataset(BaseDataset):
    """The 1797 8x8 digits of ``sklearn.datasets.load_digits`` (no download), scaled to
    uint8, resized (bilinear) to ``img_size`` and repeated to 3 channels: samples are
    ``dict(img=(img_size, img_size, 3) uint8, gt_label=int)``.

    ``split='train'``/``'test'`` is a stratified split of ``test_size`` that depends only
    on ``seed``.
    """

    METAINFO = dict(classes=tuple(str(i) for i in range(10)))

    def __init__(self, split: str = 'train', test_size: float = 0.25, seed: int = 0,
                 img_size: int = 32, **kwargs) -> None:
        if split not in ('train', 'test'):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not 0 < test_size < 1:
            raise ValueError(f'test_size must be in (0, 1), got {test_size}')
        self.split, self.test_size, self.seed, self.img_size = split, test_size, seed, img_size
        super().__init__(**kwargs)

    def load_data_list(self) -> List[dict]:
        # scikit-learn is needed by this dataset only.
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        train, test = train_test_split(np.arange(len(digits.target)), test_size=self.test_size,
                                       random_state=self.seed, stratify=digits.target)
        data_list = []
        for i in (train if self.split == 'train' else test):
            img = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)  # values 0..16
            img = cv2.resize(img, (self.img_size, self.img_size), interpolation=cv2.INTER_LINEAR)
            data_list.append(dict(img=np.repeat(img[..., None], 3, axis=2),
                                  gt_label=int(digits.target[i])))
        return data_list
