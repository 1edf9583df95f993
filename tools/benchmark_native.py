# What a native forward/backward would gain on CPU: JSBN2d ('paper', the lean default
# path) against the same layer with its per-call Python moved into one C++ call per
# direction (tools/native/paper_bn.cpp, compiled on first use with torch's
# cpp_extension: needs a C++ compiler and ninja), and nn.BatchNorm2d. The prototype runs
# the same full-tensor passes (BatchNorm's kernels, the float32 moments in passes where
# the layer uses them) and does the per-channel estimator math in plain loops, so the
# difference between the two is the layer's Python: the autograd Function body, the
# estimator's small C-vector ops and their host reads. Each shape first checks that the
# prototype gives JSBN2d's output, gradients and running statistics; the layers are then
# timed in turns (repeat r of every layer, then repeat r+1). A measurement, not a product
# path: float32 contiguous NCHW, local statistics, finite statistics, no guards.
#
#   python tools/benchmark_native.py [--shapes hrnet resnet | --shapes 2,144,16,32 ...]
#       [--iters 20] [--repeats 9] [--out native.json]
import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/bench_common.py
from bench_common import bench_main, device_name, fmt, shapes_arg, versions, wall_ms  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'plugin'))
from robustbn import JSBN2d, functional  # noqa: E402

SOURCE = Path(__file__).resolve().parent / 'native' / 'paper_bn.cpp'
LAYERS = ['bn', 'jsbn', 'native']
LABELS = {'bn': 'BatchNorm2d', 'jsbn': "JSBN2d 'paper'", 'native': 'C++ prototype'}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='JSBN2d vs a native prototype on CPU')
    parser.add_argument('--shapes', nargs='+', default=['hrnet'],
                        help="'hrnet', 'resnet' or N,C,H,W shapes")
    parser.add_argument('--iters', type=int, default=20, help='timed iterations per repeat')
    parser.add_argument('--repeats', type=int, default=9, help='median over repeats')
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--out', help='also write the rows as JSON here')
    args = parser.parse_args(argv)
    args.shapes = shapes_arg(parser, args.shapes, min_channels=3)
    args.device = 'cpu'
    return args


def load_extension():
    from torch.utils import cpp_extension
    # cpp_extension runs `ninja` from PATH: also find the one installed next to this Python
    # (the ninja package of requirements.lock) when its environment is not activated
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get('PATH', '').split(os.pathsep):
        os.environ['PATH'] = bin_dir + os.pathsep + os.environ.get('PATH', '')
    return cpp_extension.load('robustbn_paper_bn_prototype', [str(SOURCE)],
                              extra_cflags=['-O3'], verbose=False)


class _Native(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        y, m, v, mu, var, state = layer.ext.forward(
            x, weight, bias, layer.running_mean, layer.running_var, layer.momentum,
            layer.eps, functional._passes_apply(x))  # the moments the layer would use
        ctx.save_for_backward(x, weight, m, v, mu, var, state)
        ctx.ext, ctx.eps = layer.ext, layer.eps
        return y

    @staticmethod
    def backward(ctx, g):
        dx, dw, db = ctx.ext.backward(g.contiguous(), *ctx.saved_tensors, ctx.eps)
        return dx, dw, db, None


class NativeJSBN2d(nn.BatchNorm2d):
    """JSBN2d('paper') in training mode through the C++ prototype (``ext``)."""

    def __init__(self, num_features: int, ext) -> None:
        super().__init__(num_features)
        self.ext = ext

    def forward(self, x):
        self.num_batches_tracked.add_(1)
        return _Native.apply(x, self.weight, self.bias, self)


def _layers(c: int, ext) -> dict:
    return {'bn': nn.BatchNorm2d(c), 'jsbn': JSBN2d(c, estimator='paper'),
            'native': NativeJSBN2d(c, ext)}


def check_same(shape, ext) -> float:
    """Largest difference of output, gradients and running statistics between JSBN2d and
    the prototype on one batch, relative to each tensor's largest magnitude."""
    torch.manual_seed(0)
    x = torch.randn(shape) * 2 + 0.5
    g = torch.randn(shape)
    layers = _layers(shape[1], ext)
    outs = {}
    for name in ('jsbn', 'native'):
        layer = layers[name]
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
            layer.bias.copy_(torch.linspace(-0.2, 0.2, shape[1]))
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(g)
        outs[name] = [y, xi.grad, layer.weight.grad, layer.bias.grad, layer.running_mean,
                      layer.running_var]
    worst = 0.0
    for a, b in zip(outs['jsbn'], outs['native']):
        worst = max(worst, ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item())
    if not worst < 1e-4:
        raise RuntimeError(f'the prototype differs from JSBN2d at {shape}: {worst:.2e}')
    return worst


def run(args):
    ext = load_extension()
    rows = []
    for shape in args.shapes:
        err = check_same(shape, ext)
        x = torch.randn(shape, requires_grad=True)
        g = torch.randn(shape)
        layers = _layers(shape[1], ext)
        steps = [lambda x, g, layer=layer: layer(x).backward(g) for layer in layers.values()]
        ms = dict(zip(layers, wall_ms(steps, x, g, args)))
        rows.append(dict(shape=list(shape), max_rel_diff=err, ms=ms))
    return rows


def table(rows, args) -> str:
    head = ['shape', 'BatchNorm2d ms'] + [LABELS[n] for n in LAYERS[1:]] + ['max rel. diff']
    lines = [f'{device_name(args.device)}; {versions()}', '',
             '| ' + ' | '.join(head) + ' |',
             '| --- |' + ' ---: |' * (len(head) - 1)]
    for row in rows:
        bn = row['ms']['bn']
        cells = [','.join(map(str, row['shape'])), fmt(bn)]
        cells += [f"{fmt(row['ms'][n])} ({row['ms'][n] / bn:.2f}x)" for n in LAYERS[1:]]
        cells.append(f"{row['max_rel_diff']:.1e}")
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    return bench_main(parse_args, run, table, argv)


if __name__ == '__main__':
    main()
