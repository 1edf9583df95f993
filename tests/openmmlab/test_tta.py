"""Test-time adaptation (robustbn.openmmlab.tta, tools/tta_test.py), on CPU.

A narrow ResNet9 (robustbn's ImageClassifier + CifarResNet, BatchNorm) is trained here on
scikit-learn's digits and tested on a corrupted copy (tests/openmmlab/tta_components.py:
lower contrast, brighter, grey noise):
- bn_adapt, tent and gprebn each beat the source model by a wide margin; 'source' is
  exactly mmengine's TestLoop; the runner's model is unchanged after every run, as test
  loop and as val loop during training (val hooks fire, the training model is untouched);
- episodic adaptation restores weights, EMA statistics and optimizer state bit-identically
  after every batch, and with one step predicts exactly as bn_adapt;
- tools/tta_test.py writes its JSON + markdown table (2 severities x 2 methods), in one
  process with batch 16 and with torchrun in 2 gloo processes with batch 8: mmengine's
  DefaultSampler gives rank r the samples r, r + 2, ... so the two ranks' t-th batches
  together are the single process's t-th batch, and adapted weights, predictions and
  errors agree;
- one gprebn step on a small mmseg EncoderDecoder changes only norm affine parameters;
- bad loop settings and data sets without corruption keys fail with clear errors.
"""
from __future__ import annotations

import copy
import json
import math
import sys

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

pytest.importorskip('mmcv._ext', reason='CifarResNet and mmseg need compiled mmcv')

import helpers  # noqa: E402
import tta_components  # noqa: E402,F401  (CorruptedDigits, TinySegDataset, DumpAdaptedHook)
from helpers import free_port, load_tool  # noqa: E402
from mmengine.config import Config, ConfigDict  # noqa: E402
from mmengine.dataset import pseudo_collate  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.registry import DATASETS, LOOPS, MODELS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import robustbn  # noqa: E402,F401  (registers everything)
from robustbn.openmmlab import tta  # noqa: E402  (not its Test* class: pytest would collect it)
from robustbn.openmmlab.tta import Adapter, entropy_sum  # noqa: E402

TIMEOUT = 240
SIZE = helpers.DIGITS_SIZE
PIPE = [dict(type='PackClsInputs')]
MODEL = helpers.DIGITS_MODEL
GPREBN = dict(type='TestTimeAdaptLoop', method='gprebn',
              optimizer=dict(type='SGD', lr=2.5e-4, momentum=0.9), steps=1, episodic=False,
              norm_kwargs=dict(theta=1.0, target_momentum=0.05, batch_estimator='sample'))

CFG = f"""
custom_imports = dict(imports=['robustbn', 'tta_components'], allow_failed_imports=False)
default_scope = 'mmengine'
model = {MODEL!r}
test_dataloader = dict(
    batch_size=32, num_workers=0, sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='CorruptedDigits', corruption='mixed', severity=5, split='test',
                 img_size={SIZE}, pipeline={PIPE!r}))
test_evaluator = dict(type='Accuracy', topk=(1, ))
test_cfg = {GPREBN!r}
default_hooks = dict(logger=dict(type='LoggerHook', interval=1000))
randomness = dict(seed=0)
env_cfg = dict(dist_cfg=dict(backend='nccl'))  # as mmseg's runtime; CPU runs switch to gloo
log_level = 'WARNING'
"""


# ----------------------------------------------------------------------------- helpers
def run_tool(cmd) -> str:
    return helpers.run(cmd, timeout=TIMEOUT)


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def runner_for(trained, tmp_path, test_cfg=None, **extra) -> Runner:
    cfg = Config.fromfile(str(trained['config']))
    if test_cfg is not None:
        cfg.test_cfg = test_cfg
    cfg.merge_from_dict(extra)
    cfg.work_dir = str(tmp_path)
    cfg.load_from = str(trained['ckpt'])
    return Runner.from_cfg(cfg)


