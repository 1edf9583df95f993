# Training-step speed with BN vs SyncJSBN vs JSBN norm layers: mmseg's FCN-HRNetV2-W18
# (config mmseg::hrnet/fcn_hr18_4xb2-40k_cityscapes-512x1024.py, batch 2 at 512x1024,
# about 300 norm layers) and ResNet-50 (robustbn's TorchvisionResNet + a linear head, batch
# 64 at 224). One SGD step per iteration (data preprocessing, forward with the loss,
# backward, optimizer step) on a fixed random batch already on the device, float32 and
# bfloat16 autocast. Prints a markdown table (device, versions): ms / iteration and peak
# GPU memory, with ratios to BN. One process: SyncJSBN has no group, so it runs as JSBN
# (what a single-GPU run does); --with-reference adds rows with the JS layers forced to
# the reference path, --with-device-scalars rows with its per-layer scalars kept on the
# device as well (on CPU: the lean path off), --with-kernel-moments rows with BatchNorm's
# statistics kernel for every input (on CPU: no float32 moments by passes).
#
#   python tools/benchmark_train.py [--models fcn_hr18 resnet50] [--norms BN SyncJSBN JSBN]
#       [--dtypes fp32 bf16] [--iters 20] [--warmup 5] [--channels-last] [--with-reference]
#       [--with-device-scalars] [--with-kernel-moments]
#   python tools/benchmark_train.py --device cpu --seg-shape 1 64 128 --cls-shape 2 32 \
#       --iters 1 --warmup 1                                   # a quick CPU smoke run
import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/bench_common.py
from bench_common import bench_main, device_name, fmt, sync, versions  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'plugin'))

SEG_CONFIG = 'mmseg::hrnet/fcn_hr18_4xb2-40k_cityscapes-512x1024.py'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Training step time with BN vs JS-BN layers')
    parser.add_argument('--models', nargs='+', default=['fcn_hr18', 'resnet50'],
                        choices=['fcn_hr18', 'resnet50'])
    parser.add_argument('--norms', nargs='+', default=['BN', 'SyncJSBN', 'JSBN'],
                        choices=['BN', 'SyncJSBN', 'JSBN'])
    parser.add_argument('--estimator', default='paper')
    parser.add_argument('--dtypes', nargs='+', default=['fp32', 'bf16'], choices=['fp32', 'bf16'])
    parser.add_argument('--seg-shape', nargs=3, type=int, default=[2, 512, 1024],
                        metavar=('B', 'H', 'W'), help='fcn_hr18 batch and image size')
    parser.add_argument('--cls-shape', nargs=2, type=int, default=[64, 224],
                        metavar=('B', 'S'), help='ResNet-50 batch and image size')
    parser.add_argument('--channels-last', action='store_true', help='ResNet-50 in channels_last')
    parser.add_argument('--with-reference', action='store_true',
                        help='also time the JS layers on the reference path')
    parser.add_argument('--with-device-scalars', action='store_true',
                        help='also time the JS layers on the reference path with the per-layer '
                        'scalars on the device (on CPU: without the lean path)')
    parser.add_argument('--with-kernel-moments', action='store_true',
                        help='also time the JS layers with BatchNorm\'s statistics kernel for '
                        'every input (CPU: no float32 moments by passes, see '
                        'robustbn.functional.moment_passes)')
    parser.add_argument('--iters', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--rounds', type=int, default=1,
                        help='time the variants of a model and dtype in turn this many times '
                        '(iters each; the median is over all rounds): interleaved, so slow '
                        'phases of a shared machine hit every variant alike; warm-up in the '
                        'first round only')
    parser.add_argument('--clock', choices=('wall', 'process'), default='wall',
                        help="'process': the process's CPU time (all threads; CPU only), "
                        'which time stolen by other guests of a shared VM does not inflate')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', help='also write the rows as JSON here')
    args = parser.parse_args(argv)
    if args.clock == 'process' and not args.device.startswith('cpu'):
        parser.error('--clock process measures CPU work: use it with --device cpu')
    return args


def norm_cfg(norm: str, args) -> dict:
    cfg = dict(type=norm, requires_grad=True)
    if norm != 'BN':
        cfg['estimator'] = args.estimator
    return cfg


def build_seg(norm: str, args):
    from mmengine.hub import get_config
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    import robustbn  # noqa: F401  (registers JSBN, SyncJSBN)
    register_all_modules(init_default_scope=True)
    cfg = get_config(SEG_CONFIG)
    cfg.model.pretrained = None  # timing needs no ImageNet weights
    cfg.model.data_preprocessor.size = tuple(args.seg_shape[1:])
    cfg.model.backbone.norm_cfg = norm_cfg(norm, args)
    cfg.model.decode_head.norm_cfg = norm_cfg(norm, args)
    model = MODELS.build(cfg.model).to(args.device).train()

    n, h, w = args.seg_shape
    gen = torch.Generator().manual_seed(0)
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    inputs, samples = [], []
    for _ in range(n):
        inputs.append(torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
                      .to(args.device))
        s = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 19, (1, h, w), generator=gen)
                                 .to(args.device))
        samples.append(s)
    batch = dict(inputs=inputs, data_samples=samples)

    def loss_fn():
        data = model.data_preprocessor(batch, True)
        loss, _ = model.parse_losses(model(**data, mode='loss'))
        return loss
    return model, loss_fn


