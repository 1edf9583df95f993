"""Distribution-shift data: the ImageNetCorruption transform on real images (scikit-learn's
digits) against ImageNet-C's formulas, its seeding and errors; CIFAR10C on synthesized
.npy files in the official layout; the configs/tta configs' datasets and models (their
TestTimeAdaptLoop is not run), and corrupted Cityscapes labels. CPU only.
"""
import colorsys
import copy
import io
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

pytest.importorskip('mmcv._ext', reason='the model builds need the compiled mmcv')

import albumentations as A  # noqa: E402  (after robustbn has set NO_ALBUMENTATIONS_UPDATE)
from helpers import ROOT, write_cityscapes  # noqa: E402
from mmengine import Config  # noqa: E402
from mmengine.dataset import Compose  # noqa: E402
from mmengine.registry import DATASETS, MODELS, TRANSFORMS, DefaultScope  # noqa: E402
from mmseg.registry import DATASETS as SEG_DATASETS  # noqa: E402
from mmseg.registry import MODELS as SEG_MODELS  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

import robustbn  # noqa: E402,F401  (registers everything)
from robustbn import SyncJSBN  # noqa: E402
from robustbn.openmmlab.datasets import CIFAR10C, CORRUPTIONS, NOT_EXPRESSIBLE, ImageNetCorruption  # noqa: E402

register_all_modules(init_default_scope=False)

TTA_DIR = ROOT / 'configs' / 'tta'
CIFAR_CONFIGS = sorted(p.name for p in TTA_DIR.glob('resnet18_cifar10c_*.py'))
SEG_CONFIGS = sorted(p.name for p in TTA_DIR.glob('fcn_hr18_*cityscapes-c*.py'))
# PSNR against the clean image falls with every severity step for these (averaged over seeds
# for motion_blur, whose random angle matters). Not for glass_blur: ImageNet-C's severity 2
# (one iteration) and 4 are milder than 1 and 3; nor pixelate: whether a reduced size splits
# the image's edges on block borders varies from step to step.
MONOTONE = ('gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'motion_blur',
            'zoom_blur', 'brightness', 'contrast', 'jpeg_compression')
RANDOM = ('gaussian_noise', 'shot_noise', 'impulse_noise', 'glass_blur', 'motion_blur')
N_C = 6  # synthesized CIFAR-10-C images per severity


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope='module')
def image():
    """A 96x96 BGR image of real digits: each channel a different 3x3 grid of scikit-learn
    digits (32 px), mixed with a smooth gradient so there are mid-tones and colours."""
    ds = DATASETS.build(dict(type='DigitsDataset', split='test'))
    tiles = [ds.get_data_info(i)['img'][..., 0] for i in range(27)]
    grids = [np.block([[tiles[9 * c + 3 * r + k] for k in range(3)] for r in range(3)])
             for c in range(3)]
    yy, xx = np.mgrid[0:96, 0:96] / 96.0
    ramps = [60 + 120 * xx, 40 + 150 * yy, 200 - 120 * xx * yy]
    img = np.stack([0.55 * g + 0.45 * r for g, r in zip(grids, ramps)], axis=2)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def corrupt(img, corruption, severity, seed=0, **extra):
    results = ImageNetCorruption(corruption, severity, seed)(dict(img=img.copy(), **extra))
    return results['img']


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return 10 * np.log10(255.0 ** 2 / mse)


# --------------------------------------------------------------------------- transform
def test_registered_and_listed():
    assert TRANSFORMS.get('ImageNetCorruption') is ImageNetCorruption
    assert DATASETS.get('CIFAR10C') is CIFAR10C
    imagenet_c = ('gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'glass_blur',
                  'motion_blur', 'zoom_blur', 'snow', 'frost', 'fog', 'brightness', 'contrast',
                  'elastic_transform', 'pixelate', 'jpeg_compression')
    assert CORRUPTIONS == tuple(c for c in imagenet_c if c not in NOT_EXPRESSIBLE)
    assert set(CORRUPTIONS) | set(NOT_EXPRESSIBLE) == set(imagenet_c)


