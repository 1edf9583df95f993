# CPU speed and accuracy of the per-channel moments (mean, biased variance) a layer starts
# with: BatchNorm's statistics kernel (torch.batch_norm_update_stats, whose float32 CPU
# version accumulates in scalar float64) against the vectorized passes of
# robustbn.functional (mean; x - mean; sum of squares in BatchNorm's backward kernel), and
# which of the two the layers use by default for each shape. Also the largest relative
# error of each variance against float64. The two are timed in turns (repeat r of both,
# then repeat r+1). Use it to check the thresholds in robustbn.functional
# (_PASSES_MIN, _PASSES_PLANES, _PASSES_CHUNK) on another CPU.
#
#   python tools/benchmark_moments.py [--shapes hrnet resnet small | --shapes 2,18,128,256 ...]
#       [--repeats 7] [--min-seconds 0.05] [--out moments.json]
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/bench_common.py
from bench_common import SHAPES, bench_main, device_name, fmt, shapes_arg, versions  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'plugin'))

# around the thresholds: few values, small planes, (N, C) input
NAMED = dict(SHAPES, small=['2,18,32,32', '8,64,8,8', '256,64,2,2', '4096,16'])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Per-channel moments on CPU: kernel vs passes')
    parser.add_argument('--shapes', nargs='+', default=['hrnet', 'resnet', 'small'],
                        help="'hrnet', 'resnet', 'small' or comma-separated shapes (N,C,...)")
    parser.add_argument('--repeats', type=int, default=7, help='median over repeats')
    parser.add_argument('--min-seconds', type=float, default=0.05,
                        help='each repeat runs a variant at least this long')
    parser.add_argument('--out', default=None, help='also write the rows as JSON')
    args = parser.parse_args(argv)
    args.shapes = shapes_arg(parser, args.shapes, NAMED, form='N,C,...', four_d=False)
    args.device = 'cpu'
    return args


def _per_call_ms(fn, min_seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / n * 1000


def run(args):
    from robustbn import functional as F
    rows = []
    for shape in args.shapes:
        x = torch.randn(shape) * 3 + 10  # a mean several standard deviations from zero
        c, n = x.size(1), x.numel() // x.size(1)
        dims = [0] + list(range(2, x.dim()))
        variants = {'kernel': lambda: torch.batch_norm_update_stats(x, None, None, 0.0),
                    'passes': lambda: F._moments_by_passes(x, c, n)}
        want = torch.var_mean(x.double(), dims, correction=0)[0]
        err = {k: ((f()[1].double() - want).abs() / want).max().item()
               for k, f in variants.items()}
        times = {k: [] for k in variants}
        for _ in range(args.repeats):
            for k, f in variants.items():
                times[k].append(_per_call_ms(f, args.min_seconds))
        kernel, passes = (statistics.median(times[k]) for k in ('kernel', 'passes'))
        rows.append(dict(shape=','.join(map(str, shape)), kernel_ms=kernel, passes_ms=passes,
                         default='passes' if F._passes_apply(x) else 'kernel',
                         kernel_err=err['kernel'], passes_err=err['passes']))
    return rows


def table(rows, args) -> str:
    lines = [f'Device: {device_name("cpu")}; {versions()}; median of {args.repeats} repeats '
             f'of at least {args.min_seconds} s each, float32, mean 10, std 3',
             '| shape | kernel ms | passes ms | passes / kernel | default | '
             'variance rel. error, kernel | passes |',
             '| --- | ---: | ---: | ---: | --- | ---: | ---: |']
    for r in rows:
        lines.append(f"| {r['shape']} | {fmt(r['kernel_ms'])} | {fmt(r['passes_ms'])} | "
                     f"{r['passes_ms'] / r['kernel_ms']:.2f} | {r['default']} | "
                     f"{r['kernel_err']:.1e} | {r['passes_err']:.1e} |")
    return '\n'.join(lines)


def main(argv=None):
    return bench_main(parse_args, run, table, argv)


if __name__ == '__main__':
    main()
