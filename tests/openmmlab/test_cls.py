"""The classification stack: every config under configs/cls builds its model and (on small
synthesized data written to a temporary folder: CIFAR python batches, PNG class folders,
.npy volumes) its datasets; short mmengine Runner trainings of each model family; exact
resume; the accuracy metric; torchvision ResNet-50 weights in the SyncJSBN backbone; the
digits dataset; predictions. CPU only.
"""
import math
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

pytest.importorskip('mmcv._ext', reason='CifarResNet builds on mmseg.models (compiled mmcv)')

import torchvision  # noqa: E402
from helpers import ROOT  # noqa: E402
from mmengine import Config  # noqa: E402
from mmengine.evaluator import Evaluator  # noqa: E402
from mmengine.registry import DATASETS, MODELS, TRANSFORMS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from mmengine.structures import BaseDataElement  # noqa: E402

import robustbn  # noqa: E402,F401  (registers everything)
from robustbn import JSBN2d, JSBN3d, SyncJSBN  # noqa: E402

CONFIG_DIR = ROOT / 'configs' / 'cls'
CONFIGS = sorted(p.name for p in CONFIG_DIR.glob('*.py'))
# The norm layer class each config's file name promises.
NORM_BY_SUFFIX = {'syncjsbn': SyncJSBN, 'syncbn': nn.SyncBatchNorm, 'jsbn': JSBN2d,
                  'bn': nn.BatchNorm2d, 'jsbn3d': JSBN3d, 'bn3d': nn.BatchNorm3d}
N_CIFAR = 8       # images per fake CIFAR batch file (5 training files, 1 test file)
VOL = (8, 8, 8)   # synthesized volume shape
SMALL = 32        # image side used for the ImageNet pipeline in tests


# --------------------------------------------------------------------------- data
def write_cifar(root: Path):
    """CIFAR-10 python batches; image i has value i in pixel (0, 0) of its red channel and
    255 - i in its blue channel, so the index and channel order can be read back."""
    folder = root / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
    for b, name in enumerate(names):
        imgs = rng.integers(0, 256, (N_CIFAR, 3, 32, 32), dtype=np.uint8)
        index = np.arange(b * N_CIFAR, (b + 1) * N_CIFAR)
        imgs[:, 0, 0, 0] = index
        imgs[:, 2, 0, 0] = 255 - index
        batch = {'data': imgs.reshape(N_CIFAR, -1), 'labels': [int(i % 10) for i in index]}
        with open(folder / name, 'wb') as f:
            pickle.dump(batch, f)


