# Robustness benchmark of norm layers over seeds: the base config with its norm layers
# switched to BN or SyncJSBN with each estimator, trained once per (variant, seed) through
# tools/train.py (or the dist/slurm launchers), every final checkpoint evaluated on one
# matrix (clean, FGSM/PGD per eps, Cauchy/Gaussian noise per sigma, ImageNet-C corruptions
# per severity), then mean, std, t intervals and seed-paired differences to BN.
#
#   python tools/benchmark_robustness.py CONFIG [--variants BN paper paper_mean wacv classic]
#       [--seeds 0 1 2 3 4] [--eval clean fgsm pgd cauchy gaussian corruptions] [--eps 2 4 8]
#       [--sigmas 10 25 40 50 77] [--severities 1 2 3 4 5] [--epochs N] [--jobs N]
#       [--launcher none|pytorch|slurm] [--collect] [--dry-run] --work-dir DIR
import argparse
import copy
import json
import os
import os.path as osp
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pprint import pformat

import numpy as np

TOOLS = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(TOOLS)
sys.path.insert(0, TOOLS)  # run_common, adv_test, tta_test (when imported as a module)
import run_common  # noqa: E402
from adv_test import CLEAN, sweep_attacks  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from run_common import load_config  # noqa: E402

EVALS = ('clean', 'fgsm', 'pgd', 'cauchy', 'gaussian', 'corruptions')
DEFAULT_VARIANTS = ('BN', 'paper', 'paper_mean', 'wacv', 'classic')
BN = 'BN'
# norm_cfg keys every BatchNorm-like layer takes; the rest (estimator, eval_stats, ...) are
# dropped when a variant switches the layer type.
COMMON_NORM_KEYS = ('requires_grad', 'eps', 'momentum', 'affine', 'track_running_stats')
CONFIDENCE = 0.95


# ----------------------------------------------------------------------------- statistics
def t_quantile(p: float, dof: int) -> float:
    from scipy.stats import t  # scipy comes with scikit-learn (robustbn[openmmlab])
    return float(t.ppf(p, dof))


