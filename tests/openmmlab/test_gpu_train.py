"""fcn_hr18 on Cityscapes-shaped data on a GPU (skipped without CUDA).

    .venv/bin/python -m pytest -m gpu tests/openmmlab/test_gpu_train.py -s

Trains 50 iterations with SyncJSBN (single process: no group, so it is JSBN) and with the
SyncBN baseline (a single process reverts it to BN, as mmengine does), on a fixed batch of
2 images at 512x1024 whose labels depend on the image, and prints the iteration times.
"""
import time

import pytest
import torch
from helpers import ROOT

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]

CONFIGS = {'SyncJSBN': 'fcn_hr18_4xb2-40k_cityscapes-512x1024_syncjsbn.py',
           'SyncBN': 'fcn_hr18_4xb2-40k_cityscapes-512x1024_syncbn.py'}


def _model(config):
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    import robustbn  # noqa: F401
    cfg = Config.fromfile(str(ROOT / 'configs' / 'seg' / config))
    cfg.model.pretrained = None
    cfg.model.backbone.init_cfg = None
    init_default_scope('mmseg')
    return revert_sync_batchnorm(MODELS.build(cfg.model)).cuda().train()


def _batch():
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (2, 3, 512, 1024), generator=g, dtype=torch.uint8)
    # a learnable target: the class is the brightness band of the red channel
    labels = (imgs[:, 2].long() * 19 // 256)
    samples = []
    for lab in labels:
        s = SegDataSample(gt_sem_seg=PixelData(data=lab[None]))
        s.set_metainfo(dict(img_shape=(512, 1024), ori_shape=(512, 1024), pad_shape=(512, 1024)))
        samples.append(s)
    return dict(inputs=list(imgs), data_samples=samples)


@pytest.mark.parametrize('norm', list(CONFIGS))
def test_fcn_hr18_trains_50_iterations(norm):
    from mmengine.optim import OptimWrapper
    torch.manual_seed(0)
    model = _model(CONFIGS[norm])
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                                         weight_decay=5e-4))
    data = _batch()
    losses, times = [], []
    for _ in range(50):
        torch.cuda.synchronize()
        t = time.perf_counter()
        log_vars = model.train_step(data, optim)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(float(log_vars['loss']))
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    ms = sorted(times[10:])[len(times[10:]) // 2] * 1e3
    print(f'\n{norm}: loss {first:.3f} -> {last:.3f}, median iteration {ms:.1f} ms, '
          f'peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB')
    assert last < 0.8 * first
