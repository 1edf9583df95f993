# What the tools/benchmark_*.py scripts share: device synchronization, the device and
# version line of their tables, number formatting, the layer shapes, timing layers in
# turns and the run's main().
import json
import platform
import statistics
import time
from pathlib import Path

import torch

# Norm-layer inputs (N,C,H,W): HRNet-W18's branches at 512x1024, ResNet-50's at batch 64, 224
SHAPES = {'hrnet': ['2,18,128,256', '2,36,64,128', '2,72,32,64', '2,144,16,32'],
          'resnet': ['64,64,56,56', '64,256,56,56', '64,512,28,28', '64,1024,14,14',
                     '64,2048,7,7']}


def parse_shapes(names, named=SHAPES) -> list:
    """Shapes as int tuples from names (keys of ``named``) or comma-separated sizes;
    ValueError for anything else."""
    out = []
    for name in names:
        out += named.get(name, [name])
    return [tuple(int(v) for v in shape.split(',')) for shape in out]


def shapes_arg(parser, names, named=SHAPES, form='N,C,H,W', four_d=True, min_channels=1):
    """:func:`parse_shapes` for a script's ``--shapes``, or the parser's error: shapes
    written as ``form`` or named by a key of ``named``; ``four_d``: only N,C,H,W."""
    try:
        shapes = parse_shapes(names, named)
    except ValueError:
        parser.error(f"shapes are {form} (or {'/'.join(named)}), got {names}")
    if any((four_d and len(s) != 4) or len(s) < 2 or s[1] < min_channels for s in shapes):
        parser.error(f'shapes are N,C,H,W with C >= {min_channels}' if four_d else
                     f'shapes are N,C,... with C >= {min_channels}')
    return shapes


def sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def wall_ms(steps, x, g, args) -> list:
    """Median over repeats of the eager wall time per iteration of each step, the steps
    timed in turns."""
    for step in steps:
        for _ in range(args.warmup):
            step(x, g)
    times = [[] for _ in steps]
    for _ in range(args.repeats):
        for step, t in zip(steps, times):
            sync(args.device)
            start = time.perf_counter()
            for _ in range(args.iters):
                step(x, g)
            sync(args.device)
            t.append((time.perf_counter() - start) / args.iters * 1000)
    return [statistics.median(t) for t in times]


def device_name(device: str) -> str:
    if device.startswith('cuda'):
        return torch.cuda.get_device_name(torch.device(device))
    return f'CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)'


def versions(openmmlab: bool = False) -> str:
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = 'not installed'
    line = f'python {platform.python_version()}, torch {torch.__version__}, triton {tv}'
    if openmmlab:
        import mmcv
        import mmengine
        import mmseg
        line += (f', mmengine {mmengine.__version__}, mmcv {mmcv.__version__}, '
                 f'mmseg {mmseg.__version__}')
    return line


def fmt(v, spec='.3f') -> str:
    return 'n/a' if v is None else format(v, spec)


def bench_main(parse_args, run, table, argv=None, openmmlab: bool = False):
    """Parse, run, print the markdown table, write ``--out`` JSON; returns the rows."""
    args = parse_args(argv)
    rows = run(args)
    print(table(rows, args))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(device=device_name(args.device),
                                                  versions=versions(openmmlab), rows=rows),
                                             indent=2))
    return rows
