"""mmpretrain 1.2.0's own configs with robustbn's layers (the ``mmpretrain`` extra), on CPU.

- Registries: under mmpretrain's scope its ImageClassifier, CIFAR10 and Accuracy are found
  (not robustbn's root ones of the same names), and robustbn's norm layers, hooks and
  loops through the root registry.
- mmpretrain's ResNet (CIFAR and ImageNet variants), MobileNetV2 and RegNet model configs
  build with ``norm_cfg=dict(type='SyncJSBN')`` (same parameter and buffer names as BN,
  a training step with finite loss and gradients), and their BN builds convert to GpreBN
  with ``convert_norm`` (an unadapted GpreBN model in training mode computes the BN
  model's eval-mode logits).
- ``--cfg-options model.backbone.norm_cfg.type=SyncJSBN`` on an mmpretrain config file goes
  through the tools' config loading (a misspelt type is caught there, in mmpretrain's scope).
- ``mmpretrain::resnet/resnet18_8xb16_cifar10.py`` with the one-line norm override trains
  through tools/dist_train.sh on 2 gloo processes on synthesized CIFAR-10 python batches:
  finite losses, a validation, ShrinkageMonitorHook's factors and BufferConsistencyHook's
  checks every iteration, every rank ends with the same weights and SyncJSBN
  statistics. mmpretrain's CIFAR10 checks the official files' md5 sums, which
  synthesized files cannot match: the runs use ``UncheckedCIFAR10``
  (tests/openmmlab/mmpretrain_components.py), mmpretrain's class without the sums.
- On that checkpoint: AdversarialEvalHook (labels from mmpretrain's DataSample.gt_label,
  eps 0 gives exactly the clean metrics, PGD raises the loss on the true labels) and
  TestTimeAdaptLoop (``source`` is mmpretrain's plain test, ``gprebn`` and ``tent``
  adapt a copy through the classifier's head logits, the runner's model stays as loaded).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

pytest.importorskip('mmpretrain', reason="the 'mmpretrain' extra is not installed")

import mmpretrain_components  # noqa: E402,F401  (UncheckedCIFAR10)
from helpers import (  # noqa: E402
    assert_state_equal,
    free_port,
    load_tool,
    rank_states,
    run,
    tool_env,
)
from mmengine.config import Config  # noqa: E402
from mmengine.registry import DATASETS, HOOKS, LOOPS, METRICS, MODELS, DefaultScope  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from mmpretrain.structures import DataSample  # noqa: E402
from mmpretrain.utils import register_all_modules  # noqa: E402

import robustbn  # noqa: E402  (registers everything)
from robustbn import GpreBN2d, SyncJSBN  # noqa: E402
from robustbn.gprebn import GpreBatchNorm  # noqa: E402
from robustbn.openmmlab import tta  # noqa: E402  (not its Test* class: pytest would collect it)

register_all_modules(init_default_scope=False)

CONFIGS = Path(importlib.util.find_spec('mmpretrain').origin).parent / '.mim' / 'configs'
N_CIFAR = 8       # images per synthesized batch file (5 training files, 1 test file)
BATCH = 5         # per process: 40 training images / (2 x 5) = 4 iterations in one epoch
ITERS = 4
SYNC_LAYERS = 20  # norm layers of mmpretrain's CIFAR ResNet-18
# mmpretrain's model configs (configs/_base_/models/) and their expected norm-layer count
MODEL_CONFIGS = {'resnet18_cifar.py': 20, 'resnet18.py': 20, 'resnet50.py': 53,
                 'mobilenet_v2_1x.py': 52, 'regnet/regnetx_400mf.py': 71}

CHILD = """
_base_ = 'mmpretrain::resnet/resnet18_8xb16_cifar10.py'
custom_imports = dict(imports=['robustbn', 'toy_components', 'mmpretrain_components'],
                      allow_failed_imports=False)