def write_image_folder(root: Path):
    rng = np.random.default_rng(1)
    for split in ('train', 'val'):
        for cls in ('cat', 'dog'):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(4):
                h, w = rng.integers(36, 48, 2)
                cv2.imwrite(str(d / f'{i}.png'), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        (root / split / 'cat' / 'notes.txt').write_text('not an image')


def write_volumes(root: Path):
    (root / 'volumes').mkdir(parents=True)
    rng = np.random.default_rng(2)
    for split, n in (('train', 8), ('test', 4)):
        rows = ['filename,label']
        for i in range(n):
            name = f'{split}_{i}.npy'
            np.save(root / 'volumes' / name, rng.normal(size=VOL).astype(np.float32))
            rows.append(f'{name},{i % 2}')
        (root / f'{split}.csv').write_text('\n'.join(rows) + '\n')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    write_cifar(root / 'cifar10')
    write_image_folder(root / 'imagenet')
    write_volumes(root / 'volumes')
    return root


def loaders(cfg):
    return [cfg[k] for k in ('train_dataloader', 'val_dataloader', 'test_dataloader') if k in cfg]


def point_to_data(cfg, data: Path):
    """Point the config's datasets at the synthesized data (digits are bundled)."""
    for loader in loaders(cfg):
        ds = loader.dataset
        if ds.type == 'CIFAR10':
            ds.data_root = str(data / 'cifar10')
            if ds.get('val_size'):
                ds.val_size = 2 * N_CIFAR
        elif ds.type == 'ImageFolder':
            ds.data_root = str(data / 'imagenet')
            for t in ds.pipeline:  # small crops keep ResNet-50 fast
                for a in t.get('transforms', []):
                    if a.type == 'RandomResizedCrop':
                        a.size = (SMALL, SMALL)
                    elif a.type == 'SmallestMaxSize':
                        a.max_size = SMALL + 4
                    elif a.type == 'CenterCrop':
                        a.height = a.width = SMALL
        elif ds.type == 'VolumeDataset':
            ds.data_root = str(data / 'volumes')
        elif ds.type == 'DigitsDataset':
            ds.indices = 16
        else:
            raise AssertionError(f'no test data for {ds.type}')
        loader.batch_size = 4
        loader.num_workers = 0
        loader.persistent_workers = False
    return cfg


def load_cfg(name, data):
    return point_to_data(Config.fromfile(str(CONFIG_DIR / name)), data)


def expected_norm(name):
    # '<model>_<data>_<norm>[-ds-zeroK]': the DeepSpeed variants keep their parent's norm.
    return NORM_BY_SUFFIX[Path(name).stem.split('-ds-')[0].rsplit('_', 1)[1]]


def batch_of(dataset, n):
    items = [dataset[i] for i in range(n)]
    return dict(inputs=[d['inputs'] for d in items],
                data_samples=[d['data_samples'] for d in items])


# --------------------------------------------------------------------------- configs
def test_config_list():
    assert len(CONFIGS) >= 10, CONFIGS


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds(name, data):
    cfg = load_cfg(name, data)
    assert cfg.custom_imports == dict(imports=['robustbn'], allow_failed_imports=False)
    assert cfg.default_scope == 'mmengine'
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert norms and all(isinstance(m, expected_norm(name)) for m in norms), name
    assert not any(isinstance(m, SyncJSBN) for m in norms) or expected_norm(name) is SyncJSBN
    if expected_norm(name) is SyncJSBN and 'paper' in name:
        assert {(m.estimator, m.eval_stats) for m in norms} == {('paper', 'running')}

    for loader in loaders(cfg):
        ds = DATASETS.build(loader.dataset)
        assert len(ds) > 0
    train_set = DATASETS.build(cfg.train_dataloader.dataset)
    batch = model.data_preprocessor(batch_of(train_set, 4), training=True)
    x = batch['inputs']
    assert x.dtype == torch.float32 and x.shape[0] == 4
    assert x.dim() == (5 if 'volumes' in name else 4)
    model.train()
    loss = model(**batch, mode='loss')['loss']
    assert torch.isfinite(loss)
    assert model(x, mode='tensor').shape == (4, cfg.model.head.num_classes)


def test_norm_type_is_one_override(data):
    cfg = load_cfg('resnet18_cifar10_syncjsbn.py', data)
    cfg.merge_from_dict({'model.backbone.norm_cfg.type': 'JSBN'})
    model = MODELS.build(cfg.model)
    assert {type(m) for m in model.modules() if isinstance(m, _BatchNorm)} == {JSBN2d}


# --------------------------------------------------------------------------- training
def runner_cfg(name, data, work_dir, **train_cfg):
    cfg = load_cfg(name, data)
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = f'{Path(name).stem}_{work_dir.name}'  # unique MessageHub name
    cfg.default_hooks.logger.interval = 1
    cfg.env_cfg.cudnn_benchmark = False
    cfg.train_cfg.update(train_cfg)
    return cfg


@pytest.mark.parametrize('name', [
    'resnet18_cifar10_syncjsbn.py', 'resnet50_imagenet_jsbn.py', 'cnn3d_volumes_jsbn3d.py',
    'resnet9_digits_syncjsbn.py'])
def test_short_train(name, data, tmp_path):
    cfg = runner_cfg(name, data, tmp_path, max_epochs=1, val_interval=1)
    if 'resnet18' in name:  # narrower, and 8 of the 40 fake CIFAR images
        cfg.model.backbone.update(stem_channels=16, base_channels=16)
        cfg.model.head.in_channels = 128
        cfg.train_dataloader.dataset.indices = 8
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter > 0
    assert math.isfinite(runner.message_hub.get_scalar('train/loss').current())
    metrics = runner.val()
    topk = cfg.val_evaluator.topk
    assert set(metrics) == {f'accuracy/top{k}' for k in topk}
    assert all(0 <= v <= 100 for v in metrics.values())


def test_resume_matches_uninterrupted_run(data, tmp_path):
    """The paper ResNet9 config (narrowed): 2 epochs in one go == 1 epoch, then resume to 2."""
    name = 'resnet9_cifar10_paper_syncjsbn.py'

    def run(work_dir, epochs, resume_from=None):
        cfg = runner_cfg(name, data, work_dir, max_epochs=epochs)
        cfg.model.backbone.update(stem_channels=8, base_channels=8)
        cfg.model.head.in_channels = 64
        cfg.train_dataloader.batch_size = 8
        cfg.optim_wrapper.optimizer.lr = 0.05
        if resume_from:
            cfg.resume, cfg.load_from = True, str(resume_from)
        runner = Runner.from_cfg(cfg)
        runner.train()
        return runner

    full = run(tmp_path / 'full', 2)
    run(tmp_path / 'half', 1)
    resumed = run(tmp_path / 'resumed', 2, resume_from=tmp_path / 'half' / 'epoch_1.pth')

    assert full.iter == resumed.iter == 2 * 24 // 8  # 24 training images, batch 8
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
    # The paper keeps the best validation epoch: CheckpointHook's save_best.
    assert list((tmp_path / 'full').glob('best_accuracy_top1_epoch_*.pth'))
    metrics = full.test()
    assert set(metrics) == {'accuracy/top1', 'accuracy/top5'}


# --------------------------------------------------------------------------- metric
def test_accuracy_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(13, 7, generator=g).softmax(1)
    labels = torch.randint(0, 7, (13, ), generator=g)
    evaluator = Evaluator(dict(type='Accuracy', topk=(1, 5)))
    evaluator.process([BaseDataElement(pred_score=s, gt_label=y) for s, y in zip(scores, labels)])
    got = evaluator.evaluate(13)

    def hand(k):
        hits = 0
        for s, y in zip(scores.tolist(), labels.tolist()):
            ranked = sorted(range(7), key=lambda c: -s[c])
            hits += y in ranked[:k]
        return 100.0 * hits / 13

    assert got.keys() == {'accuracy/top1', 'accuracy/top5'}
    assert got['accuracy/top1'] == pytest.approx(hand(1))
    assert got['accuracy/top5'] == pytest.approx(hand(5))
    assert hand(1) < hand(5)


def test_accuracy_rejects_bad_topk():
    with pytest.raises(ValueError, match='topk'):
        Evaluator(dict(type='Accuracy', topk=(0, )))
    evaluator = Evaluator(dict(type='Accuracy', topk=(1, 5)))
    evaluator.process([BaseDataElement(pred_score=torch.tensor([0.3, 0.7]),
                                       gt_label=torch.tensor(1))])
    with pytest.raises(ValueError, match='number of classes'):
        evaluator.evaluate(1)


# --------------------------------------------------------------------------- models
def test_torchvision_resnet50_weights_load_strictly(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet50()
    for m in tv.modules():  # non-trivial statistics, so a missed buffer would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(7)
    path = tmp_path / 'resnet50.pth'
    torch.save(tv.state_dict(), path)

    cfg = Config.fromfile(str(CONFIG_DIR / 'resnet50_imagenet_jsbn.py'))
    cfg.model.backbone.norm_cfg = dict(type='SyncJSBN', requires_grad=True)
    cfg.model.backbone.pretrained = str(path)
    model = MODELS.build(cfg.model)
    model.init_weights()  # what the Runner calls
    backbone = model.backbone
    assert sum(isinstance(m, SyncJSBN) for m in backbone.modules()) == 53
    expected = {k: v for k, v in tv.state_dict().items() if not k.startswith('fc.')}
    got = backbone.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], v) for k, v in expected.items())

    # In eval mode (running statistics) the features are torchvision's.
    tv.eval()
    backbone.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = nn.Sequential(*list(tv.children())[:-2])(x)
        assert torch.allclose(backbone(x), ref, atol=1e-5)

    # Strict: a state_dict with a missing entry is refused.
    broken = tv.state_dict()
    del broken['layer1.0.bn1.running_mean']
    torch.save(broken, path)
    with pytest.raises(RuntimeError, match='Missing key'):
        MODELS.build(cfg.model).init_weights()


