"""Digits-C (the digits test split under ImageNet-C corruptions), tools/tta_benchmark.py,
and the TTA method settings it relies on (TENT's train mode, float64 entropy), on CPU.

- DigitsC is the same bytes for the same arguments (generated or from its cache), its
  seed changes the noise, and every corruption changes the images;
- tools/tta_benchmark.py on a tiny untrained ResNet9 and 24 samples writes its JSON,
  markdown and plot, and its episodic cells predict exactly as separate
  ``TestTimeAdaptLoop`` runs (one per corruption) do; the continual stream starts as the
  episodic run of its first corruption;
- 'tent' adapts with dropout in train mode (as TENT), the others in eval mode, unless
  ``train_mode`` says otherwise.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip('mmcv._ext', reason='CifarResNet needs compiled mmcv')

from helpers import DIGITS_MODEL as MODEL  # noqa: E402
from helpers import DIGITS_SIZE as SIZE  # noqa: E402
from helpers import load_tool  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.registry import LOOPS, MODELS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import robustbn  # noqa: E402,F401  (registers everything)
from robustbn.openmmlab.datasets import CORRUPTIONS, DigitsC, DigitsDataset  # noqa: E402
from robustbn.openmmlab.tta import configure_model, entropy_sum  # noqa: E402


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ Digits-C
def test_digits_c_is_deterministic_and_cached(tmp_path):
    kw = dict(corruption='gaussian_noise', severity=3, img_size=SIZE)
    made = DigitsC(**kw, cache_dir=str(tmp_path)).load_arrays()
    assert len(list(tmp_path.glob('gaussian_noise_s3_*.npz'))) == 1
    cached = DigitsC(**kw, cache_dir=str(tmp_path)).load_arrays()
    again = DigitsC(**kw, cache_dir=None).load_arrays()
    for a in (cached, again):
        assert a[0].tobytes() == made[0].tobytes() and np.array_equal(a[1], made[1])
    other = DigitsC(**dict(kw, seed=1), cache_dir=str(tmp_path)).load_arrays()
    assert other[0].tobytes() != made[0].tobytes()
    assert len(list(tmp_path.glob('*.npz'))) == 2  # a cache file per seed
    ds = DigitsC(**kw, cache_dir=str(tmp_path), pipeline=[dict(type='PackClsInputs')])
    assert len(ds) == 450 and ds.metainfo['classes'][3] == '3'
    assert tuple(ds[0]['inputs'].shape) == (3, SIZE, SIZE)


def test_every_corruption_changes_the_images():
    clean = DigitsDataset(split='test', img_size=SIZE, lazy_init=False)
    images = np.stack([clean.get_data_info(i)['img'] for i in range(len(clean))])
    labels = [clean.get_data_info(i)['gt_label'] for i in range(len(clean))]
    for corruption in CORRUPTIONS:
        # severity 1, the mildest
        imgs, lab = DigitsC(corruption, 1, img_size=SIZE, cache_dir=None).load_arrays()
        assert imgs.shape == images.shape and imgs.dtype == np.uint8
        assert lab.tolist() == labels
        changed = (imgs != images).any(axis=(1, 2, 3)).mean()
        assert changed > 0.9, (corruption, changed)


def test_digits_c_bad_arguments():
    with pytest.raises(ValueError, match="'snow'"):
        DigitsC('snow', cache_dir=None)
    with pytest.raises(ValueError, match='severity'):
        DigitsC('contrast', severity=6, cache_dir=None)
    with pytest.raises(ValueError, match='corrupt_size'):
        DigitsC('contrast', corrupt_size=4, cache_dir=None)


# ------------------------------------------------------------------ tools/tta_benchmark.py
class _Predictions(Hook):
    def __init__(self):
        self.labels = []

    def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.labels += [int(s.pred_label) for s in outputs]


def _config(tmp_path):
    cfg = f"""
custom_imports = dict(imports=['robustbn'], allow_failed_imports=False)
default_scope = 'mmengine'
model = {MODEL!r}
test_dataloader = dict(
    batch_size=64, num_workers=0, sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='DigitsC', corruption='gaussian_noise', severity=5, img_size={SIZE},
                 cache_dir='{tmp_path / "cache"}', pipeline=[dict(type='PackClsInputs')]))