@pytest.mark.parametrize('corruption', CORRUPTIONS)
def test_every_severity_corrupts_the_image_only(corruption, image):
    seg = np.arange(96 * 96, dtype=np.uint8).reshape(96, 96)
    for severity in range(1, 6):
        img = image.copy()
        results = ImageNetCorruption(corruption, severity, seed=3)(
            dict(img=img, gt_seg_map=seg.copy(), img_shape=(96, 96)))
        out = results['img']
        assert out.shape == image.shape and out.dtype == np.uint8
        assert out.flags.c_contiguous
        assert not np.array_equal(out, image), severity
        assert np.array_equal(img, image)  # the input array is not modified
        assert np.array_equal(results['gt_seg_map'], seg) and results['img_shape'] == (96, 96)
        again = corrupt(image, corruption, severity, seed=3)  # a new instance, the same seed
        assert np.array_equal(out, again)
    if corruption in RANDOM:
        assert not np.array_equal(corrupt(image, corruption, 3, seed=4),
                                  corrupt(image, corruption, 3, seed=3))


@pytest.mark.parametrize('corruption', MONOTONE)
def test_severity_lowers_psnr(corruption, image):
    seeds = range(6) if corruption in RANDOM else (0, )
    scores = [np.mean([psnr(corrupt(image, corruption, severity, seed), image) for seed in seeds])
              for severity in range(1, 6)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores


def test_seeding(image):
    t = ImageNetCorruption('gaussian_noise', 2, seed=7)
    other = np.ascontiguousarray(image[::-1])
    a, b = t(dict(img=image.copy()))['img'], t(dict(img=other.copy()))['img']
    # The same image gives the same noise whatever came before; other images other noise.
    assert np.array_equal(t(dict(img=image.copy()))['img'], a)
    noise_a = a.astype(int) - image
    noise_b = (b.astype(int) - other)[::-1]
    assert not np.array_equal(noise_a, noise_b)
    assert np.array_equal(pickle.loads(pickle.dumps(t))(dict(img=image.copy()))['img'], a)
    # seed=None follows np.random, as mmengine seeds it per worker.
    free = ImageNetCorruption('gaussian_noise', 2)

    def run(seed):
        np.random.seed(seed)
        return [free(dict(img=image.copy()))['img'] for _ in range(2)]

    first, repeat = run(0), run(0)
    assert all(np.array_equal(x, y) for x, y in zip(first, repeat))
    assert not np.array_equal(first[0], first[1])


def test_bad_arguments_and_images(image):
    with pytest.raises(ValueError, match='unknown corruption'):
        ImageNetCorruption('gaussian')
    for name in NOT_EXPRESSIBLE:
        with pytest.raises(ValueError, match='not supported'):
            ImageNetCorruption(name)
    for severity in (0, 6, 2.5, True, '3'):
        with pytest.raises(ValueError, match='severity'):
            ImageNetCorruption('contrast', severity)
    for seed in (-1, 1.5, 'a'):
        with pytest.raises(ValueError, match='seed'):
            ImageNetCorruption('contrast', 1, seed)
    t = ImageNetCorruption('contrast', 1)
    for img in (image.astype(np.float32), image[..., 0], image[..., :2], None):
        with pytest.raises(ValueError, match=r'\(H, W, 3\) uint8'):
            t(dict(img=img))
    assert 'severity=1' in repr(t) and TRANSFORMS.build(
        dict(type='ImageNetCorruption', corruption='pixelate', severity=2)).severity == 2


# ------------------------------------------------------- the same as ImageNet-C's formulas
def test_contrast_and_defocus_are_imagenet_c(image):
    x = image / 255.0
    for severity, c in enumerate((0.4, 0.3, 0.2, 0.1, 0.05), 1):
        means = x.mean(axis=(0, 1), keepdims=True)  # per channel
        ref = np.clip((x - means) * c + means, 0, 1) * 255
        assert np.abs(corrupt(image, 'contrast', severity) - ref).max() <= 1

    def disk(radius, alias_blur):  # ImageNet-C's kernel
        grid = np.arange(-max(8, radius), max(8, radius) + 1)
        xs, ys = np.meshgrid(grid, grid)
        kernel = (xs ** 2 + ys ** 2 <= radius ** 2).astype(np.float32)
        ksize = (3, 3) if radius <= 8 else (5, 5)
        return cv2.GaussianBlur(kernel / kernel.sum(), ksize, sigmaX=alias_blur)

    for severity, (r, a) in enumerate(((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)), 1):
        ref = np.stack([cv2.filter2D(x[..., d], -1, disk(r, a)) for d in range(3)], axis=2)
        assert np.abs(corrupt(image, 'defocus_blur', severity) - ref * 255).max() <= 1


def test_glass_blur_is_imagenet_cs_loop(image):
    """ImageNet-C's pixel loop (its tuple 'swap' of numpy views copies the neighbour) with
    its own random numbers: the same PSNR as ours; albumentations' 'fast' mode is milder."""
    def imagenet_c(img, sigma, delta, iterations, rng):
        x = cv2.GaussianBlur(img, (0, 0), sigma)
        h_max, w_max = x.shape[:2]
        for _ in range(iterations):
            for h in range(h_max - delta, delta, -1):
                for w in range(w_max - delta, delta, -1):
                    dx, dy = rng.integers(-delta, delta, size=2)
                    x[h, w], x[h + dy, w + dx] = x[h + dy, w + dx], x[h, w]
        return cv2.GaussianBlur(x, (0, 0), sigma)

    for severity, (sigma, delta, iterations) in enumerate(
            ((0.7, 1, 2), (0.9, 2, 1), (1.0, 2, 3), (1.1, 3, 2), (1.5, 4, 2)), 1):
        ref = np.mean([psnr(imagenet_c(image.copy(), sigma, delta, iterations,
                                       np.random.default_rng(k)), image) for k in range(2)])
        ours = np.mean([psnr(corrupt(image, 'glass_blur', severity, k), image) for k in range(2)])
        fast = A.GlassBlur(sigma, delta, iterations, mode='fast', p=1)(image=image)['image']
        fast = psnr(fast, image)
        assert abs(ours - ref) < 0.5 and fast > ref + 1, (severity, ours, ref, fast)


def test_jpeg_is_pils_and_channel_order_matters(image):
    rgb = np.ascontiguousarray(image[..., ::-1])
    for severity, quality in enumerate((25, 18, 15, 10, 7), 1):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, 'JPEG', quality=quality)  # ImageNet-C: PIL on RGB
        ref = np.asarray(Image.open(buf).convert('RGB'))
        ours = corrupt(image, 'jpeg_compression', severity)[..., ::-1]
        assert np.abs(ours.astype(int) - ref).mean() < 0.25, severity
        # cv2 reading RGB as BGR would weigh red and blue wrongly in the luma.
        wrong = ImageNetCorruption('jpeg_compression', severity).aug(image=rgb.copy())['image']
        assert np.abs(wrong.astype(int) - ref).mean() > 1


