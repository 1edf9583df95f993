"""A small mmengine model, data set, metric and hook for the launch tests
(tests/openmmlab/test_tools.py, test_deepspeed.py).

Registered in mmengine's root registries; a config loads them with
``custom_imports=dict(imports=['robustbn', 'toy_components'])`` and tests/openmmlab on
PYTHONPATH (helpers.tool_env).
The model uses the real SyncJSBN layers, the data are fixed by a seed, so runs with the
same seed and global batch give the same weights.
"""
from __future__ import annotations

import os.path as osp

import torch
import torch.distributed as dist
import torch.nn.functional as F
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel, is_model_wrapper
from mmengine.registry import DATASETS, HOOKS, METRICS, MODELS
from torch import nn
from torch.utils.data import Dataset

NUM_CLASSES = 4


@MODELS.register_module()
class ToyNet(BaseModel):
    """conv-SyncJSBN-relu x2, pool, linear-SyncJSBN-relu, linear: 3 SyncJSBN layers."""

    def __init__(self, width: int = 8, norm: str = 'SyncJSBN', init_cfg=None):
        super().__init__(init_cfg=init_cfg)

        def norm_layer():
            return MODELS.build(dict(type=norm, num_features=width))

        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), norm_layer(), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False), norm_layer(),
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(width, width, bias=False), norm_layer(), nn.ReLU())
        self.head = nn.Linear(width, NUM_CLASSES)

    def forward(self, inputs, labels, mode='tensor'):
        feats = self.features(inputs)
        self.compute_dtype = str(feats.dtype)  # shows whether --amp autocast was active
        logits = self.head(feats)
        if mode == 'loss':
            return dict(loss=F.cross_entropy(logits, labels))
        if mode == 'predict':
            return [dict(pred=int(p), gt=int(g)) for p, g in zip(logits.argmax(1), labels)]
        return logits


@DATASETS.register_module()
class ToyDataset(Dataset):
    """``size`` 3x8x8 images whose channel means depend on the class; fixed by ``seed``."""

    def __init__(self, size: int = 64, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, NUM_CLASSES, (size,), generator=gen)
        centers = torch.randn(NUM_CLASSES, 3, 1, 1, generator=gen)
        self.images = centers[self.labels] + torch.randn(size, 3, 8, 8, generator=gen)
        self.metainfo = dict(classes=tuple(range(NUM_CLASSES)))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, idx):
        return dict(inputs=self.images[idx], labels=self.labels[idx])


@METRICS.register_module()
class ToyAccuracy(BaseMetric):

    def process(self, data_batch, data_samples):
        self.results.extend(float(s['pred'] == s['gt']) for s in data_samples)

    def compute_metrics(self, results):
        return dict(accuracy=100.0 * sum(results) / len(results))


@HOOKS.register_module()
class DumpStateHook(Hook):
    """After training, every rank saves its model state and process-group facts to
    ``work_dir/state_rank{rank}.pth`` (checkpoints are written by rank 0 only)."""

    def after_train(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        initialized = dist.is_available() and dist.is_initialized()
        torch.save(dict(
            rank=runner.rank, world_size=runner.world_size, iter=runner.iter,
            backend=dist.get_backend() if initialized else None,
            wrapper=type(runner.model).__name__,
            compute_dtype=getattr(model, 'compute_dtype', None),
            state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
        ), osp.join(runner.work_dir, f'state_rank{runner.rank}.pth'))