test_evaluator = dict(type='Accuracy', topk=(1, ))
test_cfg = dict(type='TestTimeAdaptLoop', method='gprebn')
default_hooks = dict(logger=dict(type='LoggerHook', interval=1000))
randomness = dict(seed=0)
log_level = 'WARNING'
"""
    path = tmp_path / 'digits_c.py'
    path.write_text(cfg)
    return path


def cells_of(result, key):
    protocol, bs, sev, variant = key.split('|')
    return next(c for c in result['cells'] if (c['protocol'], c['batch_size'], c['severity'],
                                               c['variant']) == (protocol, int(bs), int(sev),
                                                                 variant))


def test_benchmark_tool_matches_test_time_adapt_loop(tmp_path):
    config = _config(tmp_path)
    torch.manual_seed(0)
    model = MODELS.build(copy.deepcopy(MODEL))
    ckpt = tmp_path / 'model.pth'
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), ckpt)
    tool = load_tool('tta_benchmark')
    methods = ['source', 'bn_adapt', 'tent', 'gprebn', 'gprebn-js']
    corruptions = ['gaussian_noise', 'contrast']
    work = tmp_path / 'bench'
    tool.main(['--config', str(config), '--checkpoints', str(ckpt), '--seeds', '0',
               '--work-dir', str(work), '--batch-sizes', '8', '--methods', *methods,
               '--corruptions', *corruptions, '--max-samples', '24', '--sweep-batch-size',
               '8', '--sweep-methods', '--sweep-continual', '--severities',
               '--severity-methods', '--save-predictions'])
    for name in ('tta_benchmark.json', 'tta_benchmark.md', 'tta_benchmark_batch_size.png'):
        assert (work / name).stat().st_size > 0, name
    result = json.loads((work / 'tta_benchmark.json').read_text())
    md = (work / 'tta_benchmark.md').read_text()
    assert '**Severity 5, episodic**' in md and '**Severity 5, continual**' in md
    assert '| gprebn | ' in md and 'Paired differences' in md
    cells = {(c['protocol'], c['variant']): c for c in result['cells']}
    assert set(cells) == {('episodic', m) for m in methods} | \
        {('continual', m) for m in methods if m != 'source'}
    assert result['versions']['torch'] == torch.__version__
    # tables again from the saved cells, nothing run; a corruption subset of them
    again = tool.main(['--config', str(config), '--seeds', '0', '--work-dir', str(work),
                       '--corruptions', 'contrast', '--aggregate-only', '--no-plots'])
    assert len(again['cells']) == len(methods)  # the continual stream was of two corruptions
    for key, s in again['summary'].items():
        assert s['mean'] == cells_of(result, key)['errors']['contrast']

    # Episodic: each corruption is one TestTimeAdaptLoop run from the checkpoint.
    for method in methods:
        spec = tool.VARIANTS[method]
        for corruption in corruptions:
            cfg = Config.fromfile(str(config))
            cfg.test_dataloader.batch_size = 8
            cfg.test_dataloader.dataset.update(corruption=corruption, indices=24)
            cfg.test_cfg = dict(type='TestTimeAdaptLoop', method=spec['method'],
                                optimizer=spec.get('optimizer'),
                                norm_kwargs=spec.get('norm_kwargs'))
            cfg.work_dir = str(tmp_path / 'runs' / f'{method}_{corruption}')
            cfg.experiment_name = f'{method}_{corruption}'  # unique mmengine instance names
            cfg.load_from = str(ckpt)
            runner = Runner.from_cfg(cfg)
            hook = _Predictions()
            runner.register_hook(hook)
            metrics = runner.test()
            cell = cells[('episodic', method)]
            assert cell['predictions'][corruption] == hook.labels, (method, corruption)
            assert cell['errors'][corruption] == 100 - metrics['accuracy/top1']
    # Continual: the stream starts as the episodic run of its first corruption.
    for method in methods[1:]:
        first = corruptions[0]
        assert cells[('continual', method)]['predictions'][first] == \
            cells[('episodic', method)]['predictions'][first]
        assert len(cells[('continual', method)]['predictions'][corruptions[1]]) == 24


# ------------------------------------------------------------------ method settings
def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten())


@pytest.mark.parametrize('method, train_mode, dropout_on', [
    ('tent', None, True), ('tent', False, False), ('gprebn', None, False),
    ('bn_adapt', None, False), ('bn_adapt', True, True), ('gprebn', True, True)])
def test_train_mode_of_the_other_layers(method, train_mode, dropout_on):
    model = configure_model(_net(), method, train_mode=train_mode)
    assert model[2].training is dropout_on
    assert model[1].training is (method == 'gprebn')  # GpreBN's test-time forward
    if method != 'gprebn':  # batch statistics without running statistics either way
        x = torch.randn(4, 3, 5, 5)
        torch.testing.assert_close(
            model[1](model[0](x)),
            nn.functional.batch_norm(model[0](x), None, None, model[1].weight, model[1].bias,
                                     True))


def test_bad_settings_fail_when_the_loop_is_built():
    for kwargs, match in [(dict(train_mode='yes'), 'train_mode must be'),
                          (dict(norm_kwargs=dict(target_init='last')), 'target_init must be'),
                          (dict(norm_kwargs=dict(target_average='mad')), 'target_average')]:
        with pytest.raises(ValueError, match=match):
            LOOPS.build(dict(type='TestTimeAdaptLoop', **kwargs),
                        default_args=dict(runner=None, dataloader=None, evaluator=None))


def test_entropy_keeps_float64():
    logits = torch.randn(6, 10, dtype=torch.float64)
    h, n = entropy_sum(logits)
    logp = logits.log_softmax(1)
    assert h.dtype == torch.float64 and n == 6
    assert h.item() == (-(logp.exp() * logp).sum(1)).sum().item()
    assert entropy_sum(logits.half())[0].dtype == torch.float32