def test_predict_scores_and_labels(data):
    cfg = load_cfg('resnet9_digits_syncjsbn.py', data)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).eval()
    ds = DATASETS.build(cfg.val_dataloader.dataset)
    batch = model.data_preprocessor(batch_of(ds, 6))
    with torch.no_grad():
        out = model(**batch, mode='predict')
        logits = model(batch['inputs'], mode='tensor')
    assert len(out) == 6
    for i, sample in enumerate(out):
        assert sample.pred_score.shape == (10, )
        assert sample.pred_score.sum().item() == pytest.approx(1.0, abs=1e-5)
        assert torch.allclose(sample.pred_score, logits[i].softmax(0))
        assert sample.pred_label.item() == logits[i].argmax().item()
        assert sample.gt_label.item() == ds[i]['data_samples'].gt_label.item()
    with pytest.raises(ValueError, match='mode'):
        model(batch['inputs'], mode='logits')


def test_attack_path_is_differentiable():
    """Attacks go through data_preprocessor + 'tensor' mode on raw inputs, stacked or not."""
    model = MODELS.build(dict(
        type='ImageClassifier',
        data_preprocessor=dict(type='VolumeDataPreprocessor', mean=[10.], std=[2.]),
        backbone=dict(type='CNN3d', norm_cfg=dict(type='JSBN3d')),
        head=dict(in_channels=6, num_classes=3))).eval()
    x = torch.rand(3, 1, *VOL, requires_grad=True)
    stacked = model.data_preprocessor(dict(inputs=x))['inputs']
    listed = model.data_preprocessor(dict(inputs=list(x)))['inputs']
    assert torch.equal(stacked, listed) and torch.allclose(stacked, (x - 10) / 2)
    model(stacked, mode='tensor').sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r'\(N, C, D, H, W\)'):
        model.backbone(torch.zeros(1, 8, 8, 8))


