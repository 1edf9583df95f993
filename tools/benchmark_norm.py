# Layer-level speed of the norm layers: one forward + backward (input, weight and bias
# gradients) of nn.BatchNorm2d (cuDNN), JSBN2d on the fast path and on the reference path,
# GpreBN2d (both paths), and on GPU the synchronized code paths in a one-process NCCL
# group: SyncJSBN's kernels (all_reduce forward and backward) vs nn.SyncBatchNorm's.
# HRNet-W18 and ResNet-50 shapes, float32 and bfloat16 input under autocast, NCHW and
# channels_last. Prints a markdown table (device, versions) with per-iteration eager wall
# time, GPU kernel time (sum of kernel durations from torch.profiler) and kernel count, and
# their ratios to BatchNorm. The layers of one shape/dtype/layout are timed in turns
# (repeat r of every layer, then repeat r+1), so a drifting machine speed shifts them alike.
# `jsbn_none` is JSBN2d with estimator 'none' on the reference path: BatchNorm's arithmetic
# through this package's autograd Function, i.e. the layer's fixed cost without shrinkage.
#
#   python tools/benchmark_norm.py [--shapes hrnet resnet | --shapes 2,18,128,256 ...]
#       [--dtypes fp32 bf16] [--layouts nchw cl] [--layers bn jsbn jsbn_ref ...]
#       [--estimator paper] [--iters 50] [--warmup 10] [--out results.json]
#   python tools/benchmark_norm.py --device cpu --shapes 2,8,8,8 --iters 2 --warmup 1
#
# On CPU only the reference path exists (the fast path is CUDA): a smoke run of the script.
import argparse
import contextlib
import os
import socket
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/bench_common.py
from bench_common import bench_main, device_name, fmt, shapes_arg, sync, versions, wall_ms  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'plugin'))

LAYERS = ['bn', 'jsbn', 'jsbn_ref', 'jsbn_dev', 'jsbn_none', 'gprebn', 'gprebn_ref',
          'gprebn_dev', 'syncbn', 'syncjsbn']
