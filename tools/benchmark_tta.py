# Adaptation throughput (images/s) of the test-time adaptation methods on ResNet-50
# (robustbn's TorchvisionResNet in ImageClassifier, batch 64 at 224 px) and mmseg's
# FCN-HRNetV2-W18 (configs/seg, batch 2 at 512x1024), through robustbn.openmmlab.tta.Adapter: what
# TestTimeAdaptLoop runs per batch (data preprocessing, forward in predict mode, entropy,
# backward, optimizer step). One synthetic batch already on the device is adapted on
# repeatedly, so data loading is not timed. Prints a markdown table with device and
# versions. GPU when available; `--tiny` gives CPU-sized shapes.
#
#   python tools/benchmark_tta.py [--models resnet50 fcn_hr18] [--methods bn_adapt tent gprebn]
#       [--iters 20] [--warmup 5] [--fp16] [--device cuda|cpu] [--tiny]
import argparse
import os.path as osp
import platform
import time

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CLS_CONFIG = osp.join(ROOT, 'configs/_base_/models/tv_resnet50.py')
SEG_CONFIG = osp.join(ROOT, 'configs/seg/fcn_hr18_4xb2-40k_cityscapes-512x1024_syncbn.py')
# (batch, height, width): the reference shapes and the --tiny ones
SHAPES = {'resnet50': ((64, 224, 224), (8, 64, 64)),
          'fcn_hr18': ((2, 512, 1024), (2, 64, 128))}


def parse_args():
    parser = argparse.ArgumentParser(description='Test-time adaptation throughput')
    parser.add_argument('--models', nargs='+', default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument('--methods', nargs='+', default=['bn_adapt', 'tent', 'gprebn'],
                        choices=['source', 'bn_adapt', 'tent', 'gprebn'])
    parser.add_argument('--iters', type=int, help='timed batches (default 20, tiny 3)')
    parser.add_argument('--warmup', type=int, help='untimed batches first (default 5, tiny 1)')
    parser.add_argument('--fp16', action='store_true', help='autocast (float16 on GPUs)')
    parser.add_argument('--device', help='default: cuda when available, else cpu')
    parser.add_argument('--tiny', action='store_true',
                        help='small batches and images (CPU): ResNet-50 8x64x64, hr18 2x64x128')
    args = parser.parse_args()
    args.iters = args.iters or (3 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    return args


def build_model(name: str, device: str):
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import MODELS

    import robustbn  # noqa: F401  (registers the models)

    if name == 'resnet50':
        model = MODELS.build(Config.fromfile(CLS_CONFIG).model)
    else:
        from mmseg.registry import MODELS as SEG_MODELS
        from mmseg.utils import register_all_modules
        register_all_modules(init_default_scope=True)
        cfg = Config.fromfile(SEG_CONFIG).model
        cfg.pretrained = None  # offline: the architecture is what is timed
        model = SEG_MODELS.build(cfg)
    # one process: torch SyncBN as BN, as mmengine's runner does without distribution
    return revert_sync_batchnorm(model).to(device).eval()


def make_batch(name: str, shape, device: str) -> dict:
    from mmengine.structures import BaseDataElement, PixelData

    n, h, w = shape
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen).to(device)
              for _ in range(n)]
    if name == 'resnet50':
        samples = [BaseDataElement(gt_label=torch.tensor(i % 1000)) for i in range(n)]
    else:
        from mmseg.structures import SegDataSample
        samples = []
        for _ in range(n):
            s = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w),
                                            pad_shape=(h, w)))
            s.gt_sem_seg = PixelData(data=torch.randint(0, 19, (1, h, w), generator=gen))
            samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


def sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def bench(model, name, method, batch, args) -> float:
    """Seconds per batch."""
    from robustbn.openmmlab.tta import Adapter

    if method == 'source':
        def step(b):
            with torch.no_grad():
                return model.test_step(b)
    else:
        adapter = Adapter(model, method, fp16=args.fp16)
        step = adapter.adapt
    for _ in range(args.warmup):
        step(batch)
    sync(args.device)
    start = time.perf_counter()
    for _ in range(args.iters):
        step(batch)
    sync(args.device)
    return (time.perf_counter() - start) / args.iters


def versions() -> str:
    import mmcv
    import mmengine
    import mmseg
    return (f'python {platform.python_version()}, torch {torch.__version__}, mmengine '
            f'{mmengine.__version__}, mmcv {mmcv.__version__}, mmseg {mmseg.__version__}')


def main():
    args = parse_args()
    if args.device.startswith('cuda'):
        torch.backends.cudnn.benchmark = True
        device_name = torch.cuda.get_device_name(torch.device(args.device))
    else:
        device_name = f'CPU ({platform.processor() or platform.machine()}, ' \
                      f'{torch.get_num_threads()} threads)'
    rows = []
    for name in args.models:
        shape = SHAPES[name][1 if args.tiny else 0]
        model = build_model(name, args.device)
        batch = make_batch(name, shape, args.device)
        for method in args.methods:
            sec = bench(model, name, method, batch, args)
            rows.append((name, method, shape, sec))
            print(f'{name} {method}: {1000 * sec:.1f} ms/batch', flush=True)
        del model
    print(f'\nDevice: {device_name}; {versions()}; autocast fp16: {args.fp16}; '
          f'{args.iters} timed batches after {args.warmup} warm-up\n')
    print('| model | method | batch x H x W | ms / batch | images / s |')
    print('| --- | --- | --- | ---: | ---: |')
    for name, method, (n, h, w), sec in rows:
        print(f'| {name} | {method} | {n} x {h} x {w} | {1000 * sec:.1f} | {n / sec:.1f} |')


if __name__ == '__main__':
    main()