def test_brightness_zoom_pixelate_near_imagenet_c(image):
    x = image[..., ::-1] / 255.0  # ImageNet-C works on RGB
    for severity, c in enumerate((0.1, 0.2, 0.3, 0.4, 0.5), 1):
        ref = np.array([colorsys.hsv_to_rgb(h, s, min(v + c, 1.0)) for h, s, v in
                        (colorsys.rgb_to_hsv(*p) for p in x.reshape(-1, 3))]).reshape(x.shape)
        diff = np.abs(corrupt(image, 'brightness', severity)[..., ::-1] - ref * 255)
        assert diff.mean() < 1.5 and diff.max() <= 6  # cv2's 8-bit hue
    from scipy.ndimage import zoom as scizoom

    def clipped_zoom(img, z):
        h = img.shape[0]
        ch = int(np.ceil(h / z))
        top = (h - ch) // 2
        img = scizoom(img[top:top + ch, top:top + ch], (z, z, 1), order=1)
        trim = (img.shape[0] - h) // 2
        return img[trim:trim + h, trim:trim + h]

    for severity, (m, s) in enumerate(((1.11, .01), (1.16, .01), (1.21, .02), (1.26, .02),
                                       (1.31, .03)), 1):
        factors = np.arange(1, m, s)
        ref = (x + sum(clipped_zoom(x, z) for z in factors)) / (len(factors) + 1)
        diff = np.abs(corrupt(image, 'zoom_blur', severity)[..., ::-1] - ref * 255).mean()
        # cv2's bilinear resize samples half a pixel off scipy's zoom at sharp digit edges
        assert diff < 0.3 * np.abs(x - ref).mean() * 255, severity
    for severity, c in ((2, 0.5), (5, 0.25)):  # sizes where int() and cv2's rounding agree
        small = Image.fromarray(np.ascontiguousarray(image[..., ::-1])).resize(
            (int(96 * c), int(96 * c)), Image.BOX)
        ref = np.asarray(small.resize((96, 96), Image.BOX))
        diff = np.abs(corrupt(image, 'pixelate', severity)[..., ::-1].astype(int) - ref)
        assert diff.mean() < 1