def interval(values, confidence: float = CONFIDENCE) -> dict:
    """n, mean, sample std (n-1) and the t interval of the mean with n-1 degrees of
    freedom (None for n < 2)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    out = dict(n=n, mean=float(x.mean()) if n else None, std=None, ci=None)
    if n >= 2:
        std = float(x.std(ddof=1))
        half = t_quantile(0.5 + confidence / 2, n - 1) * std / np.sqrt(n)
        out.update(std=std, ci=[out['mean'] - half, out['mean'] + half])
    return out


def paired(values: dict, reference: dict) -> dict:
    """Seed-paired differences ``values[s] - reference[s]`` over the seeds both have: their
    interval, and how many seeds favour each side (higher is better)."""
    seeds = sorted(set(values) & set(reference))
    d = [values[s] - reference[s] for s in seeds]
    out = interval(d)
    out.update(seeds=seeds, wins=sum(v > 0 for v in d), losses=sum(v < 0 for v in d),
               ties=sum(v == 0 for v in d))
    return out


def summarize(runs: dict, reference) -> dict:
    """``runs[variant][seed][metric]`` -> ``{metric: {variant: stats}}``; stats of a
    variant other than ``reference`` include ``diff``, the paired difference to it."""
    metrics = []
    for per_seed in runs.values():
        for values in per_seed.values():
            metrics += [m for m in values if m not in metrics]
    summary = {}
    for metric in metrics:
        summary[metric] = {}
        ref = {s: v[metric] for s, v in runs.get(reference, {}).items() if metric in v}
        for variant, per_seed in runs.items():
            values = {s: v[metric] for s, v in per_seed.items() if metric in v}
            stats = interval(list(values.values()))
            stats['values'] = values
            if variant != reference and ref:
                stats['diff'] = paired(values, ref)
            summary[metric][variant] = stats
    return summary


# ----------------------------------------------------------------------------- the matrix
def parse_variant(spec: str, estimators) -> tuple:
    """'paper' -> ('paper', 'paper'); 'label=classic' -> ('label', 'classic')."""
    label, _, kind = spec.partition('=')
    kind = kind or label
    if kind != BN and kind not in estimators:
        raise ValueError(f'unknown variant {spec!r}: use {BN} or a JS-BN estimator '
                         f'({", ".join(estimators)}), optionally as LABEL=KIND')
    if not label or '/' in label or label.startswith('.'):
        raise ValueError(f'bad variant label {label!r}')
    return label, kind


def norm_override(path: str, base: dict, kind: str, bn_type: str, js_type: str) -> dict:
    """The nested config dict that replaces the norm_cfg at ``path`` ('model.a.norm_cfg')."""
    new = dict(_delete_=True, type=bn_type if kind == BN else js_type)
    new.update({k: v for k, v in base.items() if k in COMMON_NORM_KEYS})
    if kind != BN:
        new['estimator'] = kind
    node = new
    for key in reversed(path.split('.')):
        node = {key: node}
    return node


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def epoch_options(cfg, epochs: int) -> list:
    """--cfg-options that train for ``epochs`` epochs with the schedule stretched to them."""
    old = cfg.train_cfg.get('max_epochs')
    if old is None:
        raise ValueError('--epochs needs an epoch-based train_cfg (max_epochs); give '
                         'train_cfg.max_iters in --cfg-options instead')
    opts = [f'train_cfg.max_epochs={epochs}']
    scheds = cfg.get('param_scheduler') or []
    single = isinstance(scheds, dict)
    for i, sched in enumerate([scheds] if single else scheds):
        prefix = 'param_scheduler.' + ('' if single else f'{i}.')
        for key in ('end', 'T_max'):
            if sched.get(key) == old:  # ends with training: follow the new length
                opts.append(f'{prefix}{key}={epochs}')
    return opts


def parse_options(options) -> dict:
    """'k=v' strings parsed as tools/train.py parses --cfg-options."""
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args(['--cfg-options', *options]).cfg_options if options else None


def load_run_config(config: str, options, work_dir=None):
    args = argparse.Namespace(launcher='none', cfg_options=parse_options(options),
                              work_dir=work_dir)
    return load_config(config, args)


def final_checkpoint(cfg) -> str:
    """File name of the checkpoint CheckpointHook writes at the end of training."""
    train_cfg = cfg.train_cfg
    if train_cfg.get('by_epoch') or 'max_epochs' in train_cfg:
        return f"epoch_{train_cfg['max_epochs']}.pth"
    return f"iter_{train_cfg['max_iters']}.pth"


def eval_matrix(args, metric_hint=None) -> dict:
    """The attacks (adv_test.py's sweep: 'clean', FGSM/PGD per eps, noise per sigma) and the
    corruptions x severities every checkpoint is evaluated on."""
    # Clean images are always evaluated: the eps/sigma 0 point of every curve.
    sweep = argparse.Namespace(
        attacks=[a for a in ('FGSM', 'PGD') if a.lower() in args.eval],
        eps=[0] + list(args.eps), pgd_steps=args.pgd_steps, pgd_alpha=args.pgd_alpha,
        noise=[n for n in ('cauchy', 'gaussian') if n in args.eval],
        sigmas=[0] + list(args.sigmas))
    attacks, curves = sweep_attacks(sweep)
    corruptions = list(args.corruptions) if 'corruptions' in args.eval else []
    return dict(attacks=attacks, curves={k: [[x, n] for x, n in pts] for k, pts in curves.items()},
                corruptions=corruptions, severities=list(args.severities),
                max_samples=args.max_samples, seed=args.attack_seed, metric=args.metric)


def corruption_key(corruption: str, severity: int) -> str:
    return f'{corruption}_s{severity}'


# ----------------------------------------------------------------------------- evaluation
def corrupted_loader_cfg(loader_cfg: dict, corruption: str, severity: int, seed: int) -> dict:
    """The test dataloader config with ``corruption`` at ``severity``: set where the data
    set takes it (CIFAR10C, an ImageNetCorruption step), else an ImageNetCorruption step
    (fixed seed: the same corrupted images for every checkpoint) inserted after the
    pipeline's last loading step, on the image as loaded."""
    from tta_test import set_corruption

    cfg = copy.deepcopy(loader_cfg)
    try:
        set_corruption(cfg['dataset'], corruption, severity)
        return cfg, False
    except ValueError:
        pipeline = list(cfg['dataset'].get('pipeline') or [])
        loads = [i for i, t in enumerate(pipeline) if str(t.get('type', '')).startswith('Load')]
        at = loads[-1] + 1 if loads else 0
        pipeline.insert(at, dict(type='ImageNetCorruption', corruption=corruption,
                                 severity=severity, seed=seed))
        cfg['dataset']['pipeline'] = pipeline
    return cfg, True


def corrupted_loader(loader_cfg, test_set, corruption, severity, seed):
    """The dataloader of ``corrupted_loader_cfg``; when only the pipeline changes, the
    already loaded test set with that pipeline (loading it again for each of the 55
    corruption conditions would cost more than evaluating them)."""
    from mmengine.dataset import BaseDataset, Compose
    from mmengine.runner import Runner

    cfg, pipeline_only = corrupted_loader_cfg(loader_cfg, corruption, severity, seed)
    if pipeline_only and isinstance(test_set, BaseDataset):  # not a dataset wrapper
        dataset = copy.copy(test_set)  # shares the loaded samples, read only
        dataset.pipeline = Compose(cfg['dataset']['pipeline'])
        cfg = dict(cfg, dataset=dataset)
    return Runner.build_dataloader(cfg)


def write_json(path: str, data) -> None:
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)  # a crash never leaves a half-written file