def test_backbones_name_norm_layers_like_mmcv():
    cifar = MODELS.build(dict(type='CifarResNet', depth=9, norm_cfg=dict(type='SyncJSBN')))
    names = {n for n, m in cifar.named_modules() if isinstance(m, SyncJSBN)}
    assert {'bn1', 'layer1.0.bn1', 'layer1.0.bn2', 'layer2.0.downsample.1'} <= names
    assert len(cifar.layer1) == 1 and cifar.layer4[0].conv1.out_channels == 512
    assert len(MODELS.build(dict(type='CifarResNet', depth=18)).layer3) == 2
    cnn = MODELS.build(dict(type='CNN3d', norm_cfg=dict(type='JSBN3d')))
    assert [(n, m.num_features) for n, m in cnn.named_children() if isinstance(m, JSBN3d)] == [
        ('bn1', 3), ('bn2', 6), ('bn3', 6), ('bn4', 6)]
    with pytest.raises(ValueError, match='depth'):
        MODELS.build(dict(type='TorchvisionResNet', depth=42))


# --------------------------------------------------------------------------- datasets
def test_digits_dataset():
    pipeline = [dict(type='PackClsInputs')]
    train = DATASETS.build(dict(type='DigitsDataset', split='train', pipeline=pipeline))
    test = DATASETS.build(dict(type='DigitsDataset', split='test', pipeline=pipeline))
    assert (len(train), len(test)) == (1347, 450)

    def labels(ds):
        return np.array([ds.get_data_info(i)['gt_label'] for i in range(len(ds))])
    from sklearn.datasets import load_digits
    assert np.array_equal(np.bincount(labels(train)) + np.bincount(labels(test)),
                          np.bincount(load_digits().target))
    assert train.metainfo['classes'] == tuple('0123456789')
    info = train.get_data_info(0)
    assert info['img'].shape == (32, 32, 3) and info['img'].dtype == np.uint8
    assert info['img'].max() > 200 and np.array_equal(info['img'][..., 0], info['img'][..., 2])
    packed = train[0]
    assert packed['inputs'].shape == (3, 32, 32) and packed['inputs'].dtype == torch.uint8
    assert packed['data_samples'].gt_label.item() == info['gt_label']
    # The split depends on the seed only.
    again = DATASETS.build(dict(type='DigitsDataset', split='train', img_size=16))
    other = DATASETS.build(dict(type='DigitsDataset', split='train', seed=1))
    assert np.array_equal(labels(again), labels(train))
    assert again.get_data_info(0)['img'].shape == (16, 16, 3)
    assert not np.array_equal(labels(other), labels(train))
    lazy = DATASETS.build(dict(type='DigitsDataset', lazy_init=True))
    assert not lazy._fully_initialized


def test_cifar10_splits_and_channel_order(data):
    def build(**kw):
        return DATASETS.build(dict(type='CIFAR10', **{'data_root': str(data / 'cifar10'), **kw}))

    def index(ds):
        return [int(ds.get_data_info(i)['img'][0, 0, 2]) for i in range(len(ds))]  # red

    train, test = build(split='train'), build(split='test')
    assert index(train) == list(range(5 * N_CIFAR))
    assert index(test) == list(range(5 * N_CIFAR, 6 * N_CIFAR))
    img = train.get_data_info(3)['img']
    assert img.shape == (32, 32, 3) and img[0, 0, 0] == 255 - 3  # BGR: blue first
    assert train.get_data_info(13)['gt_label'] == 3
    # The held-out split is torch's random_split with the same generator seed.
    n, val = 5 * N_CIFAR, 2 * N_CIFAR
    ref_train, ref_val = torch.utils.data.random_split(
        range(n), [n - val, val], generator=torch.Generator().manual_seed(6))
    assert index(build(split='train', val_size=val, split_seed=6)) == list(ref_train)
    assert index(build(split='val', val_size=val, split_seed=6)) == list(ref_val)
    with pytest.raises(FileNotFoundError, match='download=True'):
        build(data_root=str(data / 'nowhere'))
    with pytest.raises(ValueError, match='split'):
        build(split='valid')
    with pytest.raises(ValueError, match='val_size'):
        build(split='val')


