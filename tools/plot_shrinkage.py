"""Plot the shrinkage factors that ShrinkageMonitorHook logged in a run.

    python tools/plot_shrinkage.py WORK_DIR_OR_SCALARS_JSON [--out shrinkage.png]

Reads mmengine's ``vis_data/scalars.json`` (the newest run under a work dir) and draws,
for each factor, the mean over layers with its min-max band against the iteration.
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

FACTORS = ('mean_factor', 'var_factor', 'var_scale')


def find_scalars(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(path.glob('*/vis_data/scalars.json'), key=lambda p: p.stat().st_mtime)
    if not found:
        found = sorted(path.glob('**/scalars.json'), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f'no vis_data/scalars.json under {path}')
    return found[-1]


def load_series(scalars: Path):
    series = {}
    with open(scalars) as f:
        for line in f:
            rec = json.loads(line)
            if 'shrinkage/mean_factor' not in rec:
                continue
            for key, val in rec.items():
                if key.startswith('shrinkage/'):
                    series.setdefault(key, []).append((rec['step'], val))
    if not series:
        raise ValueError(f'{scalars} has no shrinkage/ scalars: was ShrinkageMonitorHook in '
                         'custom_hooks?')
    return series


def plot(series, out: Path, title: str = '') -> None:
    fig, axes = plt.subplots(1, len(FACTORS), figsize=(4.2 * len(FACTORS), 3.4))
    for ax, f in zip(axes, FACTORS):
        steps, mean = zip(*series[f'shrinkage/{f}'])
        _, lo = zip(*series[f'shrinkage/{f}_min'])
        _, hi = zip(*series[f'shrinkage/{f}_max'])
        ax.fill_between(steps, lo, hi, alpha=0.25, label='min-max over layers')
        ax.plot(steps, mean, label='mean over layers')
        ax.axhline(1.0, color='gray', lw=0.8, ls='--')
        ax.set_title(f)
        ax.set_xlabel('iteration')
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('path', type=Path, help='work dir of a run, or its scalars.json')
    parser.add_argument('--out', type=Path, default=None, help='PNG (default: next to the log)')
    args = parser.parse_args(argv)
    scalars = find_scalars(args.path)
    out = args.out or scalars.parent / 'shrinkage.png'
    plot(load_series(scalars), out, title=str(args.path))
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
