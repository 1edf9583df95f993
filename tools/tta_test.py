# Test-time adaptation benchmark of one checkpoint: every corruption x severity x method
# is one run of TestTimeAdaptLoop from the checkpoint (a fresh Runner each time); writes
# the error table (100 - accuracy/top1 for classification, 100 - mIoU for segmentation)
# as JSON and markdown.
#
#   python tools/tta_test.py CONFIG CKPT [--methods source bn_adapt tent gprebn]
#       [--corruptions gaussian_noise ...] [--severities 1 2 3 4 5] [--max-samples N]
#       [--metric KEY] [--work-dir DIR] [--cfg-options k=v ...] [--launcher pytorch]
#   python -m torch.distributed.run --nproc_per_node=N tools/tta_test.py ... --launcher pytorch
import argparse
import copy
import json
import os
import os.path as osp
import platform
import sys

import torch
from mmengine.config import ConfigDict
from mmengine.dist import get_dist_info

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))  # tools/run_common.py (when imported)
from run_common import add_launch_args, build_runner, default_work_dir, load_config, parse  # noqa: E402

from robustbn.openmmlab.tta.methods import METHODS  # noqa: E402

# The 15 benchmark corruptions of CIFAR-10-C / ImageNet-C (Hendrycks & Dietterich 2019);
# on-the-fly ImageNetCorruption data default to the ones it supports.
CORRUPTIONS = ('gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'glass_blur',
               'motion_blur', 'zoom_blur', 'snow', 'frost', 'fog', 'brightness', 'contrast',
               'elastic_transform', 'pixelate', 'jpeg_compression')