# _ref: the fast path off (on CPU that is the lean path, robustbn/lean.py); _dev: the
# reference path with its per-layer scalars on the device (the lean path off too)
LABELS = {'bn': 'BatchNorm2d', 'jsbn': 'JSBN2d fast', 'jsbn_ref': 'JSBN2d reference',
          'jsbn_dev': 'JSBN2d reference, device scalars',
          'jsbn_none': "JSBN2d reference, estimator 'none'",
          'gprebn': 'GpreBN2d fast', 'gprebn_ref': 'GpreBN2d reference',
          'gprebn_dev': 'GpreBN2d reference, device scalars',
          'syncbn': 'SyncBatchNorm (1-rank group)', 'syncjsbn': 'SyncJSBN (1-rank group)'}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Norm layer forward+backward timing')
    parser.add_argument('--shapes', nargs='+', default=['hrnet', 'resnet'],
                        help="'hrnet', 'resnet' or N,C,H,W shapes")
    parser.add_argument('--dtypes', nargs='+', default=['fp32', 'bf16'], choices=['fp32', 'bf16'])
    parser.add_argument('--layouts', nargs='+', default=['nchw', 'cl'], choices=['nchw', 'cl'])
    parser.add_argument('--layers', nargs='+', default=LAYERS, choices=LAYERS)
    parser.add_argument('--estimator', default='paper')
    parser.add_argument('--iters', type=int, default=50, help='timed iterations per repeat')
    parser.add_argument('--repeats', type=int, default=5, help='median over repeats')
    parser.add_argument('--warmup', type=int, default=10)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', help='also write the rows as JSON here')
    args = parser.parse_args(argv)
    args.shapes = shapes_arg(parser, args.shapes)
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_rank_group(device: str):
    """A one-process NCCL group (GPU), so the synchronized code paths run."""
    import torch.distributed as dist
    if not device.startswith('cuda'):
        yield None
        return
    dist.init_process_group('nccl', init_method=f'tcp://127.0.0.1:{_free_port()}', rank=0,
                            world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
        os.environ.pop('MASTER_PORT', None)


def make_step(layer_name: str, c: int, args, group):
    """A function running one forward+backward of the layer on its input, and the layer's
    parameters; None when the layer does not run on this device."""
    from robustbn import GpreBN2d, JSBN2d, fast, get_estimator, lean, shrunk_batch_norm
    cuda = args.device.startswith('cuda')
    if layer_name in ('jsbn', 'gprebn', 'syncjsbn', 'syncbn') and not cuda:
        return None  # the fast path and NCCL are CUDA only
    mode = 'off' if layer_name.endswith(('_ref', '_dev', '_none')) else 'auto'
    host_scalars = not layer_name.endswith('_dev')
    if layer_name == 'bn':
        layer = nn.BatchNorm2d(c)
    elif layer_name.startswith('jsbn'):
        layer = JSBN2d(c, estimator='none' if layer_name == 'jsbn_none' else args.estimator)
    elif layer_name.startswith('gprebn'):
        layer = GpreBN2d(c, batch_estimator=args.estimator)
    elif layer_name == 'syncbn':
        layer = nn.SyncBatchNorm(c)
    else:
        layer = JSBN2d(c, estimator=args.estimator)  # its parameters and buffers
    layer = layer.to(args.device).train()
    params = [layer.weight, layer.bias]

    if layer_name == 'syncbn':
        from torch.nn.modules._functions import SyncBatchNorm as SyncBNFunction

        def forward(x):  # what nn.SyncBatchNorm runs with more than one rank
            return SyncBNFunction.apply(x, layer.weight, layer.bias, layer.running_mean,
                                        layer.running_var, layer.eps, layer.momentum, group, 1)
    elif layer_name == 'syncjsbn':
        est = get_estimator(args.estimator)

        def forward(x):  # what SyncJSBN runs with more than one rank
            return shrunk_batch_norm(x, layer.weight, layer.bias, layer.running_mean,
                                     layer.running_var, est, layer.eps, layer.momentum,
                                     group=group)
    else:
        forward = layer

    def step(x, g):
        with fast.fast_path(mode), lean.lean_path(host_scalars), autocast(args, x):
            y = forward(x)
        torch.autograd.grad(y, [x] + params, g)
    return step


def autocast(args, x):
    if x.dtype == torch.bfloat16:
        return torch.autocast(args.device.split(':')[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def inputs(shape, dtype: str, layout: str, device: str):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 2 + 1
    g = torch.randn(shape, generator=gen)
    x, g = x.to(device), g.to(device)
    if dtype == 'bf16':  # a conv output under bf16 autocast
        x, g = x.bfloat16(), g.bfloat16()
    if layout == 'cl':
        x = x.contiguous(memory_format=torch.channels_last)
        g = g.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(), g


def kernel_stats(step, x, g, args, iters: int = 10):
    """(GPU kernel ms, kernels) per iteration from torch.profiler; (None, None) on CPU."""
    if not args.device.startswith('cuda'):
        return None, None
    from torch.profiler import ProfilerActivity, profile
    sync(args.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step(x, g)
        sync(args.device)
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.time_range.elapsed_us() for e in events)
    return busy_us / 1000 / iters, len(events) / iters


def _ratio(v, base):
    return 'n/a' if v is None or not base else f'{v / base:.2f}'


def run(args):
    import robustbn  # noqa: F401
    if args.device.startswith('cuda'):
        torch.backends.cudnn.benchmark = True
    rows = []
    with one_rank_group(args.device) as group:
        for shape in args.shapes:
            for dtype in args.dtypes:
                for layout in args.layouts:
                    x, g = inputs(shape, dtype, layout, args.device)
                    steps = {name: make_step(name, shape[1], args, group)
                             for name in args.layers}
                    steps = {name: step for name, step in steps.items() if step is not None}
                    times = dict(zip(steps, wall_ms(list(steps.values()), x, g, args)))
                    base = None
                    for name, step in steps.items():
                        ms = times[name]
                        kms, count = kernel_stats(step, x, g, args)
                        row = dict(shape=list(shape), dtype=dtype, layout=layout, layer=name,
                                   wall_ms=ms, kernel_ms=kms, kernels=count)
                        if name == 'bn':
                            base = row
                        row['wall_vs_bn'] = ms / base['wall_ms'] if base else None
                        row['kernel_vs_bn'] = (kms / base['kernel_ms'] if base and kms
                                               and base['kernel_ms'] else None)
                        rows.append(row)
                        print(f'{shape} {dtype} {layout} {name}: {ms:.3f} ms', file=sys.stderr,
                              flush=True)
    return rows


def table(rows, args) -> str:
    lines = [f'Device: {device_name(args.device)}; {versions()}; estimator {args.estimator!r}; '
             f'median of {args.repeats} x {args.iters} iterations after {args.warmup} warm-up',
             '',
             '| shape (N,C,H,W) | dtype | layout | layer | eager ms / iter | x BN | '
             'GPU kernel ms / iter | x BN | kernels / iter |',
             '| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |']
    for r in rows:
        lines.append(f"| {','.join(map(str, r['shape']))} | {r['dtype']} | {r['layout']} | "
                     f"{LABELS[r['layer']]} | {r['wall_ms']:.3f} | "
                     f"{fmt(r['wall_vs_bn'], '.2f')} | {fmt(r['kernel_ms'])} | "
                     f"{fmt(r['kernel_vs_bn'], '.2f')} | {fmt(r['kernels'], '.0f')} |")
    return '\n'.join(lines)


def main(argv=None):
    return bench_main(parse_args, run, table, argv)


if __name__ == '__main__':
    main()