def evaluate_run(run_dir: str, matrix: dict) -> None:
    """Evaluate a run's final checkpoint on ``matrix`` into RUN_DIR/eval.json; what that
    file already holds for this checkpoint is kept (results are saved after each group)."""
    from robustbn.openmmlab.adversarial.attacks import attack_name
    from robustbn.openmmlab.adversarial.evaluate import evaluate_attacks

    spec = json.load(open(osp.join(run_dir, 'run.json')))
    ckpt = osp.join(run_dir, spec['checkpoint'])
    out = osp.join(run_dir, 'eval.json')
    stamp = osp.getmtime(ckpt)
    done = json.load(open(out)) if osp.exists(out) else {}
    if done.get('checkpoint_mtime') != stamp:  # the run was trained again
        done = {}
    results = done.get('results', {})

    cfg = load_run_config(spec['config'], spec['cfg_options'], osp.join(run_dir, 'eval_logs'))
    cfg.load_from, cfg.resume = None, False
    cfg.experiment_name = f'eval_{time.strftime("%Y%m%d_%H%M%S")}'
    runner = run_common.build_runner(cfg)
    runner.load_checkpoint(ckpt, map_location='cpu', strict=True)
    loop = runner.test_loop

    def save():
        write_json(out, dict(checkpoint=ckpt, checkpoint_mtime=stamp, results=results))

    def run_attacks(loader, attacks):
        metrics = evaluate_attacks(runner.model, loader, loop.evaluator, attacks,
                                   matrix['max_samples'], matrix['seed'])
        for a in attacks:
            name = attack_name(a)
            results[name] = {k[len(f'adv/{name}/'):]: float(v) for k, v in metrics.items()
                             if k.startswith(f'adv/{name}/')}
        save()

    todo = [a for a in matrix['attacks'] if attack_name(a) not in results]
    if todo:
        run_attacks(loop.dataloader, todo)
    for corruption in matrix['corruptions']:
        for severity in matrix['severities']:
            key = corruption_key(corruption, severity)
            if key in results:
                continue
            loader = corrupted_loader(cfg.test_dataloader, loop.dataloader.dataset, corruption,
                                      severity, matrix['seed'])
            run_attacks(loader, [dict(type='VANILA', name=key)])  # VANILA: the images as given
    save()


# ----------------------------------------------------------------------------- runs
class Run:
    def __init__(self, variant, kind, seed, work_dir, config, options, checkpoint):
        self.variant, self.kind, self.seed = variant, kind, seed
        self.dir = osp.join(work_dir, 'runs', variant, f'seed{seed}')
        self.config, self.options, self.checkpoint = config, options, checkpoint

    @property
    def name(self):
        return f'{self.variant} seed {self.seed}'

    def trained(self) -> bool:
        from robustbn.openmmlab.resume import checkpoint_problem
        return checkpoint_problem(osp.join(self.dir, self.checkpoint)) is None

    def evaluated(self, matrix) -> bool:
        path = osp.join(self.dir, 'eval.json')
        if not (self.trained() and osp.exists(path)):
            return False
        done = json.load(open(path))
        if done.get('checkpoint_mtime') != osp.getmtime(osp.join(self.dir, self.checkpoint)):
            return False
        return set(expected_keys(matrix)) <= set(done.get('results', {}))

    def write_spec(self):
        os.makedirs(self.dir, exist_ok=True)
        write_json(osp.join(self.dir, 'run.json'), dict(
            variant=self.variant, kind=self.kind, seed=self.seed, config=self.config,
            cfg_options=self.options, checkpoint=self.checkpoint))