def test_noise_statistics_are_imagenet_c():
    grey = np.full((192, 192, 3), 100, np.uint8)
    x = 100 / 255
    for severity, c in enumerate((0.08, 0.12), 1):  # little clipping at these severities
        noise = corrupt(grey, 'gaussian_noise', severity).astype(float) - 100
        assert abs(noise.std() / 255 - c) < 0.03 * c and abs(noise.mean()) < 0.5
        # independent per channel
        assert abs(np.corrcoef(noise[..., 0].ravel(), noise[..., 1].ravel())[0, 1]) < 0.05
    for severity, c in enumerate((60, 25, 12, 5, 3), 1):
        # ImageNet-C: clip(poisson(x c) / c, 0, 1); its exact mean and variance.
        k = np.arange(0, 200)
        values = np.clip(k / c, 0, 1)
        pmf = stats.poisson.pmf(k, x * c)
        mean = (pmf * values).sum()
        var = (pmf * values ** 2).sum() - mean ** 2
        out = corrupt(grey, 'shot_noise', severity) / 255
        assert abs(out.mean() - mean) < 0.01 and abs(out.var() / var - 1) < 0.05, severity
    for severity, c in enumerate((0.03, 0.06, 0.09, 0.17, 0.27), 1):
        out = corrupt(grey, 'impulse_noise', severity)
        hit = out != 100
        # each channel separately: c of its values, half salt, half pepper
        assert np.allclose(hit.mean(axis=(0, 1)), c, atol=1e-3)
        assert abs((out == 255).mean() - c / 2) < 1e-3
        assert (hit.any(axis=2) & ~hit.all(axis=2)).any()  # coloured, not grey, impulses


