# Adversarial eps sweep of one or more checkpoints: FGSM and PGD at each eps (pixel units
# of the raw 0-255 image), evaluated with the config's test evaluator; writes a JSON table
# and a PNG of metric vs eps with one curve per checkpoint.
#
#   python tools/adv_test.py CONFIG BN.pth JSBN.pth [--ckpt-configs CFG_BN CFG_JSBN]
#       [--eps 0 1 2 4 8] [--pgd-steps 10] [--pgd-alpha A] [--noise cauchy gaussian
#       --sigmas 10 25 40 50 77] [--max-samples N] [--metric KEY] [--work-dir DIR]
#       [--out FILE.json] [--cfg-options k=v ...] [--launcher pytorch]
import argparse
import json
import math
import os
import os.path as osp
import time

import run_common
from mmengine.dist import get_dist_info
from run_common import add_launch_args, load_config, parse
from tqdm import tqdm

CLEAN = 'clean'  # eps 0: the unattacked images (torchattacks' VANILA), shared by all curves


def parse_args():
    parser = argparse.ArgumentParser(description='Adversarial eps sweep of checkpoints')
    parser.add_argument('config', help='config file (its test dataloader and evaluator)')
    parser.add_argument('checkpoints', nargs='+', help='checkpoint files')
    parser.add_argument('--ckpt-configs', nargs='+',
                        help='one config per checkpoint (default: CONFIG for all)')
    parser.add_argument('--labels', nargs='+', help='curve labels (default: file names)')
    parser.add_argument('--eps', nargs='+', type=float, default=[0, 1, 2, 4, 8],
                        help='Linf budgets in pixel units (0-255)')
    parser.add_argument('--attacks', nargs='+', default=['FGSM', 'PGD'],
                        choices=['FGSM', 'PGD'])
    parser.add_argument('--pgd-steps', type=int, default=10)
    parser.add_argument('--pgd-alpha', type=float,
                        help='PGD step in pixel units (default 2.5 * eps / steps)')
    parser.add_argument('--noise', nargs='*', default=[], choices=['cauchy', 'gaussian'],
                        help='also the JS-BN paper noise experiment at --sigmas')
    parser.add_argument('--sigmas', nargs='+', type=float, default=[10, 25, 40, 50, 77],
                        help='noise scales in pixel units (0-255)')
    parser.add_argument('--max-samples', type=int, help='attack the first N test samples')
    parser.add_argument('--metric', help='metric to plot (default mIoU, else the first)')
    parser.add_argument('--seed', type=int, default=0, help='seeds random starts and noise')
    parser.add_argument('--work-dir', help='directory for logs (and outputs)')
    parser.add_argument('--out', help='JSON file to write (PNG next to it); default '
                        'WORK_DIR/adv_sweep.json')
    add_launch_args(parser, 'override settings of the config(s), key=value')
    args = parse(parser)
    n = len(args.checkpoints)
    for opt in ('ckpt_configs', 'labels'):
        if getattr(args, opt) is not None and len(getattr(args, opt)) != n:
            parser.error(f'--{opt.replace("_", "-")} needs one value per checkpoint ({n})')
    for opt in ('eps', 'sigmas', 'pgd_alpha'):
        values = getattr(args, opt)
        values = [] if values is None else values if isinstance(values, list) else [values]
        bad = [v for v in values if not (math.isfinite(v) and v >= 0)]
        if bad:
            parser.error(f'--{opt.replace("_", "-")} must be finite numbers >= 0 (pixel '
                         f'units, 0-255), got {bad[0]}')
    if args.pgd_steps < 1:
        parser.error('--pgd-steps must be >= 1')
    try:  # the attack configs of the sweep, as AdversarialEvalHook checks its own
        from robustbn.openmmlab.adversarial.attacks import check_attacks
        check_attacks(sweep_attacks(args)[0])
    except ValueError as e:
        parser.error(str(e))
    return args


def sweep_attacks(args):
    """Attack configs, and {curve: [(x, attack name), ...]}."""
    from robustbn.openmmlab.adversarial.attacks import attack_name

    attacks, curves = [dict(type='VANILA', name=CLEAN)], {}
    for kind in args.attacks:
        curves[kind] = []
        for eps in sorted(set(args.eps)):
            if eps == 0:
                curves[kind].append((0.0, CLEAN))
                continue
            if kind == 'FGSM':
                cfg = dict(type='FGSM', eps=eps)
            else:
                alpha = args.pgd_alpha if args.pgd_alpha is not None else 2.5 * eps / args.pgd_steps
                cfg = dict(type='PGD', eps=eps, alpha=alpha, steps=args.pgd_steps,
                           random_start=True)
            attacks.append(cfg)
            curves[kind].append((eps, attack_name(cfg)))
    for dist in args.noise:
        kind = f'{dist.title()}Noise'
        curves[kind] = []
        for sigma in sorted(set(args.sigmas)):
            if sigma == 0:
                curves[kind].append((0.0, CLEAN))
                continue
            cfg = dict(type=kind, sigma=sigma)
            attacks.append(cfg)
            curves[kind].append((sigma, attack_name(cfg)))
    return attacks, curves