def expected_keys(matrix) -> list:
    from robustbn.openmmlab.adversarial.attacks import attack_name
    return [attack_name(a) for a in matrix['attacks']] + [
        corruption_key(c, s) for c in matrix['corruptions'] for s in matrix['severities']]


def train_command(run: Run, args, slot: int):
    """(env additions, argv) that train ``run`` with the chosen launcher."""
    opts = ['--work-dir', run.dir, '--cfg-options', *run.options]
    if args.launcher == 'slurm':
        env = dict(GPUS=args.gpus, GPUS_PER_NODE=min(args.gpus, args.gpus_per_node))
        job = f'rbn_{run.variant}_s{run.seed}'
        return env, ['bash', osp.join(TOOLS, 'slurm_train.sh'), args.partition, job,
                     run.config, *opts]
    if args.launcher == 'pytorch':
        # Concurrent torchrun jobs on one node need distinct rendezvous ports.
        return dict(PORT=args.port + slot), ['bash', osp.join(TOOLS, 'dist_train.sh'),
                                             run.config, str(args.gpus), *opts]
    return {}, [sys.executable, osp.join(TOOLS, 'train.py'), run.config, *opts]


def quote(argv) -> str:
    return ' '.join(shlex.quote(str(a)) for a in argv)


def subprocess_env(args, extra) -> dict:
    env = dict(os.environ)
    plugin = osp.join(ROOT, 'plugin')
    env['PYTHONPATH'] = os.pathsep.join([plugin] + ([env['PYTHONPATH']] if env.get('PYTHONPATH')
                                                    else []))
    env.setdefault('PYTHON', sys.executable)  # what the launcher scripts run
    if args.threads:
        env['OMP_NUM_THREADS'] = str(args.threads)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def plan(args, estimators):
    """Variant configs (written to WORK_DIR/configs) and the runs; every config loaded and
    its norm types checked, so bad input fails before any training."""
    variants = {}
    for spec in args.variants:
        label, kind = parse_variant(spec, estimators)
        if label in variants:
            raise ValueError(f'variant {label!r} given twice')
        variants[label] = dict(kind=kind, cfg_options=[])
    for label, *opts in args.variant_options or []:
        if label not in variants:
            raise ValueError(f'--variant-options {label}: not among --variants {list(variants)}')
        parse_options(opts)
        variants[label]['cfg_options'] += opts
    if not args.seeds:
        raise ValueError('--seeds is empty: give at least one seed')
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f'--seeds has repeated seeds: {args.seeds}')

    base_opts = list(args.cfg_options or [])
    base = load_run_config(args.config, base_opts)
    norms = [(p, t) for p, t in run_common._norm_cfgs(base.get('model') or {}, 'model')]
    if not norms:
        raise ValueError(f'{args.config}: no norm_cfg under model: the variants switch the '
                         'norm layers through norm_cfg (e.g. model.backbone.norm_cfg)')
    listed = [p for p, _ in norms if '[' in p]
    if listed:
        raise ValueError(f'{args.config}: norm_cfg inside a list ({listed[0]}) is not supported')
    if args.epochs is not None:
        base_opts = epoch_options(base, args.epochs) + base_opts

    config_dir = osp.join(args.work_dir, 'configs')
    os.makedirs(config_dir, exist_ok=True)
    base_path = osp.abspath(args.config) if osp.exists(args.config) else args.config
    runs = []
    for label, v in variants.items():
        override = {}
        for path, _ in norms:
            node = base
            for key in path.split('.'):
                node = node[key]
            override = merge(override, norm_override(path, node, v['kind'], args.bn_type,
                                                     args.js_type))
        text = (f'# {label}: {args.config} with its norm layers switched '
                f'(tools/benchmark_robustness.py)\n_base_ = [{base_path!r}]\n')
        text += ''.join(f'{k} = {pformat(val, width=90)}\n' for k, val in override.items())
        path = osp.join(config_dir, f'{label}.py')
        if not (osp.exists(path) and open(path).read() == text):
            with open(path, 'w') as f:
                f.write(text)
        options = base_opts + v['cfg_options']
        cfg = load_run_config(path, options)  # norm types checked here
        ckpt = final_checkpoint(cfg)
        v['config'] = path
        for seed in args.seeds:
            runs.append(Run(label, v['kind'], seed, osp.abspath(args.work_dir), path,
                            options + [f'randomness.seed={seed}'], ckpt))
    return variants, runs