def batches(split='test', severity=5, n=4, size=32):
    ds = DATASETS.build(dict(type='CorruptedDigits', corruption='mixed', severity=severity,
                             split=split, img_size=SIZE, pipeline=PIPE))
    return [pseudo_collate([ds[j] for j in range(i * size, (i + 1) * size)]) for i in range(n)]


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """These small models gain nothing from intra-op threads, and oversubscribed OpenMP
    threads crawl on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, one_thread):
    """The narrow ResNet9 trained 6 epochs on clean digits (about 3 s); its checkpoint and
    the TTA config file."""
    d = tmp_path_factory.mktemp('tta')
    torch.manual_seed(0)
    model = MODELS.build(copy.deepcopy(MODEL))
    train = DATASETS.build(dict(type='DigitsDataset', split='train', img_size=SIZE,
                                pipeline=PIPE))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(6):
        perm = torch.randperm(len(train), generator=gen).tolist()
        for i in range(0, len(perm), 64):
            data = model.data_preprocessor(pseudo_collate([train[j] for j in perm[i:i + 64]]),
                                           True)
            loss = model(**data, mode='loss')['loss']
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), d / 'model.pth')
    (d / 'tta.py').write_text(CFG)
    return dict(model=model, ckpt=d / 'model.pth', config=d / 'tta.py')


# ------------------------------------------------------------------ classification
def test_methods_beat_source_and_leave_the_model_alone(trained, tmp_path):
    acc, entropy = {}, {}
    for method in ('source', 'bn_adapt', 'tent', 'gprebn'):
        loop = dict(GPREBN, method=method)
        if method != 'gprebn':
            loop.pop('optimizer')  # TENT: its paper's Adam lr 1e-3 (the default)
        runner = runner_for(trained, tmp_path / method, loop)
        runner.load_or_resume()
        before = state(runner.model)
        grads = {n: p.requires_grad for n, p in runner.model.named_parameters()}
        metrics = runner.test()
        assert_same_state(before, state(runner.model))
        assert grads == {n: p.requires_grad for n, p in runner.model.named_parameters()}
        acc[method] = metrics['accuracy/top1']
        entropy[method] = metrics.get('tta/entropy')
        assert isinstance(runner.test_loop, tta.TestTimeAdaptLoop)
    # 'source' is mmengine's TestLoop exactly
    plain = runner_for(trained, tmp_path / 'plain', dict(type='TestLoop')).test()
    assert plain['accuracy/top1'] == acc['source'] and entropy['source'] is None
    print('accuracy under the corruption:', acc)
    assert acc['source'] < 60
    for method in ('bn_adapt', 'tent', 'gprebn'):
        assert acc[method] > acc['source'] + 10, (method, acc)
        assert 0 < entropy[method] < math.log(10)


class _ValStateCheck(Hook):
    """Records the val hooks and checks that validation leaves the training model alone."""

    def __init__(self):
        self.calls, self.metrics = [], []

    def before_val(self, runner):
        self.calls.append('before_val')
        self.before = state(runner.model)

    def before_val_iter(self, runner, batch_idx, data_batch=None):
        self.calls.append('before_val_iter')

    def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.calls.append('after_val_iter')
        assert all('pred_label' in s for s in outputs)

    def after_val_epoch(self, runner, metrics=None):
        self.metrics.append(dict(metrics))
        assert_same_state(self.before, state(runner.model))

    def before_test(self, runner):
        self.calls.append('before_test')


def test_val_loop_during_training_keeps_the_training_model(trained, tmp_path):
    val = dict(GPREBN, method='tent', steps=2)
    val.pop('optimizer')
    cfg = dict(
        train_dataloader=dict(batch_size=64, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=True),
                              dataset=dict(type='DigitsDataset', split='train', img_size=SIZE,
                                           pipeline=PIPE)),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=2, val_interval=1),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        val_dataloader=dict(batch_size=64, num_workers=0,
                            sampler=dict(type='DefaultSampler', shuffle=False),
                            dataset=dict(type='CorruptedDigits', split='test', img_size=SIZE,
                                         indices=128, pipeline=PIPE)),
        val_evaluator=dict(type='Accuracy', topk=(1, )),
        val_cfg=val)
    runner = runner_for(trained, tmp_path, **cfg)
    check = _ValStateCheck()
    runner.register_hook(check)
    runner.train()
    assert isinstance(runner.val_loop, tta.TestTimeAdaptLoop)
    assert check.calls.count('before_val') == 2 and 'before_test' not in check.calls
    assert check.calls.count('after_val_iter') == 4  # 2 validations x 2 batches
    assert all(0 <= m['accuracy/top1'] <= 100 and m['tta/entropy'] > 0 for m in check.metrics)
    assert runner.iter == 2  # training went on after validating


@pytest.mark.parametrize('method', ['tent', 'gprebn'])
def test_episodic_reset_is_exact(trained, method):
    model = trained['model']
    data = batches(n=3)
    kw = dict(steps=2, optimizer=dict(type='SGD', lr=0.05, momentum=0.9))
    episodic = Adapter(model, method, episodic=True, **kw)
    initial = state(episodic.model)
    for batch in data:
        episodic.adapt(batch)
        assert_same_state(initial, state(episodic.model))
        assert not episodic.optimizer.state  # momentum buffers gone too
    online = Adapter(model, method, **kw)
    online.adapt(data[0])
    changed = [k for k, v in state(online.model).items() if not torch.equal(v, initial[k])]
    assert changed and all(k.endswith(('.weight', '.bias', 'target_mean', 'target_var',
                                       'target_initialized')) for k in changed)
    if method == 'gprebn':
        assert any(k.endswith('target_mean') for k in changed)


def test_episodic_one_step_tent_predicts_as_bn_adapt(trained):
    model = trained['model']
    tent = Adapter(model, 'tent', episodic=True)
    bn = Adapter(model, 'bn_adapt')
    for batch in batches(n=3):
        a, b = tent.adapt(copy.deepcopy(batch)), bn.adapt(batch)
        torch.testing.assert_close(torch.stack([s.pred_score for s in a]),
                                   torch.stack([s.pred_score for s in b]), rtol=0, atol=1e-6)
        assert not any(s.pred_score.requires_grad for s in a)
    torch.testing.assert_close(tent.mean_entropy(), bn.mean_entropy(), rtol=1e-6, atol=0)


def test_entropy():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    h, n = entropy_sum(logits)
    assert n == 2 and abs(h.item() - math.log(2)) < 1e-4
    h, n = entropy_sum(torch.zeros(2, 4, 3, 5))  # segmentation: per pixel
    assert n == 30 and abs(h.item() - 30 * math.log(4)) < 1e-3
    h, n = entropy_sum(torch.zeros(2, 1, 3, 3))  # a single channel: sigmoid
    assert n == 18 and abs(h.item() - 18 * math.log(2)) < 1e-4


# ------------------------------------------------------------------ tools/tta_test.py
def test_tta_test_tool_one_and_two_processes_agree(trained, tmp_path):
    config = tmp_path / 'dump.py'
    config.write_text(CFG + "custom_hooks = [dict(type='DumpAdaptedHook')]\n")
    args = [config, trained['ckpt'], '--methods', 'tent', 'gprebn', '--corruptions', 'mixed',
            '--severities', '3', '5', '--max-samples', '192', '--cfg-options']
    one, two = tmp_path / 'one', tmp_path / 'two'
    run_tool([sys.executable, 'tools/tta_test.py', *args, 'test_dataloader.batch_size=16',
              '--work-dir', one])
    run_tool([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
              f'--master_port={free_port()}', 'tools/tta_test.py', *args,
              'test_dataloader.batch_size=8', '--work-dir', two, '--launcher', 'pytorch'])

    tables = [json.loads((d / 'tta_results.json').read_text()) for d in (one, two)]
    for table, world in zip(tables, (1, 2)):
        assert table['metric'] == 'accuracy/top1' and table['world_size'] == world
        assert [(r['corruption'], r['severity']) for r in table['results']] == \
            [('mixed', 3), ('mixed', 5)]
        for r in table['results']:
            assert set(r['error']) == {'tent', 'gprebn'}
            assert all(0 <= e <= 100 for e in r['error'].values())
    md = (one / 'tta_results.md').read_text()
    assert '| mixed | 5 |' in md and 'tent | gprebn' in md and '**mean**' in md
    assert tables[0]['test_cfg']['tent'].get('optimizer') is None  # GpreBN's SGD not carried

    for run in ('mixed_s3_tent', 'mixed_s5_gprebn'):
        ref = torch.load(one / 'runs' / run / 'adapted_rank0.pth')
        ranks = [torch.load(two / 'runs' / run / f'adapted_rank{r}.pth') for r in range(2)]
        assert ranks[0]['world_size'] == 2 and len(ref['scores']) == 192
        assert sorted(ranks[0]['scores']) == list(range(0, 192, 2))  # rank 0: even samples
        scores = {**ranks[0]['scores'], **ranks[1]['scores']}
        assert scores.keys() == ref['scores'].keys()
        for i, s in ref['scores'].items():
            torch.testing.assert_close(scores[i], s, rtol=1e-4, atol=1e-5)
        # SyncGpreBN / SyncJSBN layers on 2 ranks, GpreBN / BatchNorm on 1: same weights
        for r in ranks:
            for k, v in ref['state_dict'].items():
                torch.testing.assert_close(r['state_dict'][k], v, rtol=1e-4, atol=1e-5,
                                           msg=f'{run} {k}')
    for a, b in zip(tables[0]['results'], tables[1]['results']):
        for m in ('tent', 'gprebn'):
            assert abs(a['error'][m] - b['error'][m]) <= 100 / 192 + 1e-9  # at most 1 sample


def test_tta_test_sets_both_corruption_forms_and_refuses_others():
    tool = load_tool('tta_test')
    ds = dict(type='CIFAR10C', corruption='fog', severity=1)
    tool.set_corruption(ds, 'snow', 4)
    assert (ds['corruption'], ds['severity']) == ('snow', 4)
    ds = dict(type='RepeatDataset', times=2, dataset=dict(
        type='ImageFolder', pipeline=[dict(type='LoadImageFromFile'),
                                      dict(type='ImageNetCorruption', corruption='fog',
                                           severity=1)]))
    tool.set_corruption(ds, 'frost', 2)
    assert ds['dataset']['pipeline'][1] == dict(type='ImageNetCorruption', corruption='frost',
                                                severity=2)
    # on the fly
    assert tool.default_corruptions(ds) == list(robustbn.openmmlab.datasets.CORRUPTIONS)
    assert len(tool.default_corruptions(dict(type='CIFAR10C'))) == 15
    with pytest.raises(ValueError, match="neither 'corruption'/'severity' keys"):
        tool.set_corruption(dict(type='DigitsDataset', pipeline=PIPE), 'fog', 1)
    # the optimizer of one method is not carried to another
    cfg = tool.loop_cfg(GPREBN, 'tent')
    assert cfg['method'] == 'tent' and 'optimizer' not in cfg and cfg['steps'] == 1
    assert tool.loop_cfg(GPREBN, 'gprebn')['optimizer'] == GPREBN['optimizer']
    assert tool.loop_cfg(dict(type='TestLoop', fp16=True), 'source') == dict(
        type='TestTimeAdaptLoop', method='source', fp16=True)
    assert tool.error_of({'mIoU': 61.5, 'aAcc': 90.0}) == ('mIoU', 38.5)


# ------------------------------------------------------------------ segmentation
SEG_NORM = dict(type='BN', requires_grad=True)
SEG_MODEL = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(type='SegDataPreProcessor', mean=[128.] * 3, std=[64.] * 3,
                           bgr_to_rgb=False, pad_val=0, seg_pad_val=255),
    backbone=dict(type='ResNetV1c', depth=18, stem_channels=8, base_channels=8,
                  strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), out_indices=(3, ),
                  norm_cfg=SEG_NORM),
    decode_head=dict(type='FCNHead', in_channels=64, in_index=0, channels=16, num_convs=1,
                     concat_input=False, num_classes=3, norm_cfg=SEG_NORM,
                     align_corners=False),
    train_cfg=dict(), test_cfg=dict(mode='whole'))


def test_segmentation_one_gprebn_step_changes_only_norm_affine(tmp_path):
    runner = Runner(
        model=ConfigDict(SEG_MODEL), work_dir=str(tmp_path), default_scope='mmseg',
        test_dataloader=dict(batch_size=4, num_workers=0,
                             sampler=dict(type='DefaultSampler', shuffle=False),
                             dataset=dict(type='TinySegDataset', num=4, size=64,
                                          pipeline=[dict(type='PackSegInputs')])),
        test_evaluator=dict(type='IoUMetric', iou_metrics=['mIoU']),
        # lr 0.05: DELTA's 2.5e-4 moves the weights (1.0 at init) less than float32 resolves
        test_cfg=dict(GPREBN, optimizer=dict(type='SGD', lr=0.05),
                      norm_kwargs=dict(target_momentum=0.5)),
        log_level='WARNING', randomness=dict(seed=0))
    before = state(runner.model)
    metrics = runner.test()  # 4 images, batch 4: one adaptation step
    assert_same_state(before, state(runner.model))
    assert 0 <= metrics['mIoU'] <= 100
    assert math.isfinite(metrics['tta/entropy']) and 0 < metrics['tta/entropy'] <= math.log(3)

    adapted = runner.test_loop.adapted_model
    norms = {f'{n}.{p}' for n, m in adapted.named_modules() if isinstance(m, _BatchNorm)
             for p in ('weight', 'bias')}
    assert type(adapted.decode_head.conv_seg).__name__ == 'Conv2d'
    assert {type(m).__name__ for m in adapted.modules() if isinstance(m, _BatchNorm)} == \
        {'GpreBN2d'}
    params = dict(adapted.named_parameters())
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert changed and changed <= norms
    assert len(changed) > len(norms) // 2  # nearly every affine parameter got a gradient
    for n, m in adapted.named_modules():  # source statistics kept, the test-time EMA moved
        if isinstance(m, _BatchNorm):
            assert torch.equal(m.running_mean, before[f'{n}.running_mean'])
    assert any(not torch.equal(m.target_mean, m.running_mean)
               for m in adapted.modules() if isinstance(m, _BatchNorm))
    # predictions as mmseg's predict formats them, without autograd graph
    out = runner.test_loop.adapter.adapt(next(iter(runner.test_dataloader)))
    assert out[0].pred_sem_seg.data.shape == (1, 64, 64)
    assert not out[0].seg_logits.data.requires_grad


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize('kwargs, match', [
    (dict(method='dua'), 'method must be one of'),
    (dict(method='tent', optimizer=dict(type='Adamm')), "not in mmengine's OPTIMIZERS"),
    (dict(steps=0), 'steps must be an integer >= 1'),
    (dict(norm_kwargs=dict(thetaa=1.0)), 'unknown norm_kwargs'),
    (dict(stage='train'), 'stage must be'),
])
def test_bad_loop_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LOOPS.build(dict(type='TestTimeAdaptLoop', **kwargs),
                    default_args=dict(runner=None, dataloader=None, evaluator=None))


def test_model_without_norm_layers_cannot_be_adapted():
    cfg = copy.deepcopy(MODEL)
    cfg['backbone']['norm_cfg'] = dict(type='GN', num_groups=2)
    with pytest.raises(ValueError, match='has none'):
        Adapter(MODELS.build(cfg), 'tent')