def build_runner(config, args, index):
    cfg = load_config(config, args)
    cfg.load_from, cfg.resume = None, False
    # One MMLogger/MessageHub per runner in this process.
    cfg.experiment_name = f'adv_sweep_{index}_{time.strftime("%Y%m%d_%H%M%S")}'
    return run_common.build_runner(cfg)


def per_rank_samples(loader, max_samples):
    n = len(loader.sampler) if hasattr(loader.sampler, '__len__') else len(loader.dataset)
    if max_samples is None:
        return n
    return min(n, math.ceil(min(max_samples, len(loader.dataset)) / get_dist_info()[1]))


def plot(path, table, curves, metric):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.6 * len(curves), 3.6), squeeze=False)
    for ax, (kind, points) in zip(axes[0], curves.items()):
        for label, result in table['checkpoints'].items():
            xs = [x for x, _ in points]
            ax.plot(xs, result['curves'][kind], marker='o', label=label)
        noise = kind.endswith('Noise')
        ax.set(title=kind, ylabel=metric,
               xlabel='noise sigma (0-255 pixels)' if noise else 'eps (0-255 pixels)')
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    args = parse_args()
    from robustbn.openmmlab.adversarial.evaluate import evaluate_attacks

    attacks, curves = sweep_attacks(args)
    configs = args.ckpt_configs or [args.config] * len(args.checkpoints)
    labels = args.labels or [osp.basename(c) for c in args.checkpoints]
    if len(set(labels)) != len(labels):  # same file names in different folders
        labels = [osp.relpath(c) for c in args.checkpoints]
    runners, table, metric, rank = {}, None, args.metric, 0
    for i, (label, config, ckpt) in enumerate(zip(labels, configs, args.checkpoints)):
        if config not in runners:
            runners[config] = build_runner(config, args, len(runners))
        runner = runners[config]
        rank = get_dist_info()[0]
        runner.load_checkpoint(ckpt, map_location='cpu', strict=True)
        loop = runner.test_loop  # builds the test dataloader and evaluator
        total = per_rank_samples(loop.dataloader, args.max_samples)
        with tqdm(total=total, desc=f'[{i + 1}/{len(labels)}] {label}', unit='img',
                  disable=rank != 0) as bar:
            metrics = evaluate_attacks(runner.model, loop.dataloader, loop.evaluator, attacks,
                                       args.max_samples, args.seed, progress=bar.update)
        metrics = {k[len('adv/'):]: float(v) for k, v in metrics.items()}
        if metric is None:
            keys = [k.split('/', 1)[1] for k in metrics if k.startswith(CLEAN + '/')]
            metric = 'mIoU' if 'mIoU' in keys else keys[0]
        if table is None:
            table = dict(config=args.config, metric=metric, max_samples=args.max_samples,
                         seed=args.seed, attacks=attacks,
                         x={kind: [x for x, _ in pts] for kind, pts in curves.items()},
                         checkpoints={})
        try:
            result_curves = {kind: [metrics[f'{name}/{metric}'] for _, name in pts]
                             for kind, pts in curves.items()}
        except KeyError:
            raise KeyError(f'--metric {metric!r} is not among the evaluator\'s metrics: '
                           f'{sorted({k.split("/", 1)[1] for k in metrics})}') from None
        table['checkpoints'][label] = dict(checkpoint=ckpt, config=config,
                                           curves=result_curves, metrics=metrics)

    if rank == 0:
        out = args.out or osp.join(next(iter(runners.values())).work_dir, 'adv_sweep.json')
        os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
        with open(out, 'w') as f:
            json.dump(table, f, indent=2)
        png = osp.splitext(out)[0] + '.png'
        plot(png, table, curves, metric)
        print(f'wrote {out} and {png}')
        for label, result in table['checkpoints'].items():
            print(label + ': ' + '; '.join(
                f'{kind} ' + ' '.join(f'{v:.2f}' for v in vals)
                for kind, vals in result['curves'].items()))


if __name__ == '__main__':
    main()