# ----------------------------------------------------------------------------- results
def run_values(run_dir: str, matrix: dict) -> dict:
    """{metric name: value} of one run: accuracy-like metric per attack, and per corruption
    the error (100 - metric) per severity and its mean over severities."""
    from robustbn.openmmlab.adversarial.attacks import attack_name
    results = json.load(open(osp.join(run_dir, 'eval.json')))['results']
    metric = matrix['metric']
    if metric is None:
        keys = list(results.get(CLEAN) or next(iter(results.values())))
        metric = 'accuracy/top1' if 'accuracy/top1' in keys else \
            'mIoU' if 'mIoU' in keys else keys[0]
    out = {attack_name(a): results[attack_name(a)][metric] for a in matrix['attacks']}
    means = []
    for c in matrix['corruptions']:
        errors = [100 - results[corruption_key(c, s)][metric] for s in matrix['severities']]
        out.update({f'error/{corruption_key(c, s)}': e
                    for s, e in zip(matrix['severities'], errors)})
        out[f'error/{c}'] = float(np.mean(errors))
        means.append(out[f'error/{c}'])
    if means:
        out['error/mean'] = float(np.mean(means))
    return out, metric


def fmt(x, digits=2):
    return '–' if x is None else f'{x:.{digits}f}'


def cell(stats) -> str:
    return f"{fmt(stats['mean'])} ± {fmt(stats['std'])}" if stats['std'] is not None else \
        fmt(stats['mean'])


def diff_cell(d, lower_is_better=False) -> str:
    if d['n'] == 0:
        return '–'
    wins, losses = (d['losses'], d['wins']) if lower_is_better else (d['wins'], d['losses'])
    ci = d['ci']
    text = f"{d['mean']:+.2f}"
    if ci is not None:
        text += f' [{ci[0]:+.2f}, {ci[1]:+.2f}]'
        if ci[0] > 0 or ci[1] < 0:
            text = f'**{text}**'  # the interval excludes 0
    return f'{text} {wins}/{losses}'


def columns(matrix) -> list:
    """(table title, [(metric key, column title)], lower is better)."""
    cols = []
    curves = matrix['curves']
    adv = [(CLEAN, 'clean')]
    for kind in ('FGSM', 'PGD'):
        adv += [(n, f'{kind} {x:g}') for x, n in curves.get(kind, []) if n != CLEAN]
    if adv:
        cols.append(('Accuracy: clean and adversarial (eps in 0-255 pixels)', adv, False))
    noise = []
    for kind in ('CauchyNoise', 'GaussianNoise'):
        noise += [(n, f'{kind[:-5]} {x:g}') for x, n in curves.get(kind, []) if n != CLEAN]
    if noise:
        cols.append(('Accuracy under noise (sigma in 0-255 pixels)', noise, False))
    if matrix['corruptions']:
        cols.append(('Corruption error (100 - accuracy), mean over severities '
                     + ', '.join(map(str, matrix['severities'])),
                     [(f'error/{c}', c) for c in matrix['corruptions']]
                     + [('error/mean', 'mean')], True))
    return cols


def report(table: dict) -> str:
    matrix, summary, reference = table['matrix'], table['summary'], table['reference']
    variants = list(table['variants'])
    lines = [f"# Robustness benchmark: {table['config']}", '',
             f"Metric: `{table['metric']}` (%) per (variant, seed) on the test data; "
             f"{len(table['seeds'])} seeds ({', '.join(map(str, table['seeds']))}). "
             'Cells: mean ± sample std over seeds. Differences: seed-paired difference to '
             f"{reference} (variant minus {reference} for accuracy, so > 0 is better; for "
             'errors, > 0 is worse), its 95 % t interval (n-1 degrees of freedom) in '
             'brackets, bold when the interval excludes 0, then seeds better/worse than '
             f'{reference}.', '']
    for title, cols, lower in columns(matrix):
        cols = [(k, c) for k, c in cols if k in summary]
        if not cols:
            continue
        head = '| variant | ' + ' | '.join(c for _, c in cols) + ' |'
        rule = '| --- |' + ' --- |' * len(cols)
        lines += [f'## {title}', '', head, rule]
        for v in variants:
            lines.append(f'| {v} | ' + ' | '.join(
                cell(summary[k][v]) if v in summary[k] else '–' for k, _ in cols) + ' |')
        diffs = [v for v in variants if v != reference]
        if reference in variants and diffs:
            lines += ['', f'Paired difference to {reference}:', '', head, rule]
            for v in diffs:
                lines.append(f'| {v} | ' + ' | '.join(
                    diff_cell(summary[k][v]['diff'], lower) if 'diff' in summary[k].get(v, {})
                    else '–' for k, _ in cols) + ' |')
        lines.append('')
    missing = table.get('missing') or []
    if missing:
        lines += [f"Missing runs (not in the statistics): {', '.join(missing)}", '']
    return '\n'.join(lines)