def build_cls(norm: str, args):
    import robustbn  # noqa: F401
    from robustbn.openmmlab.models import TorchvisionResNet
    backbone = TorchvisionResNet(depth=50, norm_cfg=norm_cfg(norm, args))
    model = nn.Sequential(backbone, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000))
    model = model.to(args.device).train()
    n, s = args.cls_shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, s, s, generator=gen).to(args.device)
    labels = torch.randint(0, 1000, (n,), generator=gen).to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def loss_fn():
        return nn.functional.cross_entropy(model(x), labels)
    return model, loss_fn


def time_training(model, loss_fn, dtype: str, args, warmup=None):
    """(ms of each timed iteration, peak MiB or None); ``warmup`` untimed iterations first
    (default ``args.warmup``)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    dev = args.device.split(':')[0]
    amp = torch.autocast(dev, dtype=torch.bfloat16) if dtype == 'bf16' else \
        contextlib.nullcontext()

    def step():
        with amp:
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup if warmup is None else warmup):
        step()
    sync(args.device)
    if dev == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    clock = time.process_time if args.clock == 'process' else time.perf_counter
    times = []
    for _ in range(args.iters):
        start = clock()
        step()
        sync(args.device)
        times.append((clock() - start) * 1000)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if dev == 'cuda' else None
    return times, peak


def run(args):
    from robustbn import fast, lean
    from robustbn.functional import moment_passes
    if args.device.startswith('cuda'):
        torch.backends.cudnn.benchmark = True
    # (norm, fast path mode, host scalars (lean path), moments by passes)
    runs = [(norm, 'auto', True, True) for norm in args.norms]
    if args.with_reference:
        runs += [(norm, 'off', True, True) for norm in args.norms if norm != 'BN']
    if args.with_kernel_moments:
        runs += [(norm, 'auto', True, False) for norm in args.norms if norm != 'BN']
    if args.with_device_scalars:
        runs += [(norm, 'off', False, True) for norm in args.norms if norm != 'BN']
    rows = []
    for name in args.models:
        shape = args.seg_shape if name == 'fcn_hr18' else args.cls_shape
        for dtype in args.dtypes:
            # on a GPU one model at a time is resident: each its own peak memory
            park = args.device.startswith('cuda') and len(runs) > 1
            built = []
            for norm, mode, host_scalars, passes in runs:
                with fast.fast_path(mode), lean.lean_path(host_scalars), moment_passes(passes):
                    torch.manual_seed(0)
                    model, loss_fn = (build_seg if name == 'fcn_hr18' else build_cls)(norm, args)
                if park:
                    model.to('cpu')  # moved to the GPU for its timing only
                built.append((model, loss_fn))
            times = [[] for _ in runs]
            peaks = [None] * len(runs)
            for r in range(args.rounds):
                for i, ((norm, mode, host_scalars, passes), (model, loss_fn)) in enumerate(
                        zip(runs, built)):
                    if park:
                        model.to(args.device)
                    with (fast.fast_path(mode), lean.lean_path(host_scalars),
                          moment_passes(passes)):
                        more, peak = time_training(model, loss_fn, dtype, args,
                                                   warmup=None if r == 0 else 0)
                    if park:
                        model.to('cpu')
                        torch.cuda.empty_cache()
                    times[i] += more
                    peaks[i] = peak if peaks[i] is None else max(peaks[i], peak)
            del built
            if args.device.startswith('cuda'):
                torch.cuda.empty_cache()
            base = None
            for (norm, mode, host_scalars, passes), ts, peak in zip(runs, times, peaks):
                ms = statistics.median(ts)
                path = 'reference' if mode == 'off' else \
                    ('fast' if norm != 'BN' and args.device.startswith('cuda') else '-')
                path = 'device scalars' if not host_scalars else \
                    'kernel moments' if not passes else path
                row = dict(model=name, norm=norm, path=path,
                           dtype=dtype, shape=list(shape), ms=ms, peak_mib=peak)
                if norm == 'BN':
                    base = row
                row['ms_vs_bn'] = ms / base['ms'] if base else None
                row['peak_vs_bn'] = peak / base['peak_mib'] if base and peak else None
                rows.append(row)
                print(f'{name} {norm} {row["path"]} {dtype}: {ms:.1f} ms/iter', file=sys.stderr,
                      flush=True)
    return rows


def table(rows, args) -> str:
    lines = [f'Device: {device_name(args.device)}; {versions(openmmlab=True)}; '
             f'estimator {args.estimator!r}; '
             f'median of {args.iters * args.rounds} iterations ({args.rounds} interleaved '
             f'round(s) of {args.iters} after {args.warmup} warm-up), {args.clock} time'
             + ('; ResNet-50 channels_last' if args.channels_last else ''), '',
             '| model | norm | JS path | dtype | batch shape | ms / iter | x BN | '
             'peak MiB | x BN |',
             '| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |']
    for r in rows:
        lines.append(f"| {r['model']} | {r['norm']} | {r['path']} | {r['dtype']} | "
                     f"{'x'.join(map(str, r['shape']))} | {r['ms']:.1f} | "
                     f"{fmt(r['ms_vs_bn'], '.2f')} | {fmt(r['peak_mib'], '.0f')} | "
                     f"{fmt(r['peak_vs_bn'], '.2f')} |")
    return '\n'.join(lines)


def main(argv=None):
    return bench_main(parse_args, run, table, argv, openmmlab=True)


if __name__ == '__main__':
    main()