model = dict(backbone=dict(norm_cfg=dict(type='SyncJSBN', requires_grad=True)))
data = dict(type='UncheckedCIFAR10', data_root='{data}', download=False)
loader = dict(batch_size={batch}, num_workers=0, persistent_workers=False)
train_dataloader = dict(**loader, dataset=data)
val_dataloader = dict(**loader, dataset=data)
test_dataloader = val_dataloader
train_cfg = dict(max_epochs=1)
default_hooks = dict(logger=dict(interval=1))
custom_hooks = [dict(type='DumpStateHook'), dict(type='ShrinkageMonitorHook', interval=1),
                dict(type='BufferConsistencyHook', interval=1)]
randomness = dict(seed=0)
"""


@pytest.fixture(autouse=True)
def mmpretrain_scope():
    """mmpretrain's registries first, as its configs' ``default_scope``; the scopes as they
    were afterwards (a Runner's scope would otherwise stay current for later tests, whose
    root-registry builds would then find mmpretrain's ImageClassifier)."""
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        yield


# ----------------------------------------------------------------------------- data
def write_cifar(root: Path) -> dict:
    """CIFAR-10's python batches (data_batch_1..5, test_batch, batches.meta) with N_CIFAR
    random images each; returns {file name: (images (N, 3, 32, 32) RGB, labels)}."""
    folder = root / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        imgs = rng.integers(0, 256, (N_CIFAR, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, N_CIFAR).tolist()
        batch = {'batch_label': name, 'labels': labels, 'data': imgs.reshape(N_CIFAR, -1),
                 'filenames': [f'{name}_{i}.png' for i in range(N_CIFAR)]}
        with open(folder / name, 'wb') as f:
            pickle.dump(batch, f)
        written[name] = (imgs, labels)
    meta = {'label_names': ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog',
                            'horse', 'ship', 'truck'], 'num_cases_per_batch': N_CIFAR,
            'num_vis': 3072}
    with open(folder / 'batches.meta', 'wb') as f:
        pickle.dump(meta, f)
    return written


@pytest.fixture(scope='module')
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp('cifar10')
    return root, write_cifar(root)


# ----------------------------------------------------------------------------- helpers
def norm_layers(model):
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def build(name: str, norm_cfg=None):
    cfg = Config.fromfile(str(CONFIGS / '_base_' / 'models' / name))
    if norm_cfg is not None:
        cfg.model.backbone.norm_cfg = norm_cfg
    return MODELS.build(cfg.model)


def labelled(n: int, num_classes: int):
    return [DataSample().set_gt_label(i % num_classes) for i in range(n)]


# ----------------------------------------------------------------------------- registries
def test_mmpretrain_scope_finds_its_classes_and_robustbn_layers():
    import mmpretrain.datasets
    import mmpretrain.evaluation
    import mmpretrain.models

    from robustbn.openmmlab.adversarial import AdversarialEvalHook
    from robustbn.openmmlab.hooks import ShrinkageMonitorHook

    with MODELS.switch_scope_and_registry(None) as models:
        assert models.scope == 'mmpretrain'
        assert models.get('ImageClassifier') is mmpretrain.models.ImageClassifier
        assert models.get('SyncJSBN') is SyncJSBN and models.get('GpreBN') is GpreBN2d
    with DATASETS.switch_scope_and_registry(None) as datasets:
        assert datasets.get('CIFAR10') is mmpretrain.datasets.CIFAR10
    with METRICS.switch_scope_and_registry(None) as metrics:
        assert metrics.get('Accuracy') is mmpretrain.evaluation.Accuracy
    with HOOKS.switch_scope_and_registry(None) as hooks:
        assert hooks.get('AdversarialEvalHook') is AdversarialEvalHook
        assert hooks.get('ShrinkageMonitorHook') is ShrinkageMonitorHook
    with LOOPS.switch_scope_and_registry(None) as loops:
        assert loops.get('TestTimeAdaptLoop') is tta.TestTimeAdaptLoop
    # robustbn's own classifier of the same name is what a scope without mmpretrain finds
    with DefaultScope.overwrite_default_scope('mmengine'), \
            MODELS.switch_scope_and_registry(None) as models:
        assert models.get('ImageClassifier').__module__.startswith('robustbn.')


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize('name', sorted(MODEL_CONFIGS))
def test_model_config_builds_with_syncjsbn_and_converts_to_gprebn(name):
    torch.manual_seed(0)
    size = 32
    bn = build(name)
    js = build(name, dict(type='SyncJSBN', requires_grad=True))
    assert {type(m) for m in norm_layers(bn)} == {torch.nn.BatchNorm2d}
    assert {type(m) for m in norm_layers(js)} == {SyncJSBN}
    assert len(norm_layers(js)) == len(norm_layers(bn)) == MODEL_CONFIGS[name]
    # BN's parameter and buffer names: BN checkpoints load, and the other way round
    assert js.state_dict().keys() == bn.state_dict().keys()
    js.load_state_dict(bn.state_dict())

    # one training step (a single process: SyncJSBN without a process group)
    num_classes = js.head.num_classes
    x = torch.randn(4, 3, size, size)
    js.train()
    losses = js(x, labelled(4, num_classes), mode='loss')
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    for m in norm_layers(js):
        assert m.weight.requires_grad and torch.isfinite(m.weight.grad).all()
        assert int(m.num_batches_tracked) == 1

    # GpreBN from the built BN model: an unadapted GpreBN whose test-time average starts at
    # the source statistics normalizes with them, so in training mode (test-time
    # adaptation) it gives BN's eval logits.
    with torch.no_grad():
        bn.train()(torch.randn(8, 3, size, size), mode='tensor')  # source statistics
        ref = bn.eval()(x, mode='tensor')
        before = {k: v.clone() for k, v in bn.state_dict().items()}
        robustbn.convert_norm(bn, 'GpreBN', target_init='source')
        assert {type(m) for m in norm_layers(bn)} == {GpreBN2d}
        state = bn.state_dict()
        assert before.keys() <= state.keys()
        assert_state_equal(before, {k: state[k] for k in before})
        out = bn.train()(x, mode='tensor')
    assert out.shape == (4, num_classes)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_cfg_options_override_through_the_tools_config_loading():
    """`tools/train.py MMPRETRAIN_CONFIG --cfg-options model.backbone.norm_cfg.type=SyncJSBN`:
    the tools' load_config merges the option and checks the type in mmpretrain's scope."""
    run_common = load_tool('run_common')
    config = str(CONFIGS / 'resnet' / 'resnet18_8xb16_cifar10.py')

    def load(norm):
        args = argparse.Namespace(launcher='none', work_dir=None,
                                  cfg_options={'model.backbone.norm_cfg.type': norm})
        return run_common.load_config(config, args)

    cfg = load('SyncJSBN')
    assert cfg.default_scope == 'mmpretrain'
    assert {type(m) for m in norm_layers(MODELS.build(cfg.model))} == {SyncJSBN}
    with pytest.raises(ValueError, match="did you mean 'SyncJSBN'"):
        load('SyncJSbn')


# ----------------------------------------------------------------------------- data set
def test_cifar10_reads_synthesized_batches_without_checksums(cifar):
    root, written = cifar
    # mmpretrain's CIFAR10 compares the files with the official release's md5 sums
    with pytest.raises(RuntimeError, match='Cannot find CIFAR10'):
        DATASETS.build(dict(type='CIFAR10', data_root=str(root), split='test', download=False))
    pipeline = [dict(type='PackInputs')]
    test = DATASETS.build(dict(type='UncheckedCIFAR10', data_root=str(root), split='test',
                               download=False, pipeline=pipeline))
    train = DATASETS.build(dict(type='UncheckedCIFAR10', data_root=str(root), split='train',
                                download=False, pipeline=pipeline))
    assert (len(train), len(test)) == (5 * N_CIFAR, N_CIFAR)
    imgs, labels = written['test_batch']
    for i in (0, N_CIFAR - 1):
        sample = test[i]
        assert torch.equal(sample['inputs'], torch.from_numpy(imgs[i]))  # RGB, as stored
        assert int(sample['data_samples'].gt_label) == labels[i]
    imgs, labels = written['data_batch_2']
    assert torch.equal(train[N_CIFAR]['inputs'], torch.from_numpy(imgs[0]))
    assert test.metainfo['classes'][0] == 'airplane'


# ----------------------------------------------------------------- training, 2 processes
@pytest.fixture(scope='module')
def trained(tmp_path_factory, cifar):
    """mmpretrain's CIFAR ResNet-18 config with SyncJSBN, one epoch (ITERS iterations) on
    2 gloo processes through tools/dist_train.sh: (config, work dir)."""
    d = tmp_path_factory.mktemp('mmpretrain_train')
    cfg = d / 'resnet18_8xb16_cifar10_syncjsbn.py'
    cfg.write_text(CHILD.format(data=cifar[0], batch=BATCH))
    work = d / 'work'
    run(['bash', 'tools/dist_train.sh', cfg, 2, '--work-dir', work], tool_env(PORT=free_port()))
    return cfg, work


def test_cifar_resnet18_trains_on_two_processes_with_equal_statistics(trained):
    cfg, work = trained
    states = rank_states(work, 2)
    assert sorted(s['rank'] for s in states) == [0, 1]
    for s in states:
        assert (s['world_size'], s['backend'], s['wrapper'], s['iter']) == \
            (2, 'gloo', 'MMDistributedDataParallel', ITERS)
    # DDP's weights and SyncJSBN's running statistics: the same on every rank
    assert_state_equal(states[0]['state_dict'], states[1]['state_dict'])
    state = states[0]['state_dict']
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    tracked = [k[:-len('num_batches_tracked')] for k in state if k.endswith('num_batches_tracked')]
    assert len(tracked) == SYNC_LAYERS
    assert all(int(state[p + 'num_batches_tracked']) == ITERS for p in tracked)
    assert all(state[p + 'running_mean'].abs().sum() > 0 for p in tracked)

    # The layers were SyncJSBN: the run's dumped config builds them, and the state loads.
    dumped = Config.fromfile(str(work / cfg.name))
    model = MODELS.build(dumped.model)
    assert {type(m) for m in norm_layers(model)} == {SyncJSBN}
    model.load_state_dict(state)
    assert (work / 'epoch_1.pth').is_file()

    lines = next(work.glob('*/vis_data/scalars.json')).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    losses = [r['loss'] for r in records if 'loss' in r]
    assert len(losses) == ITERS and all(math.isfinite(v) for v in losses)
    shrinkage = [r['shrinkage/mean_factor'] for r in records if 'shrinkage/mean_factor' in r]
    assert len(shrinkage) == ITERS and all(0 <= v <= 1 for v in shrinkage)
    val = [r for r in records if 'accuracy/top1' in r]
    assert len(val) == 1 and 0 <= val[0]['accuracy/top1'] <= 100


# ------------------------------------------------------- hooks and loops on the checkpoint
def runner_cfg(trained, tmp_path, name: str) -> Config:
    cfg_path, work = trained
    cfg = Config.fromfile(str(cfg_path))
    cfg.work_dir = str(tmp_path / name)
    cfg.experiment_name = f'mmpretrain_{name}_{tmp_path.name}'  # one MessageHub per runner
    cfg.load_from = str(work / 'epoch_1.pth')
    cfg.launcher = 'none'
    cfg.custom_hooks = []
    cfg.test_dataloader.batch_size = 4
    cfg.log_level = 'WARNING'
    return cfg


def checkpoint_state(trained) -> dict:
    return torch.load(trained[1] / 'epoch_1.pth', map_location='cpu')['state_dict']


def test_adversarial_eval_hook_with_mmpretrain_classifier(trained, tmp_path, cifar):
    pytest.importorskip('torchattacks')
    from robustbn.openmmlab.adversarial import AdversarialEvalHook
    from robustbn.openmmlab.adversarial.attacks import (
        AttackedModel,
        attack_labels,
        build_attack,
        perturb,
    )

    cfg = runner_cfg(trained, tmp_path, 'adv')
    cfg.custom_hooks = [dict(type='AdversarialEvalHook', attacks=[
        dict(type='FGSM', eps=0), dict(type='PGD', eps=8, alpha=4, steps=2)])]
    runner = Runner.from_cfg(cfg)
    clean = runner.test()
    hook = next(h for h in runner.hooks if isinstance(h, AdversarialEvalHook))
    assert set(clean) == {'accuracy/top1'}
    assert hook.last_metrics['adv/FGSM_eps0/accuracy/top1'] == clean['accuracy/top1']
    assert 0 <= hook.last_metrics['adv/PGD-2_eps8/accuracy/top1'] <= 100
    logged = json.loads(next((tmp_path / 'adv').glob('*/*.json')).read_text())
    assert 'adv/PGD-2_eps8/accuracy/top1' in logged

    # The attack's labels are mmpretrain's DataSample.gt_label, and PGD raises the
    # classifier's loss on them within the budget.
    batch = next(iter(runner.test_dataloader))
    labels = attack_labels(runner.model, batch['data_samples'], torch.device('cpu'))
    assert labels.tolist() == cifar[1]['test_batch'][1][:4]
    wrapper = AttackedModel(runner.model)
    name, attack = build_attack(dict(type='PGD', eps=8, alpha=2, steps=5), wrapper)
    adv = torch.stack(perturb(wrapper, attack, name, batch))
    raw = torch.stack(batch['inputs']).float()
    assert (adv - raw).abs().max() <= 8 + 1e-4 and adv.min() >= 0 and adv.max() <= 255
    with torch.no_grad():
        def loss(images):
            return F.cross_entropy(wrapper(images / 255), labels)
        assert loss(adv) > loss(raw)


def test_test_time_adapt_loop_with_mmpretrain_classifier(trained, tmp_path):
    loaded = checkpoint_state(trained)
    plain = Runner.from_cfg(runner_cfg(trained, tmp_path, 'plain')).test()

    cfg = runner_cfg(trained, tmp_path, 'source')
    cfg.test_cfg = dict(type='TestTimeAdaptLoop', method='source')
    assert Runner.from_cfg(cfg).test() == plain

    for method in ('gprebn', 'tent'):
        cfg = runner_cfg(trained, tmp_path, method)
        cfg.test_cfg = dict(type='TestTimeAdaptLoop', method=method, steps=1,
                            optimizer=dict(type='SGD', lr=0.05))
        runner = Runner.from_cfg(cfg)
        metrics = runner.test()
        assert set(metrics) == {'accuracy/top1', 'tta/entropy'}, method
        assert 0 <= metrics['accuracy/top1'] <= 100
        assert 0 < metrics['tta/entropy'] <= math.log(10) + 1e-6
        # the runner's model is the checkpoint's; the loop adapted a copy
        assert_state_equal(loaded, runner.model.state_dict())
        adapted = runner.test_loop.adapted_model
        layers = norm_layers(adapted)
        if method == 'gprebn':
            assert len(layers) == SYNC_LAYERS
            assert all(isinstance(m, GpreBatchNorm) for m in layers)
        prefixes = [k[:-len('running_mean')] for k in loaded if k.endswith('running_mean')]
        state = adapted.state_dict()
        assert any(not torch.equal(state[p + 'weight'], loaded[p + 'weight'])
                   for p in prefixes), method
        # only norm affine parameters change
        convs = [k for k in loaded if k.endswith('conv1.weight') or k.startswith('head.')]
        assert_state_equal({k: loaded[k] for k in convs}, {k: state[k] for k in convs})