# metric key -> the error is 100 minus it (both in percent)
METRICS = ('accuracy/top1', 'mIoU')
LOOP = 'TestTimeAdaptLoop'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test-time adaptation error table')
    parser.add_argument('config', help='config file (model, test dataloader and evaluator)')
    parser.add_argument('checkpoint', help='checkpoint of the trained (source) model')
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS)
    parser.add_argument('--corruptions', nargs='+',
                        help='corruption names the test data set understands (default: the '
                        '15 benchmark ones; those ImageNetCorruption supports when the '
                        'pipeline corrupts on the fly)')
    parser.add_argument('--severities', nargs='+', type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument('--max-samples', type=int,
                        help='the first N test samples (the data set\'s `indices`)')
    parser.add_argument('--metric', help=f'metric key (default: the first of {METRICS} '
                        'that the evaluator returns); error = 100 - metric')
    parser.add_argument('--work-dir', help='where the tables and the runs\' logs go '
                        '(default ./work_dirs/tta/CONFIG_NAME)')
    add_launch_args(parser, 'override settings of the config, key=value')
    args = parse(parser, argv)
    if args.max_samples is not None and args.max_samples < 1:
        parser.error('--max-samples must be >= 1')
    return args


def _pipeline_corruptions(dataset) -> list:
    return [t for t in dataset.get('pipeline') or []
            if isinstance(t, dict) and t.get('type') == 'ImageNetCorruption']


def _wrapped(dataset) -> list:
    return list(dataset.get('datasets') or ([dataset['dataset']] if dataset.get('dataset') else []))


def default_corruptions(dataset) -> list:
    def on_the_fly(ds):
        # ImageNetCorruption in the pipeline, or Digits-C (generated with it)
        return bool(_pipeline_corruptions(ds)) or ds.get('type') == 'DigitsC' or \
            any(on_the_fly(d) for d in _wrapped(ds))
    if on_the_fly(dataset):
        from robustbn.openmmlab.datasets import CORRUPTIONS as SUPPORTED
        return list(SUPPORTED)
    return list(CORRUPTIONS)


def set_corruption(dataset: dict, corruption: str, severity: int) -> None:
    """Set ``corruption`` and ``severity`` in a dataset config, in place: as the dataset's
    keys (e.g. type 'CIFAR10C') and/or in its pipeline's 'ImageNetCorruption' transforms;
    dataset wrappers (``dataset``/``datasets`` keys) are searched. Raises ValueError when
    neither form is found."""
    found = False
    if dataset.get('type') == 'CIFAR10C' or 'corruption' in dataset or 'severity' in dataset:
        dataset['corruption'], dataset['severity'] = corruption, severity
        found = True
    for transform in _pipeline_corruptions(dataset):
        transform['corruption'], transform['severity'] = corruption, severity
        found = True
    for sub in _wrapped(dataset):
        try:
            set_corruption(sub, corruption, severity)
            found = True
        except ValueError:
            pass
    if not found:
        raise ValueError(
            "the test dataset config has neither 'corruption'/'severity' keys (as "
            "type='CIFAR10C') nor an 'ImageNetCorruption' transform in its pipeline: "
            f"tools/tta_test.py cannot set the corruption (dataset type {dataset.get('type')!r})")


def loop_cfg(test_cfg, method: str) -> dict:
    """``test_cfg`` for ``method``: the config's TestTimeAdaptLoop settings (steps,
    episodic, norm_kwargs, ...); its optimizer only where it was set for this method."""
    base = dict(test_cfg or {})
    if base.get('type', LOOP) != LOOP:  # e.g. mmengine's TestLoop: keep only fp16
        base = {k: v for k, v in base.items() if k == 'fp16'}
    base.pop('type', None)
    if base.get('optimizer') is not None and base.get('method', 'gprebn') != method:
        base.pop('optimizer')  # e.g. GpreBN's SGD is not TENT's Adam: the method's default
    return dict(base, type=LOOP, method=method)


def error_of(metrics: dict, key=None):
    """(metric key, 100 - metric)."""
    if key is None:
        key = next((k for k in METRICS if k in metrics), None)
        if key is None:
            raise KeyError(f'none of {METRICS} in the metrics {sorted(metrics)}: use --metric')
    elif key not in metrics:
        raise KeyError(f'--metric {key!r} is not among the metrics {sorted(metrics)}')
    return key, 100.0 - float(metrics[key])


def markdown(table: dict) -> str:
    methods = table['methods']
    lines = [f"Error (%) = 100 - {table['metric']}", '',
             '| corruption | severity | ' + ' | '.join(methods) + ' |',
             '| --- | ---: | ' + ' | '.join('---:' for _ in methods) + ' |']
    for row in table['results']:
        lines.append(f"| {row['corruption']} | {row['severity']} | " +
                     ' | '.join(f"{row['error'][m]:.2f}" for m in methods) + ' |')
    lines.append('| **mean** | | ' +
                 ' | '.join(f"**{table['mean'][m]:.2f}**" for m in methods) + ' |')
    return '\n'.join(lines) + '\n'


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args, work_dir=False)
    work_dir = args.work_dir or default_work_dir(args.config, './work_dirs/tta')
    cfg.load_from = args.checkpoint
    if cfg.get('test_dataloader') is None or cfg.get('test_evaluator') is None:
        raise ValueError('the config needs test_dataloader and test_evaluator')
    corruptions = args.corruptions or default_corruptions(cfg.test_dataloader.dataset)
    # Fail before any run when the data set cannot take a corruption.
    set_corruption(copy.deepcopy(cfg.test_dataloader.dataset), corruptions[0],
                   args.severities[0])
    if args.max_samples is not None:
        cfg.test_dataloader.dataset.indices = args.max_samples

    rows, metric_key = [], args.metric
    for corruption in corruptions:
        for severity in args.severities:
            row = dict(corruption=corruption, severity=severity, error={}, metrics={})
            for method in args.methods:
                run_cfg = copy.deepcopy(cfg)
                set_corruption(run_cfg.test_dataloader.dataset, corruption, severity)
                run_cfg.test_cfg = ConfigDict(loop_cfg(cfg.get('test_cfg'), method))
                name = f'{corruption}_s{severity}_{method}'
                run_cfg.work_dir = osp.join(work_dir, 'runs', name)
                run_cfg.experiment_name = name
                metrics = build_runner(run_cfg).test()
                metric_key, row['error'][method] = error_of(metrics, metric_key)
                row['metrics'][method] = {k: float(v) for k, v in metrics.items()
                                          if isinstance(v, (int, float))}
            rows.append(row)

    table = dict(metric=metric_key, methods=list(args.methods), results=rows,
                 mean={m: sum(r['error'][m] for r in rows) / len(rows) for m in args.methods},
                 config=args.config, checkpoint=args.checkpoint,
                 test_cfg={m: loop_cfg(cfg.get('test_cfg'), m) for m in args.methods},
                 world_size=get_dist_info()[1],
                 versions=dict(python=platform.python_version(), torch=torch.__version__))
    if get_dist_info()[0] == 0:
        os.makedirs(work_dir, exist_ok=True)
        with open(osp.join(work_dir, 'tta_results.json'), 'w') as f:
            json.dump(table, f, indent=2, default=str)
        text = markdown(table)
        with open(osp.join(work_dir, 'tta_results.md'), 'w') as f:
            f.write(text)
        print(text + f'written to {osp.join(work_dir, "tta_results.{json,md}")}')
    return table


if __name__ == '__main__':
    main()
