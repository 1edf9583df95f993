# What tools/benchmark_norm.py and tools/benchmark_train.py share: device synchronization,
# the device and version line of their tables, number formatting and the run's main().
import json
import platform
from pathlib import Path

import torch


def sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


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