# --------------------------------------------------------------------------- CIFAR-10-C
def write_cifar10c(root: Path, corruptions=('gaussian_noise', 'fog'), n=N_C):
    """Image j of a file holds j in pixel (0, 0) of its red channel (RGB, as the files) and
    the corruption's number in green; labels.npy repeats the n labels for each severity."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k, name in enumerate(corruptions):
        imgs = rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8)
        imgs[:, 0, 0, 0] = np.arange(5 * n)
        imgs[:, 0, 0, 1] = k
        np.save(root / f'{name}.npy', imgs)
    np.save(root / 'labels.npy', np.tile(np.arange(n) % 10, 5).astype(np.uint8))
    return root


def test_cifar10c_reads_the_severity_slice(tmp_path):
    root = write_cifar10c(tmp_path / 'c')

    def build(**kw):
        return DATASETS.build(dict(type='CIFAR10C', data_root=str(root),
                                   pipeline=[dict(type='PackClsInputs')], **kw))

    for severity in (1, 3, 5):
        ds = build(corruption='fog', severity=severity)
        assert len(ds) == N_C and ds.metainfo['classes'][0] == 'airplane'
        for i in range(N_C):
            info = ds.get_data_info(i)
            img = ds.prepare_data(i)['inputs'].numpy().transpose(1, 2, 0)
            assert img.shape == (32, 32, 3) and img.dtype == np.uint8
            assert img[0, 0, 2] == (severity - 1) * N_C + i  # red last: BGR
            assert img[0, 0, 1] == 1  # the fog file
            assert info['gt_label'] == i % 10
            assert ds[i]['data_samples'].gt_label.item() == i % 10
    ds = build(corruption='gaussian_noise', severity=2)
    raw = np.load(root / 'gaussian_noise.npy')
    assert np.array_equal(ds.prepare_data(4)['inputs'].numpy().transpose(1, 2, 0),
                          raw[N_C + 4, ..., ::-1])
    assert isinstance(ds._images, np.memmap)
    for clone in (copy.deepcopy(ds), pickle.loads(pickle.dumps(ds))):
        assert clone._images is None  # reopened, not copied
        assert torch.equal(clone[4]['inputs'], ds[4]['inputs'])
    # labels.npy with one label per test image (not repeated per severity) works too.
    np.save(root / 'labels.npy', np.arange(N_C) % 10)
    assert build(corruption='fog', severity=4).get_data_info(5)['gt_label'] == 5


def test_cifar10c_errors(tmp_path):
    root = write_cifar10c(tmp_path / 'c')

    def build(**kw):
        return DATASETS.build(dict(type='CIFAR10C', **{'data_root': str(root), **kw}))

    with pytest.raises(FileNotFoundError, match='contrast.npy'):
        build(corruption='contrast')
    with pytest.raises(FileNotFoundError, match='CIFAR-10-C'):
        build(data_root=str(tmp_path / 'nowhere'))
    for severity in (0, 6, 1.0, True):
        with pytest.raises(ValueError, match='severity'):
            build(severity=severity)
    with pytest.raises(ValueError, match='unknown CIFAR-10-C corruption'):
        build(corruption='gaussian')
    np.save(root / 'fog.npy', np.zeros((7, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r'\(5 N, H, W, 3\)'):
        build(corruption='fog')
    np.save(root / 'labels.npy', np.zeros(7, np.uint8))
    with pytest.raises(ValueError, match='labels'):
        build()
    (root / 'labels.npy').unlink()
    with pytest.raises(FileNotFoundError, match='labels.npy'):
        build()


# --------------------------------------------------------------------------- configs
def test_tta_config_list():
    assert len(CIFAR_CONFIGS) == 4 and len(SEG_CONFIGS) == 4, (CIFAR_CONFIGS, SEG_CONFIGS)


def check_test_cfg(cfg, name):
    test_cfg = cfg.test_cfg
    assert test_cfg.type == 'TestTimeAdaptLoop' and test_cfg.steps == 1
    assert test_cfg.episodic is False
    if name.endswith('_tent.py'):
        assert test_cfg.method == 'tent' and test_cfg.optimizer == dict(type='Adam', lr=1e-3)
        assert 'norm_kwargs' not in test_cfg
    else:
        assert test_cfg.method == 'gprebn'
        assert test_cfg.optimizer == dict(type='SGD', lr=2.5e-4, momentum=0.9)
        assert test_cfg.norm_kwargs == dict(theta=1.0, target_momentum=0.05,
                                            batch_estimator='sample')


def expected_norm(name):
    return SyncJSBN if '_syncjsbn' in name else nn.SyncBatchNorm


@pytest.mark.parametrize('name', CIFAR_CONFIGS)
def test_cifar10c_config_builds(name, tmp_path):
    cfg = Config.fromfile(str(TTA_DIR / name))
    assert cfg.custom_imports == dict(imports=['robustbn'], allow_failed_imports=False)
    check_test_cfg(cfg, name)
    loader = cfg.test_dataloader
    assert loader.batch_size == 128 and loader.sampler.shuffle is False
    assert cfg.val_dataloader.dataset.type == 'CIFAR10'  # validation stays clean CIFAR-10
    ds_cfg = loader.dataset
    assert ds_cfg.type == 'CIFAR10C'
    assert (ds_cfg.corruption, ds_cfg.severity) == ('gaussian_noise', 5)
    ds_cfg.data_root = str(write_cifar10c(tmp_path / 'c'))
    ds_cfg.severity = 2  # as tools set it
    ds = DATASETS.build(ds_cfg)
    assert len(ds) == N_C and ds.prepare_data(0)['inputs'][2, 0, 0].item() == N_C

    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert norms and all(isinstance(m, expected_norm(name)) for m in norms)
    items = [ds[i] for i in range(4)]
    batch = model.data_preprocessor(dict(inputs=[d['inputs'] for d in items],
                                         data_samples=[d['data_samples'] for d in items]))
    model.eval()
    with torch.no_grad():
        assert model(batch['inputs'], mode='tensor').shape == (4, 10)


@pytest.mark.parametrize('name', SEG_CONFIGS)
def test_cityscapes_c_config_builds_and_keeps_labels(name, tmp_path):
    cfg = Config.fromfile(str(TTA_DIR / name))
    check_test_cfg(cfg, name)
    assert cfg.custom_hooks == []
    pipeline = cfg.test_dataloader.dataset.pipeline
    assert [t.type for t in pipeline] == ['LoadImageFromFile', 'ImageNetCorruption', 'Resize',
                                          'LoadAnnotations', 'PackSegInputs']
    step = pipeline[1]
    assert (step.corruption, step.severity, step.seed) == ('gaussian_noise', 5, 0)
    assert 'ImageNetCorruption' not in [t.type for t in cfg.val_dataloader.dataset.pipeline]

    ds_cfg = cfg.test_dataloader.dataset
    ds_cfg.data_root = str(write_cityscapes(tmp_path / 'cityscapes', size=(32, 64),
                                            random_labels=True))
    step.corruption, step.severity = 'impulse_noise', 2  # as tools set it
    clean_cfg = copy.deepcopy(ds_cfg)
    clean_cfg.pipeline = [t for t in pipeline if t.type != 'ImageNetCorruption']
    with DefaultScope.overwrite_default_scope('mmseg'):
        corrupted, clean = SEG_DATASETS.build(ds_cfg), SEG_DATASETS.build(clean_cfg)
        for i in range(len(clean)):
            a, b = corrupted[i], clean[i]
            assert a['inputs'].shape == b['inputs'].shape == (3, 1024, 2048)
            assert not torch.equal(a['inputs'], b['inputs'])
            assert torch.equal(a['data_samples'].gt_sem_seg.data, b['data_samples'].gt_sem_seg.data)
            assert torch.equal(corrupted[i]['inputs'], a['inputs'])  # seed=0: the same every time
        cfg.model.pretrained = None  # offline
        model = SEG_MODELS.build(cfg.model)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert norms and all(isinstance(m, expected_norm(name)) for m in norms)


def test_pipeline_keeps_label_map(image):
    """On the mmcv/mmseg path: the image corrupted, the label map and shapes untouched."""
    seg = (np.arange(96 * 96) % 19).astype(np.uint8).reshape(96, 96)
    pipeline = Compose([dict(type='ImageNetCorruption', corruption=c, severity=5, seed=1)
                        for c in CORRUPTIONS])
    out = pipeline(dict(img=image.copy(), gt_seg_map=seg.copy(), ori_shape=(96, 96)))
    assert np.array_equal(out['gt_seg_map'], seg) and out['ori_shape'] == (96, 96)
    assert out['img'].shape == image.shape and not np.array_equal(out['img'], image)