def test_image_folder(data):
    pipeline = [dict(type='LoadImageFromFile'), dict(type='PackClsInputs')]
    ds = DATASETS.build(dict(type='ImageFolder', data_root=str(data / 'imagenet'),
                             data_prefix=dict(img_path='train'), pipeline=pipeline))
    assert ds.metainfo['classes'] == ('cat', 'dog') and len(ds) == 8
    assert [ds.get_data_info(i)['gt_label'] for i in range(8)] == [0] * 4 + [1] * 4
    sample = ds[5]
    assert sample['inputs'].shape[0] == 3 and sample['data_samples'].gt_label.item() == 1
    assert sample['data_samples'].img_path.endswith('.png')
    only_dog = DATASETS.build(dict(type='ImageFolder', data_root=str(data / 'imagenet'),
                                   data_prefix=dict(img_path='val'),
                                   metainfo=dict(classes=['dog'])))
    assert len(only_dog) == 4 and {only_dog.get_data_info(i)['gt_label'] for i in range(4)} == {0}
    with pytest.raises(FileNotFoundError):
        DATASETS.build(dict(type='ImageFolder', data_root=str(data / 'imagenet'),
                            data_prefix=dict(img_path='test')))


def test_volume_dataset(data, tmp_path):
    ds = DATASETS.build(dict(type='VolumeDataset', data_root=str(data / 'volumes'),
                             ann_file='train.csv', data_prefix=dict(volume_path='volumes'),
                             pipeline=[dict(type='PackClsInputs')]))
    assert len(ds) == 8
    sample = ds[3]
    assert sample['inputs'].shape == (1, *VOL) and sample['inputs'].dtype == torch.float32
    assert sample['data_samples'].gt_label.item() == 1
    assert torch.equal(sample['inputs'][0],
                       torch.from_numpy(np.load(data / 'volumes' / 'volumes' / 'train_3.npy')))
    # Class names as labels, and a clear error for an unknown one.
    csv_file = tmp_path / 'named.csv'
    csv_file.write_text('scan,group\ntrain_0.npy,PD\ntrain_1.npy,HC\n')
    named = dict(type='VolumeDataset', ann_file=str(csv_file), filename_key='scan',
                 label_key='group', data_prefix=dict(volume_path=str(data / 'volumes' / 'volumes')),
                 metainfo=dict(classes=['HC', 'PD']))
    assert [DATASETS.build(named).get_data_info(i)['gt_label'] for i in range(2)] == [1, 0]
    csv_file.write_text('scan,group\ntrain_0.npy,XX\n')
    with pytest.raises(ValueError, match="'XX'"):
        DATASETS.build(named)
    with pytest.raises(ValueError, match='columns'):
        DATASETS.build({**named, 'label_key': 'label'})


def test_pack_and_seeded_albu():
    pack = TRANSFORMS.build(dict(type='PackClsInputs'))
    out = pack(dict(img=np.zeros((5, 7, 3), np.uint8), gt_label=2, sample_idx=4))
    assert out['inputs'].shape == (3, 5, 7) and out['inputs'].dtype == torch.uint8
    assert out['data_samples'].gt_label.item() == 2 and out['data_samples'].sample_idx == 4
    assert out['data_samples'].img_shape == (5, 7)
    assert pack(dict(volume=np.zeros(VOL)))['inputs'].shape == (1, *VOL)
    with pytest.raises(KeyError, match='img'):
        pack(dict(gt_label=1))

    albu = TRANSFORMS.build(dict(type='SeededAlbu', transforms=[
        dict(type='RandomCrop', height=4, width=4), dict(type='HorizontalFlip', p=0.5)]))
    img = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)

    def crops(seed):
        np.random.seed(seed)
        return [albu(dict(img=img.copy(), gt_label=1))['img'] for _ in range(4)]

    first, again = crops(0), crops(0)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # follows np.random
    assert len({a.tobytes() for a in first}) > 1
