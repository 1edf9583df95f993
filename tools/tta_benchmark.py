"""Test-time adaptation benchmark on Digits-C: methods x test batch sizes x protocols x seeds.

    python tools/tta_benchmark.py [--work-dir work_dirs/tta_benchmark] [--seeds 0 1 2]
        [--epochs 15] [--batch-sizes 2 4 8 16 64] [--methods source bn_adapt tent gprebn ...]
        [--protocols episodic continual] [--corruptions ...] [--severity 5]
        [--sweep-methods ...] [--severity-methods ...] [--workers 2] [--max-samples N]

Trains one source model per seed (``--train-config``, the digits ResNet9 with BN, as
tools/demo.py: mmengine's Runner, ``--epochs`` epochs, ``randomness.seed`` = the seed), then
runs every cell of the matrix with ``robustbn.openmmlab.tta.Adapter`` on the batches
``TestTimeAdaptLoop`` would see (``--config``'s test data set and evaluator, in order,
``DefaultSampler(shuffle=False)``):

- ``episodic``: a fresh adapter per corruption (one ``TestTimeAdaptLoop`` run per
  corruption, as tools/tta_test.py);
- ``continual``: one adapter for all corruptions in one stream, never reset (TENT's known
  failure mode); the error is still reported per corruption.

Methods are the names of ``VARIANTS`` (method, optimizer, GpreBN arguments): the paper
settings (TENT: Adam 1e-3; GpreBN: DELTA's SGD 2.5e-4 momentum 0.9), GpreBN's test-time
statistics options, a few ``theta``, James-Stein batch statistics, and learning rates for
the sweep (``--sweep-methods`` at ``--sweep-batch-size``, episodic, ``--severity``).
``--severity-methods`` also run at the other severities (``--severities``) at batch 64,
episodic. Each cell is saved as JSON under WORK_DIR/cells (a rerun skips the finished
ones); WORK_DIR gets ``tta_benchmark.json`` (every cell, the summaries, settings and
versions), ``tta_benchmark.md`` (tables: mean error over corruptions, mean and standard
deviation over seeds, 95% t-intervals of paired differences) and ``*.png`` plots.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import os
import os.path as osp
import platform
import sys
import time
from typing import Dict, List, Optional

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools'))

import torch  # noqa: E402

# Method variants: TestTimeAdaptLoop arguments (method, optimizer, norm_kwargs).
TENT_ADAM = dict(type='Adam', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)  # TENT paper
DELTA_SGD = dict(type='SGD', lr=2.5e-4, momentum=0.9)  # DELTA (GpreBN/TBR)


def _gprebn(lr=2.5e-4, **norm_kwargs) -> dict:
    return dict(method='gprebn', optimizer=dict(DELTA_SGD, lr=lr), norm_kwargs=norm_kwargs)


VARIANTS: Dict[str, dict] = {
    'source': dict(method='source'),
    'bn_adapt': dict(method='bn_adapt'),
    'tent': dict(method='tent', optimizer=TENT_ADAM),
    # GpreBN with the layer's defaults (target_init='first_batch', target_average='var')
    'gprebn': _gprebn(),
    'gprebn-init_source': _gprebn(target_init='source'),
    'gprebn-std': _gprebn(target_average='std'),
    'gprebn-init_source-std': _gprebn(target_init='source', target_average='std'),
    'gprebn-mom0.2': _gprebn(target_momentum=0.2),
    'gprebn-mom0.5': _gprebn(target_momentum=0.5),
    'gprebn-theta0.9': _gprebn(theta=0.9),
    'gprebn-theta0.5': _gprebn(theta=0.5),
    # James-Stein shrunk batch statistics (not a published method): Efron-Morris toward
    # the channels' grand mean with the sampling variances ('classic'), and the JS-BN
    # paper's estimator ('paper')
    'gprebn-js': _gprebn(batch_estimator='classic'),
    'gprebn-js_paper': _gprebn(batch_estimator='paper'),
    # learning-rate sweep
    'tent-lr1e-4': dict(method='tent', optimizer=dict(TENT_ADAM, lr=1e-4)),
    'tent-lr1e-2': dict(method='tent', optimizer=dict(TENT_ADAM, lr=1e-2)),
    'gprebn-lr2.5e-3': _gprebn(lr=2.5e-3),
    'gprebn-lr2.5e-2': _gprebn(lr=2.5e-2),
    'gprebn-lr0': _gprebn(lr=0.0),
}
PROTOCOLS = ('episodic', 'continual')
SWEEP = dict(tent=('tent-lr1e-4', 'tent', 'tent-lr1e-2'),
             gprebn=('gprebn-lr0', 'gprebn', 'gprebn-lr2.5e-3', 'gprebn-lr2.5e-2'))
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228}  # Student t quantiles for 95% two-sided intervals


def parse_args(argv=None):
    from robustbn.openmmlab.datasets import CORRUPTIONS
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--config', default=osp.join(ROOT, 'configs/tta/resnet9_digits-c_bn.py'),
                   help='test config: model, Digits-C test data set, evaluator')
    p.add_argument('--train-config', default=osp.join(ROOT, 'configs/cls/resnet9_digits_bn.py'))
    p.add_argument('--checkpoints', nargs='+',
                   help='source checkpoints (one per seed) instead of training them')
    p.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs/tta_benchmark'))
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--epochs', type=int, default=15, help='source training epochs')
    p.add_argument('--batch-sizes', nargs='+', type=int, default=[2, 4, 8, 16, 64])
    p.add_argument('--methods', nargs='+', choices=list(VARIANTS),
                   default=['source', 'bn_adapt', 'tent', 'gprebn', 'gprebn-js'],
                   help='run at every batch size')
    p.add_argument('--protocols', nargs='+', choices=PROTOCOLS, default=list(PROTOCOLS))
    p.add_argument('--continual-batch-sizes', nargs='+', type=int,
                   help='batch sizes of the continual protocol (default: --batch-sizes)')
    p.add_argument('--corruptions', nargs='+', choices=CORRUPTIONS, default=list(CORRUPTIONS))
    p.add_argument('--severity', type=int, default=5, help='severity of the main matrix')
    p.add_argument('--sweep-methods', nargs='*', choices=list(VARIANTS),
                   default=['gprebn-init_source', 'gprebn-std', 'gprebn-init_source-std',
                            'gprebn-theta0.9', 'gprebn-theta0.5', 'gprebn-js_paper',
                            *SWEEP['tent'], *SWEEP['gprebn']],
                   help='run at --sweep-batch-size only (episodic, --severity)')
    p.add_argument('--sweep-continual', nargs='*', choices=list(VARIANTS),
                   default=['gprebn-init_source', 'gprebn-std'],
                   help='run at --sweep-batch-size, continual')
    p.add_argument('--sweep-batch-size', type=int, default=64)
    p.add_argument('--severity-methods', nargs='*', choices=list(VARIANTS),
                   default=['source', 'bn_adapt', 'tent', 'gprebn'],
                   help='also at --severities, batch --sweep-batch-size, episodic')
    p.add_argument('--severities', nargs='*', type=int, default=[1, 2, 3, 4])
    p.add_argument('--max-samples', type=int, help='the first N test samples')
    p.add_argument('--workers', type=int, default=1, help='processes (one thread each)')
    p.add_argument('--save-predictions', action='store_true',
                   help="each sample's predicted label in the cells' JSON")
    p.add_argument('--aggregate-only', action='store_true',
                   help='run nothing: tables and plots from every cell in WORK_DIR/cells '
                   'that has the --corruptions (episodic: at least those; continual: exactly '
                   'that stream)')
    p.add_argument('--no-plots', action='store_true')
    args = p.parse_args(argv)
    if args.continual_batch_sizes is None:
        args.continual_batch_sizes = args.batch_sizes
    if args.checkpoints is not None and len(args.checkpoints) != len(args.seeds):
        p.error('--checkpoints needs one checkpoint per --seeds entry')
    for b in args.batch_sizes + args.continual_batch_sizes + [args.sweep_batch_size]:
        if b < 2:
            p.error('batch sizes must be >= 2 (batch statistics)')
    return args


# ------------------------------------------------------------------ source models
def train_source(train_config: str, work_dir: str, seed: int, epochs: int) -> str:
    """Train (or reuse) the source model of ``seed``; its checkpoint path."""
    from mmengine.config import Config
    from mmengine.runner import Runner
    out = osp.join(work_dir, 'source', f'seed{seed}')
    ckpt = osp.join(out, f'epoch_{epochs}.pth')
    if osp.isfile(ckpt):
        return ckpt
    cfg = Config.fromfile(train_config)
    cfg.work_dir = out
    cfg.train_cfg.max_epochs = epochs
    cfg.param_scheduler = dict(type='CosineAnnealingLR', T_max=epochs, by_epoch=True, begin=0,
                               end=epochs, convert_to_iter_based=True)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=epochs)
    cfg.randomness = dict(seed=seed)
    cfg.log_level = 'WARNING'
    cfg.experiment_name = f'seed{seed}'
    Runner.from_cfg(cfg).train()
    return ckpt


# ------------------------------------------------------------------ one cell
def build_model(cfg, checkpoint: str):
    """The model as ``Runner`` builds and loads it for testing."""
    from mmengine.registry import MODELS, DefaultScope
    from mmengine.runner import load_checkpoint
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope', 'mmengine')):
        model = MODELS.build(cfg.model)
    load_checkpoint(model, checkpoint, map_location='cpu', strict=False, logger='silent')
    return model.eval()


def test_batches(cfg, corruption: str, severity: int, batch_size: int,
                 max_samples: Optional[int] = None) -> list:
    """The batches ``TestTimeAdaptLoop`` gets: DefaultSampler(shuffle=False) order,
    mmengine's default ``pseudo_collate``, the last batch partial."""
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import DATASETS
    from tta_test import set_corruption
    ds_cfg = copy.deepcopy(cfg.test_dataloader.dataset)
    set_corruption(ds_cfg, corruption, severity)
    if max_samples is not None:
        ds_cfg['indices'] = max_samples
    ds = DATASETS.build(ds_cfg)
    samples = [ds[i] for i in range(len(ds))]
    return [pseudo_collate(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]


def _error(cfg, outputs_per_batch, batches) -> float:
    """100 - the config's evaluator's first metric (accuracy/top1), as the loop computes."""
    from mmengine.evaluator import Evaluator
    evaluator = Evaluator(copy.deepcopy(cfg.test_evaluator))
    n = 0
    for outputs, batch in zip(outputs_per_batch, batches):
        evaluator.process(data_samples=outputs, data_batch=batch)
        n += len(outputs)
    metrics = evaluator.evaluate(n)
    return 100.0 - float(metrics['accuracy/top1'])


def run_cell(cfg, checkpoint: str, variant: str, protocol: str, corruptions: List[str],
             severity: int, batch_size: int, max_samples: Optional[int] = None,
             predictions: bool = False) -> dict:
    """Errors (%) per corruption of one method on one source model, wall time, and with
    ``predictions`` the predicted labels per corruption."""
    from robustbn.openmmlab.tta import Adapter
    spec = VARIANTS[variant]
    model = build_model(cfg, checkpoint)
    start = time.time()
    errors, preds, adapter = {}, {}, None
    for corruption in corruptions:
        batches = test_batches(cfg, corruption, severity, batch_size, max_samples)
        if spec['method'] == 'source':
            with torch.no_grad():
                outputs = [model.test_step(b) for b in batches]
        else:
            if adapter is None or protocol == 'episodic':
                adapter = Adapter(model, spec['method'], optimizer=spec.get('optimizer'),
                                  norm_kwargs=spec.get('norm_kwargs'))
            outputs = [adapter.adapt(b) for b in batches]
        errors[corruption] = _error(cfg, outputs, batches)
        if predictions:
            preds[corruption] = [int(s.pred_label) for out in outputs for s in out]
    res = dict(errors=errors, seconds=round(time.time() - start, 2))
    if predictions:
        res['predictions'] = preds
    return res


# ------------------------------------------------------------------ the matrix
def cell_key(c: dict) -> str:
    return f"s{c['seed']}_{c['protocol']}_b{c['batch_size']}_sev{c['severity']}_{c['variant']}"


def plan(args) -> List[dict]:
    """The cells in the order they run: the main episodic matrix, then continual, then
    the sweep, then the other severities (a run cut short has the main results first);
    within a group the slowest (small batches, gradient methods) first."""
    groups = [[], [], [], []]
    seen = set()

    def add(group, seed, protocol, bs, sev, variant):
        if VARIANTS[variant]['method'] == 'source' and (protocol == 'continual' or
                                                        bs != args.sweep_batch_size):
            return  # source: no adaptation, the same at every batch size and protocol
        c = dict(seed=seed, protocol=protocol, batch_size=bs, severity=sev, variant=variant)
        if cell_key(c) not in seen:
            seen.add(cell_key(c))
            groups[group].append(c)
    for seed in args.seeds:
        for protocol in args.protocols:
            sizes = args.batch_sizes if protocol == 'episodic' else args.continual_batch_sizes
            for bs in sizes:
                for v in args.methods:
                    add(0 if protocol == 'episodic' else 1, seed, protocol, bs, args.severity, v)
        for v in args.sweep_methods or []:
            add(2, seed, 'episodic', args.sweep_batch_size, args.severity, v)
        if 'continual' in args.protocols:
            for v in args.sweep_continual or []:
                add(2, seed, 'continual', args.sweep_batch_size, args.severity, v)
        for sev in args.severities or []:
            for v in args.severity_methods or []:
                add(3, seed, 'episodic', args.sweep_batch_size, sev, v)
    return [c for g in groups for c in sorted(
        g, key=lambda c: (c['batch_size'], c['variant'] in ('source', 'bn_adapt')))]


def prepare_data(cfg_path: str, corruptions, severities) -> None:
    """Generate (and cache) the test sets once, before the workers read them."""
    from mmengine.config import Config
    from mmengine.registry import DATASETS
    from tta_test import set_corruption
    cfg = Config.fromfile(cfg_path)
    for corruption in corruptions:
        for sev in severities:
            ds_cfg = copy.deepcopy(cfg.test_dataloader.dataset)
            set_corruption(ds_cfg, corruption, sev)
            DATASETS.build(ds_cfg)


def finished_cells(cells_dir: str, corruptions: List[str]) -> List[dict]:
    """The cells saved in ``cells_dir`` that measured ``corruptions`` (continual: that
    stream, in that order)."""
    cells = []
    for name in sorted(os.listdir(cells_dir)):
        if not name.endswith('.json'):
            continue
        with open(osp.join(cells_dir, name)) as f:
            c = json.load(f)
        have = list(c['errors'])
        if c['protocol'] == 'continual' and have != list(corruptions):
            continue
        if set(corruptions) <= set(have):
            cells.append({k: c[k] for k in ('seed', 'protocol', 'batch_size', 'severity',
                                            'variant')})
    return cells


def _worker(job):
    cfg_path, ckpt, cell, corruptions, max_samples, predictions, out = job
    torch.set_num_threads(1)
    from mmengine.config import Config

    import robustbn  # noqa: F401  (registers the components)
    cfg = Config.fromfile(cfg_path)
    res = run_cell(cfg, ckpt, cell['variant'], cell['protocol'], corruptions,
                   cell['severity'], cell['batch_size'], max_samples, predictions)
    res.update(cell)
    tmp = out + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(res, f)
    os.replace(tmp, out)
    return cell_key(cell), res['seconds']


def _train_job(job):
    torch.set_num_threads(1)
    import robustbn  # noqa: F401
    return train_source(*job)


# ------------------------------------------------------------------ summaries
def _mean(xs):
    return sum(xs) / len(xs)


def _std(xs):
    if len(xs) < 2:
        return float('nan')
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def interval(xs) -> dict:
    """Mean, sample standard deviation and the 95% t-interval half width over ``xs``."""
    n = len(xs)
    sd = _std(xs)
    half = T975.get(n - 1, 1.96) * sd / math.sqrt(n) if n > 1 else float('nan')
    return dict(mean=_mean(xs), std=sd, ci95=half, n=n)


def summarize(cells: List[dict], corruptions: List[str]) -> dict:
    """Per (protocol, batch size, severity, variant): the mean error over corruptions of
    each seed, and their mean/std/95% interval over seeds."""
    groups: Dict[tuple, dict] = {}
    for c in cells:
        key = (c['protocol'], c['batch_size'], c['severity'], c['variant'])
        groups.setdefault(key, {})[c['seed']] = _mean([c['errors'][k] for k in corruptions])
    out = {}
    for (protocol, bs, sev, variant), per_seed in groups.items():
        seeds = sorted(per_seed)
        out[f'{protocol}|{bs}|{sev}|{variant}'] = dict(
            protocol=protocol, batch_size=bs, severity=sev, variant=variant,
            per_seed={str(s): per_seed[s] for s in seeds},
            **interval([per_seed[s] for s in seeds]))
    return out


def _lookup(cells, protocol, bs, sev, variant):
    return {c['seed']: c for c in cells if (c['protocol'], c['batch_size'], c['severity'],
                                            c['variant']) == (protocol, bs, sev, variant)}


def paired(cells, corruptions, protocol, bs, sev, a, b) -> Optional[dict]:
    """Error(a) - error(b), mean over corruptions, per seed: its 95% t-interval over seeds,
    and how many (seed, corruption) pairs a wins (lower error)."""
    ca = _lookup(cells, protocol, bs, sev, a)
    cb = _lookup(cells, protocol, bs, sev, b)
    seeds = sorted(set(ca) & set(cb))
    if not seeds:
        return None
    diffs = [_mean([ca[s]['errors'][k] - cb[s]['errors'][k] for k in corruptions])
             for s in seeds]
    pairs = [(ca[s]['errors'][k], cb[s]['errors'][k]) for s in seeds for k in corruptions]
    return dict(interval(diffs), wins=sum(x < y for x, y in pairs),
                losses=sum(x > y for x, y in pairs), pairs=len(pairs))


def _fmt(s: Optional[dict]) -> str:
    if s is None:
        return ''
    if s['n'] < 2:
        return f"{s['mean']:.1f}"
    return f"{s['mean']:.1f} ± {s['std']:.1f}"


def markdown(result: dict) -> str:
    cells, summary = result['cells'], result['summary']
    corruptions, sev = result['settings']['corruptions'], result['settings']['severity']
    lines = []

    def get(protocol, bs, s, v):
        return summary.get(f'{protocol}|{bs}|{s}|{v}')

    def table(protocol, variants, sizes, s):
        lines.append('| method | ' + ' | '.join(f'batch {b}' for b in sizes) + ' |')
        lines.append('| --- | ' + ' | '.join('---:' for _ in sizes) + ' |')
        for v in variants:
            row = [_fmt(get(protocol, b, s, v)) for b in sizes]
            if any(row):
                lines.append(f'| {v} | ' + ' | '.join(row) + ' |')
        lines.append('')

    st = result['settings']
    variants = [v for v in VARIANTS if any(c['variant'] == v for c in cells)]
    sizes = sorted({c['batch_size'] for c in cells if c['severity'] == sev})
    lines.append(f"Top-1 error (%) on Digits-C, mean over {len(corruptions)} corruptions, "
                 f"mean ± standard deviation over {len(st['seeds'])} source models "
                 f"(seeds {', '.join(map(str, st['seeds']))}).\n")
    for protocol in PROTOCOLS:
        if any(c['protocol'] == protocol for c in cells):
            what = ('reset per corruption' if protocol == 'episodic' else
                    'all corruptions in one stream, no reset')
            lines.append(f'**Severity {sev}, {protocol}** ({what}):\n')
            table(protocol, variants, sizes, sev)

    sevs = sorted({c['severity'] for c in cells})
    if len(sevs) > 1:
        b = st['sweep_batch_size']
        lines.append(f'**Severities, batch {b}, episodic:**\n')
        lines.append('| method | ' + ' | '.join(f'severity {s}' for s in sevs) + ' |')
        lines.append('| --- | ' + ' | '.join('---:' for _ in sevs) + ' |')
        for v in variants:
            row = [_fmt(get('episodic', b, s, v)) for s in sevs]
            if sum(bool(r) for r in row) > 1:
                lines.append(f'| {v} | ' + ' | '.join(row) + ' |')
        lines.append('')

    b = st['sweep_batch_size']
    base = [v for v in ('source', 'bn_adapt', 'tent', 'gprebn', 'gprebn-std',
                        'gprebn-init_source') if get('episodic', b, sev, v)]
    if base:
        lines.append(f'**Per corruption, severity {sev}, batch {b}, episodic** (mean over '
                     'seeds):\n')
        lines.append('| corruption | ' + ' | '.join(base) + ' |')
        lines.append('| --- | ' + ' | '.join('---:' for _ in base) + ' |')
        for k in corruptions:
            row = []
            for v in base:
                per = _lookup(cells, 'episodic', b, sev, v)
                row.append(f"{_mean([c['errors'][k] for c in per.values()]):.1f}")
            lines.append(f'| {k} | ' + ' | '.join(row) + ' |')
        lines.append('')

    comps = result['comparisons']
    if comps:
        lines.append('**Paired differences** (error of the first minus the second, mean over '
                     'corruptions; mean ± 95% t-interval over seeds; wins/losses of the first '
                     'over (seed, corruption) pairs):\n')
        lines.append('| protocol | batch | first | second | difference | wins / losses |')
        lines.append('| --- | ---: | --- | --- | ---: | ---: |')
        for c in comps:
            d = c['difference']
            ci = f" ± {d['ci95']:.2f}" if d['n'] > 1 else ''
            lines.append(f"| {c['protocol']} | {c['batch_size']} | {c['first']} | "
                         f"{c['second']} | {d['mean']:+.2f}{ci} | "
                         f"{d['wins']} / {d['losses']} of {d['pairs']} |")
        lines.append('')
    return '\n'.join(lines)


COMPARISONS = (('gprebn', 'tent'), ('gprebn', 'bn_adapt'), ('gprebn', 'gprebn-init_source'),
               ('gprebn-std', 'gprebn'), ('gprebn-js', 'gprebn'),
               ('gprebn-js_paper', 'gprebn'), ('gprebn-mom0.2', 'tent'), ('tent', 'bn_adapt'))


def comparisons(cells, corruptions, sev) -> List[dict]:
    out = []
    keys = sorted({(c['protocol'], c['batch_size']) for c in cells if c['severity'] == sev})
    for a, b in COMPARISONS:
        for protocol, bs in keys:
            d = paired(cells, corruptions, protocol, bs, sev, a, b)
            if d is not None:
                out.append(dict(protocol=protocol, batch_size=bs, first=a, second=b,
                                difference=d))
    return out


def plots(result: dict, work_dir: str) -> List[str]:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    summary, st = result['summary'], result['settings']
    sev, paths = st['severity'], []
    protocols = [p for p in PROTOCOLS if any(s['protocol'] == p for s in summary.values())]
    if protocols:
        fig, axes = plt.subplots(1, len(protocols), figsize=(6 * len(protocols), 4.2),
                                 squeeze=False, sharey=True)
        for ax, protocol in zip(axes[0], protocols):
            for v in VARIANTS:
                pts = sorted((s['batch_size'], s['mean'], s['std']) for s in summary.values()
                             if (s['protocol'], s['severity'], s['variant']) ==
                             (protocol, sev, v))
                if len(pts) > 1:
                    b, m, sd = zip(*pts)
                    ax.errorbar(b, m, yerr=[0 if math.isnan(x) else x for x in sd],
                                marker='o', capsize=3, label=v)
            ax.set(xscale='log', title=f'{protocol}, severity {sev}', xlabel='test batch size',
                   ylabel='top-1 error (%), mean over corruptions')
            ax.minorticks_off()  # the batch sizes as the only tick labels
            ax.set_xticks(st['batch_sizes'], [str(b) for b in st['batch_sizes']])
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.tight_layout()
        path = osp.join(work_dir, 'tta_benchmark_batch_size.png')
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    sweep = {}
    for name, variants in SWEEP.items():
        for v in variants:
            s = summary.get(f"episodic|{st['sweep_batch_size']}|{sev}|{v}")
            if s is not None:
                opt = VARIANTS[v]['optimizer']
                sweep.setdefault(name, []).append((opt['lr'], s['mean'], s['std']))
    if sweep:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for name, pts in sweep.items():
            lr, m, sd = zip(*sorted(p for p in pts if p[0] > 0))
            ax.errorbar(lr, m, yerr=sd, marker='o', capsize=3,
                        label=f"{name} ({VARIANTS[name]['optimizer']['type']})")
        ax.set(xscale='log', xlabel='learning rate', ylabel='top-1 error (%)',
               title=f"lr sweep, batch {st['sweep_batch_size']}, severity {sev}, episodic")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = osp.join(work_dir, 'tta_benchmark_lr.png')
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def versions() -> dict:
    import mmengine
    out = dict(python=platform.python_version(), torch=torch.__version__,
               mmengine=mmengine.__version__, machine=platform.machine(),
               cpus=os.cpu_count())
    for name in ('mmcv', 'albumentations', 'numpy', 'cv2', 'sklearn'):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    import robustbn  # noqa: F401
    work_dir = osp.abspath(args.work_dir)
    cells_dir = osp.join(work_dir, 'cells')
    os.makedirs(cells_dir, exist_ok=True)
    start = time.time()
    ctx = mp.get_context('spawn')
    pool = ctx.Pool(args.workers) if args.workers > 1 else None
    mapper = pool.imap_unordered if pool else map
    try:
        if args.checkpoints or args.aggregate_only:
            ckpts = dict(zip(args.seeds, args.checkpoints or [None] * len(args.seeds)))
        else:
            jobs = [(args.train_config, work_dir, s, args.epochs) for s in args.seeds]
            ckpts = dict(zip(args.seeds, (pool.map if pool else map)(_train_job, jobs)))
        print(f'source models ready ({time.time() - start:.0f} s)', flush=True)
        todo, cells = [], plan(args)
        if args.aggregate_only:
            cells = finished_cells(cells_dir, args.corruptions)
        else:
            prepare_data(args.config, args.corruptions, sorted({c['severity'] for c in cells}))
        for c in cells:
            out = osp.join(cells_dir, cell_key(c) + '.json')
            if not osp.isfile(out):
                todo.append((args.config, ckpts[c['seed']], c, args.corruptions,
                             args.max_samples, args.save_predictions, out))
        for i, (key, secs) in enumerate(mapper(_worker, todo)):
            print(f'[{i + 1}/{len(todo)}] {key}: {secs:.1f} s '
                  f'({time.time() - start:.0f} s total)', flush=True)
    finally:
        if pool:
            pool.close()
            pool.join()

    results = []
    for c in cells:
        with open(osp.join(cells_dir, cell_key(c) + '.json')) as f:
            results.append(json.load(f))
    settings = dict(config=args.config, train_config=args.train_config, seeds=args.seeds,
                    epochs=args.epochs, batch_sizes=args.batch_sizes, methods=args.methods,
                    continual_batch_sizes=args.continual_batch_sizes,
                    sweep_continual=args.sweep_continual,
                    protocols=args.protocols, corruptions=args.corruptions,
                    severity=args.severity, sweep_methods=args.sweep_methods,
                    sweep_batch_size=args.sweep_batch_size,
                    severity_methods=args.severity_methods, severities=args.severities,
                    max_samples=args.max_samples, checkpoints={str(k): v for k, v in ckpts.items()},
                    variants={v: VARIANTS[v] for v in sorted({c['variant'] for c in cells})})
    result = dict(settings=settings, versions=versions(), cells=results,
                  summary=summarize(results, args.corruptions),
                  comparisons=comparisons(results, args.corruptions, args.severity),
                  wall_seconds=round(time.time() - start, 1),
                  cell_seconds=round(sum(c['seconds'] for c in results), 1))
    with open(osp.join(work_dir, 'tta_benchmark.json'), 'w') as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    with open(osp.join(work_dir, 'tta_benchmark.md'), 'w') as f:
        f.write(text)
    if not args.no_plots:
        result['plots'] = plots(result, work_dir)
    print(text + f'\nwritten to {work_dir}/tta_benchmark.{{json,md}}')
    return result


if __name__ == '__main__':
    main()