def plot(table: dict, work_dir: str) -> list:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    matrix, summary = table['matrix'], table['summary']
    variants = list(table['variants'])
    paths = []
    curves = {k: v for k, v in matrix['curves'].items() if v}
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(4.4 * len(curves), 3.6),
                                 squeeze=False)
        for ax, (kind, points) in zip(axes[0], curves.items()):
            for v in variants:
                xs, mean, lo, hi = [], [], [], []
                for x, name in points:
                    s = summary.get(name, {}).get(v)
                    if s is None:
                        continue
                    ci = s['ci'] or [s['mean'], s['mean']]
                    xs.append(x), mean.append(s['mean']), lo.append(ci[0]), hi.append(ci[1])
                line, = ax.plot(xs, mean, marker='o', ms=3, label=v)
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
            noise = kind.endswith('Noise')
            ax.set(title=kind, ylabel=f"{table['metric']} (%)",
                   xlabel='sigma (0-255 pixels)' if noise else 'eps (0-255 pixels)')
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle('mean over seeds, band: 95 % t interval', fontsize=9)
        fig.tight_layout()
        paths.append(osp.join(work_dir, 'accuracy_vs_eps.png'))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    names = [c for c in matrix['corruptions'] if f'error/{c}' in summary] + \
        (['mean'] if 'error/mean' in summary else [])
    if names:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) * len(variants) / 3), 3.8))
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            stats = [summary[f'error/{c}'].get(v) for c in names]
            mean = [s['mean'] if s else np.nan for s in stats]
            err = [[s['mean'] - s['ci'][0] if s and s['ci'] else 0 for s in stats],
                   [s['ci'][1] - s['mean'] if s and s['ci'] else 0 for s in stats]]
            ax.bar(np.arange(len(names)) + (i - (len(variants) - 1) / 2) * width, mean, width,
                   yerr=err, capsize=2, label=v)
        ax.set_xticks(np.arange(len(names)), [n.replace('_', '\n') for n in names], fontsize=7)
        ax.set(ylabel='error (%)', title='corruption error, mean over severities '
               '(bars: 95 % t interval over seeds)')
        ax.grid(axis='y', alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(osp.join(work_dir, 'corruption_error.png'))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def aggregate(args, variants, runs, matrix) -> dict:
    per_run, missing, metric = {}, [], None
    for run in runs:
        if run.evaluated(matrix):
            values, metric = run_values(run.dir, matrix)
            per_run.setdefault(run.variant, {})[run.seed] = values
        else:
            missing.append(run.name)
    reference = args.reference or next((v for v, s in variants.items() if s['kind'] == BN),
                                       None)
    table = dict(config=args.config, command=quote([osp.relpath(sys.argv[0])] + sys.argv[1:]),
                 metric=metric, reference=reference, seeds=list(args.seeds),
                 interval=f'{CONFIDENCE:.0%} t interval of the mean, n-1 degrees of freedom; '
                 'paired: of the seed-wise differences to the reference',
                 variants={v: dict(kind=s['kind'], config=s['config'],
                                   cfg_options=s['cfg_options']) for v, s in variants.items()},
                 matrix=matrix,
                 runs={v: {str(s): vals for s, vals in d.items()} for v, d in per_run.items()},
                 summary={}, missing=missing)
    table['summary'] = {m: {v: dict(s, values={str(k): x for k, x in s['values'].items()})
                            for v, s in per_var.items()}
                        for m, per_var in summarize(per_run, reference).items()}
    return table


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Robustness benchmark of norm layers over seeds')
    p.add_argument('config', nargs='?', help='base config (its norm_cfg layers are switched)')
    p.add_argument('--variants', nargs='+', default=list(DEFAULT_VARIANTS),
                   help=f'{BN} or a JS-BN estimator, or LABEL=KIND (default: %(default)s)')
    p.add_argument('--variant-options', nargs='+', action='append', metavar='LABEL K=V',
                   help='--cfg-options of one variant (repeatable): LABEL k=v [k=v ...]')
    p.add_argument('--seeds', nargs='*', type=int, default=[0, 1, 2, 3, 4])
    p.add_argument('--eval', nargs='+', choices=EVALS, default=list(EVALS))
    p.add_argument('--eps', nargs='+', type=float, default=[2, 4, 8],
                   help='FGSM/PGD Linf budgets in 0-255 pixel units')
    p.add_argument('--pgd-steps', type=int, default=10)
    p.add_argument('--pgd-alpha', type=float, help='PGD step in pixels (default 2.5 eps/steps)')
    p.add_argument('--sigmas', nargs='+', type=float, default=[10, 25, 40, 50, 77],
                   help='Cauchy/Gaussian noise scales in 0-255 pixel units')
    p.add_argument('--corruptions', nargs='+', help='ImageNet-C corruptions (default: all '
                   'robustbn.openmmlab.datasets.CORRUPTIONS)')
    p.add_argument('--severities', nargs='+', type=int, default=[1, 2, 3, 4, 5])
    p.add_argument('--max-samples', type=int, help='evaluate the first N test samples')
    p.add_argument('--metric', help='evaluator metric (default accuracy/top1, else mIoU, '
                   'else the first)')
    p.add_argument('--attack-seed', type=int, default=0,
                   help='seeds random starts, noise and corruptions (the same for every run)')
    p.add_argument('--epochs', type=int, help='train this many epochs (the schedule follows)')
    p.add_argument('--cfg-options', nargs='+', metavar='K=V',
                   help='overrides of every run (as tools/train.py --cfg-options)')
    p.add_argument('--bn-type', default='BN', help='norm type of the BN variant (SyncBN for '
                   'multi-GPU runs, so both sides normalize over the global batch)')
    p.add_argument('--js-type', default='SyncJSBN', help='norm type of the JS-BN variants')
    p.add_argument('--reference', help='variant the paired differences are to (default: BN)')
    p.add_argument('--work-dir', required=False, help='runs, results.json, report.md, plots')
    p.add_argument('--jobs', type=int, default=1, help='runs (train, then evaluate) at once')
    p.add_argument('--threads', type=int, help='OpenMP threads per process (default: CPU '
                   'cores / jobs; with Slurm: unset)')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                   help='train each run with tools/train.py, dist_train.sh or slurm_train.sh')
    p.add_argument('--gpus', type=int, default=1, help='processes per run (pytorch, slurm)')
    p.add_argument('--gpus-per-node', type=int, default=8)
    p.add_argument('--partition', help='Slurm partition (--launcher slurm)')
    p.add_argument('--port', type=int, default=29500, help='first rendezvous port (pytorch)')
    p.add_argument('--train-only', action='store_true',
                   help='train, evaluate nothing (e.g. Slurm; then --collect)')
    p.add_argument('--collect', action='store_true',
                   help='train nothing: evaluate finished runs and aggregate them')
    p.add_argument('--dry-run', action='store_true',
                   help='print the training commands of unfinished runs, run nothing')
    # internal: evaluate one run dir on a matrix file (the subprocess of each evaluation)
    p.add_argument('--eval-run', help=argparse.SUPPRESS)
    p.add_argument('--matrix', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.eval_run:
        return args
    if args.config is None or args.work_dir is None:
        p.error('CONFIG and --work-dir are required')
    if args.launcher == 'slurm' and not args.partition:
        p.error('--launcher slurm needs --partition')
    if args.jobs < 1 or args.gpus < 1:
        p.error('--jobs and --gpus must be >= 1')
    if args.threads is None and args.launcher != 'slurm':  # Slurm jobs: the cluster's cores
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    from robustbn.openmmlab.datasets import CORRUPTIONS
    args.corruptions = args.corruptions or list(CORRUPTIONS)
    bad = [c for c in args.corruptions if c not in CORRUPTIONS]
    if bad:
        p.error(f'--corruptions: unknown {bad}; choose from {list(CORRUPTIONS)}')
    if any(not 1 <= s <= 5 for s in args.severities):
        p.error('--severities must be in 1..5')
    try:
        from robustbn.openmmlab.adversarial.attacks import check_attacks
        check_attacks(eval_matrix(args)['attacks'])
    except ValueError as e:
        p.error(str(e))
    return args, p


class Progress:
    """One line per run state change, and a bar over the matrix."""

    def __init__(self, total):
        from tqdm import tqdm
        self.bar = tqdm(total=total, unit='run', desc='matrix', file=sys.stderr)
        self.lock = threading.Lock()

    def line(self, run, state, seconds=None, done=False):
        with self.lock:
            t = '' if seconds is None else f' {seconds:.1f} s'
            self.bar.write(f'{run.variant:>12} seed {run.seed:<3} {state}{t}')
            if done:
                self.bar.update(1)


def process(run, args, matrix, matrix_path, progress, slot) -> bool:
    """Train (unless finished) and evaluate (unless done) one run: True when it is done,
    False when it failed, None when --collect finds it unfinished."""
    if not args.collect:
        if not run.trained():
            env, cmd = train_command(run, args, slot)
            progress.line(run, 'training')
            start = time.time()
            with open(osp.join(run.dir, 'train.log'), 'w') as log:
                rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     env=subprocess_env(args, env))
            if rc != 0 or not run.trained():
                progress.line(run, f'training failed (exit {rc}; '
                              f'{osp.join(run.dir, "train.log")})', time.time() - start, True)
                return False
            progress.line(run, 'trained', time.time() - start)
        else:
            progress.line(run, 'trained (kept)')
    elif not run.trained():
        progress.line(run, 'not finished', done=True)
        return None
    if args.train_only:
        progress.line(run, 'done (not evaluated: --train-only)', done=True)
        return True
    if run.evaluated(matrix):
        progress.line(run, 'evaluated (kept)', done=True)
        return True
    start = time.time()
    progress.line(run, 'evaluating')
    cmd = [sys.executable, osp.abspath(__file__), '--eval-run', run.dir, '--matrix',
           matrix_path]
    with open(osp.join(run.dir, 'eval.log'), 'w') as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT,
                             env=subprocess_env(args, {}))
    ok = rc == 0 and run.evaluated(matrix)
    progress.line(run, 'evaluated' if ok else
                  f'evaluation failed (exit {rc}; {osp.join(run.dir, "eval.log")})',
                  time.time() - start, True)
    return ok


