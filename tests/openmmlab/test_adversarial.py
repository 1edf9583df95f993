"""Adversarial evaluation on CPU: AdversarialEvalHook, robustbn.openmmlab.adversarial,
tools/adv_test.py and tools/benchmark_adv.py.

A narrow ResNet9 with BN is trained on the bundled digits (configs/cls/resnet9_digits_bn.py)
with the hook after every validation and save_best on a PGD metric; on it: eps 0 gives
exactly the clean metrics, PGD <= FGSM <= clean, perturbations stay within eps and
[0, 255], the same run twice gives the same numbers and a sample's random start does not
depend on its batch. A JS-BN model with eval_stats='batch' keeps batch statistics and its
running statistics under attack. Segmentation uses configs/seg's fcn_hr18 (random weights)
on a generated 64x128 Cityscapes folder: logits at label size, ignored pixels out of the
loss and seen unchanged by the evaluator, eps 0 == clean. tools/adv_test.py sweeps two
checkpoints (JSON + PNG), 2 processes (torchrun, gloo) give the 1-process numbers.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip('mmcv._ext', reason='the models build on mmseg.models (compiled mmcv)')

from helpers import ROOT, free_port, run, write_cityscapes  # noqa: E402
from mmengine import Config  # noqa: E402
from mmengine.evaluator import BaseMetric, Evaluator  # noqa: E402
from mmengine.registry import HOOKS, MODELS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import robustbn  # noqa: E402,F401  (registers everything)
from robustbn import JSBN2d  # noqa: E402
from robustbn.openmmlab.adversarial import AdversarialEvalHook  # noqa: E402
from robustbn.openmmlab.adversarial.attacks import (  # noqa: E402
    AttackedModel,
    attack_labels,
    build_attack,
    check_attacks,
    perturb,
)
from robustbn.openmmlab.adversarial.evaluate import evaluate_attacks  # noqa: E402

DIGITS_BN = ROOT / 'configs' / 'cls' / 'resnet9_digits_bn.py'
DIGITS_JS = ROOT / 'configs' / 'cls' / 'resnet9_digits_syncjsbn.py'
SEG_CFG = ROOT / 'configs' / 'seg' / 'fcn_hr18_4xb2-40k_cityscapes-512x1024_syncjsbn.py'
EPOCHS = 6
PGD_TRAIN = dict(type='PGD', eps=8, alpha=3, steps=3, random_start=True)  # 'PGD-3_eps8'


# ----------------------------------------------------------------------------- helpers
def digits_cfg(work_dir: Path, config: Path = DIGITS_BN, **hook) -> Config:
    cfg = Config.fromfile(str(config))
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = f'{config.stem}_{work_dir.name}'  # one MessageHub per runner
    cfg.env_cfg.cudnn_benchmark = False
    cfg.test_dataloader.batch_size = 32
    if hook:
        cfg.custom_hooks = [dict(type='AdversarialEvalHook', **hook)]
    return cfg


def first_batch(loader, n=None):
    batch = next(iter(loader))
    return {k: v[:n] for k, v in batch.items()} if n else batch


# ----------------------------------------------------------------- a trained digits model
@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """ResNet9-BN trained for EPOCHS epochs with PGD/FGSM after every validation and the
    best checkpoint by adversarial accuracy."""
    work = tmp_path_factory.mktemp('digits')
    cfg = digits_cfg(work, max_samples=64, attacks=[dict(type='FGSM', eps=8), PGD_TRAIN])
    cfg.train_cfg.max_epochs = EPOCHS
    cfg.param_scheduler = dict(type='CosineAnnealingLR', T_max=EPOCHS, by_epoch=True, begin=0,
                               end=EPOCHS, convert_to_iter_based=True)
    cfg.default_hooks.logger.interval = 10
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1, max_keep_ckpts=EPOCHS,
                                        save_best='adv/PGD-3_eps8/accuracy/top1', rule='greater')
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner, work


def test_hook_metrics_logged_and_save_best(trained):
    runner, work = trained
    lines = [json.loads(x) for x in next(work.glob('*/vis_data/scalars.json')).read_text()
             .splitlines()]
    key = 'adv/PGD-3_eps8/accuracy/top1'
    val = [r for r in lines if 'accuracy/top1' in r and 'loss' not in r]
    assert len(val) == EPOCHS and all(key in r and 'adv/FGSM_eps8/accuracy/top5' in r for r in val)
    scores = [r[key] for r in val]
    best_epoch = scores.index(max(scores)) + 1  # the first maximum is kept
    assert [p.name for p in work.glob('best_*.pth')] == \
        [f'best_adv_PGD-3_eps8_accuracy_top1_epoch_{best_epoch}.pth']
    assert runner.message_hub.get_info('best_score') == max(scores)
    assert runner.message_hub.get_scalar(f'val/{key}').current() == scores[-1]


def test_eps_zero_gives_exactly_the_clean_metrics(trained, tmp_path):
    _, work = trained
    zero = [dict(type='FGSM', eps=0), dict(type='PGD', eps=0, alpha=2, steps=2),
            dict(type='GN', std=0), dict(type='CauchyNoise', sigma=0), dict(type='VANILA')]
    cfg = digits_cfg(tmp_path, attacks=zero)
    cfg.load_from = str(work / f'epoch_{EPOCHS}.pth')
    runner = Runner.from_cfg(cfg)
    clean = runner.test()  # all 450 test digits, batches of 32
    hook = next(h for h in runner.hooks if isinstance(h, AdversarialEvalHook))
    names = ['FGSM_eps0', 'PGD-2_eps0', 'GN_std0', 'CauchyNoise_sigma0', 'VANILA']
    assert set(clean) == {'accuracy/top1', 'accuracy/top5'} and clean['accuracy/top1'] > 80
    assert hook.last_metrics == {f'adv/{n}/{k}': v for n in names for k, v in clean.items()}
    logged = json.loads(next(tmp_path.glob('*/*.json')).read_text())  # LoggerHook's test dump
    assert logged['adv/PGD-2_eps0/accuracy/top1'] == pytest.approx(clean['accuracy/top1'])


def test_pgd_below_fgsm_below_clean(trained):
    runner, _ = trained
    loop = runner.test_loop
    m = evaluate_attacks(runner.model, loop.dataloader, loop.evaluator, [
        dict(type='VANILA', name='clean'), dict(type='FGSM', eps=8),
        dict(type='PGD', eps=8, alpha=2, steps=10, random_start=True)], max_samples=160)
    clean, fgsm, pgd = (m[f'adv/{n}/accuracy/top1'] for n in ('clean', 'FGSM_eps8', 'PGD-10_eps8'))
    assert pgd <= fgsm < clean, m


def test_perturbation_within_eps_and_pixel_range(trained):
    runner, _ = trained
    batch = first_batch(runner.test_loop.dataloader, 16)
    raw = torch.stack(batch['inputs']).float()
    wrapper = AttackedModel(runner.model)
    for cfg in (dict(type='FGSM', eps=7.65), dict(type='PGD', eps=8, alpha=2, steps=5),
                dict(type='PGD', eps=0.5, alpha=0.25, steps=3), dict(type='CauchyNoise', sigma=40)):
        name, attack = build_attack(cfg, wrapper)
        adv = perturb(wrapper, attack, name, batch)
        assert isinstance(adv, list) and len(adv) == 16  # the batch's structure
        adv = torch.stack(adv)
        assert adv.min() >= 0 and adv.max() <= 255
        if 'eps' in cfg:  # the budget in raw pixel units, and attacks use it
            delta = (adv - raw).abs()
            assert delta.max() <= cfg['eps'] + 1e-4, name  # float32 rounding at 255 scale
            assert delta.max() >= cfg['eps'] * 0.99, name


def test_same_run_twice_and_random_starts_per_sample(trained):
    runner, _ = trained
    loop = runner.test_loop
    attacks = [dict(type='PGD', eps=8, alpha=2, steps=2, random_start=True),
               dict(type='CauchyNoise', sigma=40), dict(type='GN', std=30)]
    before = torch.random.get_rng_state()
    first = evaluate_attacks(runner.model, loop.dataloader, loop.evaluator, attacks, 96, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)  # the run's stream untouched
    assert first == evaluate_attacks(runner.model, loop.dataloader, loop.evaluator, attacks, 96,
                                     seed=3)

    # A sample's random start and noise depend on the sample and seed, not on its batch.
    batch = first_batch(loop.dataloader, 8)
    other = {k: [v[i] for i in (5, 2, 7)] for k, v in batch.items()}
    wrapper = AttackedModel(runner.model)
    for cfg in (dict(type='PGD', eps=8, steps=0), dict(type='CauchyNoise', sigma=40),
                dict(type='GN', std=30)):
        name, attack = build_attack(cfg, wrapper)
        full = torch.stack(perturb(wrapper, attack, name, batch, seed=3))
        part = torch.stack(perturb(wrapper, attack, name, other, seed=3))
        assert torch.equal(full[[5, 2, 7]], part), name
        assert not torch.equal(full, torch.stack(perturb(wrapper, attack, name, batch, seed=4)))
        assert not torch.equal(full, torch.stack(batch['inputs']).float()), name


def test_attacked_model_sees_raw_bgr_and_keeps_jsbn_eval_stats():
    cfg = Config.fromfile(str(DIGITS_JS))
    cfg.model.backbone.norm_cfg = dict(type='JSBN', eval_stats='batch')
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).eval()
    layers = [m for m in model.modules() if isinstance(m, JSBN2d)]
    assert layers and model.data_preprocessor._channel_conversion  # bgr_to_rgb
    stats = copy.deepcopy({k: v for k, v in model.state_dict().items() if 'running' in k
                           or 'num_batches' in k})
    raw = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)  # distinct channels
    from mmengine.structures import BaseDataElement
    samples = [BaseDataElement(gt_label=torch.tensor(i % 10)) for i in range(6)]
    wrapper = AttackedModel(model)
    wrapper.set_batch(samples, as_list=True)
    logits = wrapper(raw.float() / 255)
    direct = model(model.data_preprocessor(dict(inputs=list(raw)))['inputs'], mode='tensor')
    assert torch.equal(logits, direct)  # raw / 255 * 255 is exact: the model's own input
    # eval_stats='batch' in eval mode: a prediction depends on the rest of its batch.
    wrapper.set_batch(samples[:2], as_list=True)
    assert not torch.allclose(wrapper(raw[:2].float() / 255), logits[:2])

    name, attack = build_attack(dict(type='PGD', eps=8, alpha=2, steps=3), wrapper)
    adv = perturb(wrapper, attack, name, dict(inputs=list(raw), data_samples=samples))
    assert not any(m.training for m in model.modules())  # torchattacks' mode switches ignored
    assert all(m.eval_stats == 'batch' for m in layers)
    for k, v in model.state_dict().items():
        if k in stats:
            assert torch.equal(v, stats[k]), k  # no running statistics update under attack
    assert torch.stack(adv).sub(raw.float()).abs().max() <= 8 + 1e-4


# ----------------------------------------------------------------------- segmentation
@pytest.fixture(scope='module')
def seg(tmp_path_factory):
    """fcn_hr18 SyncJSBN (random weights) on three generated 64x128 Cityscapes images whose
    top 8 label rows are 255, tested with the hook (eps 0, FGSM, PGD)."""
    root = write_cityscapes(tmp_path_factory.mktemp('cityscapes'), splits=(('val', 3),),
                            size=(64, 128))
    cfg = Config.fromfile(str(SEG_CFG))
    pipeline = [dict(type='LoadImageFromFile'),
                dict(type='Resize', scale=(128, 64), keep_ratio=True),
                dict(type='LoadAnnotations'), dict(type='PackSegInputs')]
    cfg.test_dataloader = dict(
        batch_size=2, num_workers=0, sampler=dict(type='DefaultSampler', shuffle=False),
        dataset=dict(type='CityscapesDataset', data_root=str(root), pipeline=pipeline,
                     data_prefix=dict(img_path='leftImg8bit/val', seg_map_path='gtFine/val')))
    for key in ('train_dataloader', 'train_cfg', 'val_dataloader', 'val_cfg', 'val_evaluator',
                'optim_wrapper', 'param_scheduler'):
        cfg.pop(key, None)
    cfg.model.pretrained = None  # offline
    cfg.model.data_preprocessor.size = (64, 128)
    cfg.work_dir = str(root / 'work')
    cfg.custom_hooks = [dict(type='AdversarialEvalHook', attacks=[
        dict(type='FGSM', eps=0, name='zero'), dict(type='FGSM', eps=8),
        dict(type='PGD', eps=8, alpha=2, steps=2)])]
    runner = Runner.from_cfg(cfg)
    clean = runner.test()
    return runner, clean


def test_seg_eps_zero_equals_clean_and_attacks_evaluate(seg):
    runner, clean = seg
    adv = next(h for h in runner.hooks if isinstance(h, AdversarialEvalHook)).last_metrics
    assert {'aAcc', 'mIoU', 'mAcc'} <= clean.keys()
    for k, v in clean.items():
        assert adv[f'adv/zero/{k}'] == v
        assert np.isfinite(adv[f'adv/FGSM_eps8/{k}']) and np.isfinite(adv[f'adv/PGD-2_eps8/{k}'])


def test_seg_logits_at_label_size_and_ignore_out_of_loss(seg):
    runner, _ = seg
    model = runner.model
    batch = first_batch(runner.test_loop.dataloader)
    gt = torch.stack([s.gt_sem_seg.data[0] for s in batch['data_samples']])
    wrapper = AttackedModel(model)
    wrapper.set_batch(batch['data_samples'], as_list=True)
    x = torch.stack(batch['inputs']).float().div(255).requires_grad_()
    logits = wrapper(x)
    assert logits.shape == (2, 19, 64, 128) and gt.shape == (2, 64, 128)
    quarter = model(model.data_preprocessor(copy.deepcopy(batch))['inputs'], mode='tensor')
    assert quarter.shape[-2:] == (16, 32)  # why the attacked function resizes

    labels = attack_labels(model, batch['data_samples'], 'cpu')
    valid = gt != 255
    assert torch.equal(labels == -100, ~valid) and torch.equal(labels[valid], gt[valid].long())
    logits.retain_grad()
    nn.CrossEntropyLoss()(logits, labels).backward()  # torchattacks' loss
    ignored = (gt == 255)[:, None].expand_as(logits)
    assert logits.grad[ignored].abs().max() == 0 and logits.grad[~ignored].abs().max() > 0
    assert x.grad.abs().max() > 0

    # A batch with nothing but ignored pixels is left as it is (no 0/0 loss, no NaN).
    name, attack = build_attack(dict(type='FGSM', eps=8), wrapper)
    adv = perturb(wrapper, attack, name, batch, labels=torch.full_like(labels, -100))
    assert torch.equal(torch.stack(adv), torch.stack(batch['inputs']).float())


class _LabelsSeen(BaseMetric):
    """Counts the ignore-label pixels of the ground truth the evaluator receives."""
    default_prefix = 'seen'

    def process(self, data_batch, data_samples):
        for s in data_samples:
            gt, pred = s['gt_sem_seg']['data'], s['pred_sem_seg']['data']
            self.results.append(((gt == 255).sum().item(), float(gt.shape == pred.shape)))

    def compute_metrics(self, results):
        return dict(ignored=sum(r[0] for r in results), same_shape=min(r[1] for r in results))


def test_seg_evaluator_sees_unchanged_labels(seg):
    runner, _ = seg
    loop = runner.test_loop
    evaluator = Evaluator([copy.deepcopy(loop.evaluator.metrics[0]), _LabelsSeen()])
    evaluator.dataset_meta = loop.dataloader.dataset.metainfo
    m = evaluate_attacks(runner.model, loop.dataloader, evaluator, [dict(type='FGSM', eps=8)])
    assert m['adv/FGSM_eps8/seen/ignored'] == 3 * 8 * 128  # 255 kept: IoUMetric skips them
    assert m['adv/FGSM_eps8/seen/same_shape'] == 1.0
    assert np.isfinite(m['adv/FGSM_eps8/mIoU'])


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize('config', ['cls/resnet9_cifar10_paper_syncjsbn.py',
                                    'cls/resnet9_cifar10_paper_syncbn.py',
                                    'seg/fcn_hr18_4xb2-40k_cityscapes-512x1024_syncjsbn-albu.py',
                                    'seg/fcn_hr48_4xb2-80k_cityscapes-512x1024_syncbn.py'])
def test_paper_configs_have_the_paper_attacks(config):
    hooks = Config.fromfile(str(ROOT / 'configs' / config)).custom_hooks
    cfg = next(h for h in hooks if h['type'] == 'AdversarialEvalHook')
    hook = HOOKS.build(copy.deepcopy(cfg))
    assert hook.names == ['FGSM_eps7.65', 'PGD-5_eps7.65']
    wrapper = AttackedModel(nn.Conv2d(3, 2, 1))
    fgsm, pgd = (build_attack(a, wrapper)[1] for a in hook.attacks)
    assert fgsm.eps == pytest.approx(0.03) and pgd.eps == pytest.approx(0.03)
    assert (pgd.alpha, pgd.steps, pgd.random_start) == (1 / 255, 5, True)


def test_bad_configs_fail_clearly(trained, tmp_path):
    with pytest.raises(ValueError, match='unknown attack type'):
        check_attacks([dict(type='FGSMM', eps=8)])
    with pytest.raises(ValueError, match='eps must be a number >= 0'):
        check_attacks([dict(type='FGSM', eps=-1)])
    with pytest.raises(ValueError, match='unique'):
        check_attacks([dict(type='FGSM', eps=8), dict(type='FGSM', eps=8)])
    with pytest.raises(ValueError, match='list of dicts'):
        AdversarialEvalHook(attacks=dict(type='FGSM', eps=8))
    with pytest.raises(ValueError, match='interval'):
        AdversarialEvalHook(attacks=[dict(type='FGSM')], interval=0)
    with pytest.raises(ValueError, match='attack'):
        build_attack(dict(type='FGSM', eps=8, steps=3), AttackedModel(nn.Conv2d(3, 2, 1)))
    runner, _ = trained
    batch = first_batch(runner.test_loop.dataloader, 2)
    wrapper = AttackedModel(runner.model)
    name, attack = build_attack(dict(type='FGSM', eps=8), wrapper)
    with pytest.raises(ValueError, match='0-255'):
        perturb(wrapper, attack, name, dict(batch, inputs=[x.float() * 2 for x in batch['inputs']]))

    for hook, best in ((dict(attacks=[dict(type='FGSM', eps=8)]), 'adv/PGD-3_eps8/accuracy/top1'),
                       (dict(attacks=[PGD_TRAIN], interval=2), 'adv/PGD-3_eps8/accuracy/top1')):
        cfg = digits_cfg(tmp_path / str(len(hook)), **hook)
        cfg.default_hooks.checkpoint.save_best = best
        with pytest.raises(ValueError, match='save_best'):
            Runner.from_cfg(cfg).train()


# ------------------------------------------------------------------------------- tools
def test_adv_test_sweep_two_checkpoints_and_two_processes(trained, tmp_path):
    _, work = trained
    args = [work / 'epoch_1.pth', work / f'epoch_{EPOCHS}.pth',
            '--ckpt-configs', DIGITS_BN, DIGITS_JS, '--labels', 'BN-epoch1', 'BN-final-in-JSBN',
            '--max-samples', 37, '--pgd-steps', 3, '--noise', 'cauchy', '--sigmas', 0, 40,
            '--cfg-options', 'test_dataloader.batch_size=8']
    single, double = tmp_path / 'single', tmp_path / 'double'
    out = run([sys.executable, 'tools/adv_test.py', DIGITS_BN, *args, '--work-dir', single])
    assert 'wrote' in out
    run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', 2,
         '--master_port', free_port(), 'tools/adv_test.py', DIGITS_BN, *args,
         '--work-dir', double, '--launcher', 'pytorch'])

    table = json.loads((single / 'adv_sweep.json').read_text())
    assert (single / 'adv_sweep.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert table['metric'] == 'accuracy/top1'
    assert table['x'] == {'FGSM': [0, 1, 2, 4, 8], 'PGD': [0, 1, 2, 4, 8], 'CauchyNoise': [0, 40]}
    assert list(table['checkpoints']) == ['BN-epoch1', 'BN-final-in-JSBN']
    for result in table['checkpoints'].values():
        curves = result['curves']
        assert curves['FGSM'][0] == curves['PGD'][0] == result['metrics']['clean/accuracy/top1']
        assert curves['PGD'][-1] < curves['PGD'][0]
    assert json.loads((double / 'adv_sweep.json').read_text())['checkpoints'] == \
        table['checkpoints']  # 2 ranks, uneven shards: the same numbers


def test_benchmark_runs_on_cpu_at_tiny_size(tmp_path):
    out = tmp_path / 'bench.json'
    run([sys.executable, 'tools/benchmark_adv.py', '--size', 32, 64, '--batch', 1, '--steps', 2,
         '--iters', 1, '--warmup', 0, '--out', out])
    result = json.loads(out.read_text())
    assert set(result['ms_per_batch']) == {'clean', 'forward_backward', 'fgsm', 'pgd'}
    assert result['device'] == 'cpu' and result['pgd_over_k_plus_1_fb'] > 0
