"""A corrupted-digits data set for the test-time adaptation tests
(tests/openmmlab/test_tta.py).

``CorruptedDigits`` is robustbn's ``DigitsDataset`` with the two config keys the
corruption benchmarks use, ``corruption`` and ``severity``, so tools/tta_test.py can set
them as it does for CIFAR-10-C. Registered in mmengine's root DATASETS; configs load it
with ``custom_imports=dict(imports=['robustbn', 'tta_components'])`` and tests/openmmlab
on PYTHONPATH. Also ``TinySegDataset`` (generated images and label maps for mmseg) and a
hook that saves each rank's adapted model and predictions.
"""
from __future__ import annotations

import os.path as osp

import numpy as np
import torch
from mmengine.dataset import BaseDataset
from mmengine.hooks import Hook
from mmengine.registry import DATASETS, HOOKS

from robustbn.openmmlab.datasets import DigitsDataset

# Per severity unit: contrast loss, brightness gain, noise standard deviation (0..255).
CORRUPTIONS = {
    'brightness': (0.0, 30.0, 0.0),
    'contrast': (0.15, 0.0, 0.0),
    'gaussian_noise': (0.0, 0.0, 12.0),
    'mixed': (0.12, 25.0, 6.0),
}


@DATASETS.register_module()
class CorruptedDigits(DigitsDataset):
    """Digits with ``corruption`` (one of ``CORRUPTIONS``) at ``severity`` 0 (clean) to 5:
    ``img * (1 - c s) + b s + noise(sd s)``, clipped to 0..255; the noise is fixed by the
    sample's index."""

    def __init__(self, corruption: str = 'mixed', severity: int = 5, **kwargs) -> None:
        if corruption not in CORRUPTIONS:
            raise ValueError(f'corruption must be one of {sorted(CORRUPTIONS)}, got {corruption!r}')
        self.corruption, self.severity = corruption, severity
        super().__init__(**kwargs)

    def load_data_list(self):
        contrast, bright, noise = (v * self.severity for v in CORRUPTIONS[self.corruption])
        data_list = super().load_data_list()
        for i, info in enumerate(data_list):
            img = info['img'].astype(np.float64) * (1 - contrast) + bright
            if noise:
                rng = np.random.default_rng(i)
                img = img + rng.normal(0, noise, img.shape[:2])[..., None]  # grey noise
            info['img'] = np.clip(np.round(img), 0, 255).astype(np.uint8)
        return data_list


@DATASETS.register_module()
class TinySegDataset(BaseDataset):
    """``num`` generated (size, size) images of 3 classes: a bright left band (class 1),
    a dark right band (class 2) and noise between (class 0), for mmseg's PackSegInputs."""

    METAINFO = dict(classes=('background', 'bright', 'dark'),
                    palette=[[0, 0, 0], [255, 255, 255], [128, 128, 128]])

    def __init__(self, num: int = 4, size: int = 32, **kwargs) -> None:
        self.num, self.size = num, size
        super().__init__(serialize_data=False, **kwargs)

    def load_data_list(self):
        rng = np.random.default_rng(0)
        data_list = []
        for i in range(self.num):
            label = np.zeros((self.size, self.size), np.uint8)
            cut = self.size // 4 + i
            label[:, :cut], label[:, -cut:] = 1, 2
            img = rng.integers(60, 200, (self.size, self.size, 3)).astype(np.uint8)
            img[label == 1], img[label == 2] = 250, 10
            data_list.append(dict(img=img, gt_seg_map=label, seg_fields=['gt_seg_map'],
                                  ori_shape=label.shape, img_shape=label.shape,
                                  reduce_zero_label=False))
        return data_list


@HOOKS.register_module()
class DumpAdaptedHook(Hook):
    """After a test run, every rank saves the loop's adapted model (state dict) and its
    predictions by sample index to ``work_dir/adapted_rank{rank}.pth``."""

    def before_test(self, runner):
        self.scores = {}

    def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        for sample in outputs:
            self.scores[int(sample.sample_idx)] = sample.pred_score.clone()

    def after_test(self, runner):
        model = runner.test_loop.adapted_model
        state = None if model is None else \
            {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(dict(state_dict=state, scores=self.scores, rank=runner.rank,
                        world_size=runner.world_size),
                   osp.join(runner.work_dir, f'adapted_rank{runner.rank}.pth'))