def main(argv=None) -> int:
    parsed = parse_args(argv)
    if not isinstance(parsed, tuple):  # --eval-run RUN_DIR --matrix MATRIX_JSON
        evaluate_run(parsed.eval_run, json.load(open(parsed.matrix)))
        return 0
    args, parser = parsed
    import robustbn
    estimators = [e for e in robustbn.ESTIMATORS]
    args.work_dir = osp.abspath(args.work_dir)
    try:
        variants, runs = plan(args, estimators)
    except (ValueError, KeyError) as e:
        parser.error(str(e))
    matrix = eval_matrix(args)

    if args.dry_run:
        for slot, run in enumerate(r for r in runs if not r.trained()):
            env, cmd = train_command(run, args, slot % args.jobs)
            print(' '.join(f'{k}={v}' for k, v in env.items()) + (' ' if env else '') +
                  quote(cmd))
        return 0

    matrix_path = osp.join(args.work_dir, 'matrix.json')
    write_json(matrix_path, matrix)
    for run in runs:
        run.write_spec()
    start = time.time()
    progress = Progress(len(runs))
    slots = list(range(args.jobs))
    lock = threading.Lock()

    def job(run):
        with lock:
            slot = slots.pop()
        try:
            return process(run, args, matrix, matrix_path, progress, slot)
        finally:
            with lock:
                slots.append(slot)

    with ThreadPoolExecutor(args.jobs) as pool:
        ok = list(pool.map(job, runs))
    progress.bar.close()
    wall = time.time() - start

    failed = ok.count(False)  # unfinished runs under --collect are no error
    if args.train_only:
        print(f'{ok.count(True)}/{len(runs)} runs trained in {wall:.0f} s')
        return 1 if failed else 0
    table = aggregate(args, variants, runs, matrix)
    table['wall_seconds'] = round(wall, 1)
    write_json(osp.join(args.work_dir, 'results.json'), table)
    with open(osp.join(args.work_dir, 'report.md'), 'w') as f:
        f.write(report(table))
    pngs = plot(table, args.work_dir)
    print(f'{ok.count(True)}/{len(runs)} runs done in {wall:.0f} s; wrote '
          f'{osp.join(args.work_dir, "results.json")}, report.md, ' + ', '.join(
              osp.basename(p) for p in pngs))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
