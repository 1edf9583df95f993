"""Train a SyncJSBN model and its BN twin on scikit-learn's bundled digits, then compare.

    python tools/demo.py [--work-dir work_dirs/demo] [--epochs 6]

Runs on CPU in a few minutes with no network: both models train with mmengine's Runner
(configs/cls/resnet9_digits_{syncjsbn,bn}.py), are evaluated on the held-out digits, clean
and under Gaussian pixel noise, and the results go to WORK_DIR/metrics.json and
WORK_DIR/demo.png (plus the JS layers' shrinkage factors in WORK_DIR/shrinkage.png).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))

import matplotlib  # noqa: E402

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import plot_shrinkage  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

MODELS = {'SyncJSBN': 'configs/cls/resnet9_digits_syncjsbn.py',
          'BN': 'configs/cls/resnet9_digits_bn.py'}
NOISE_SIGMAS = (0, 16, 32, 64)  # Gaussian noise std in pixel units (images are 0-255)


def build_runner(name: str, config: str, work_dir: Path, epochs: int) -> Runner:
    cfg = Config.fromfile(str(ROOT / config))
    cfg.work_dir = str(work_dir / name)
    cfg.train_cfg.max_epochs = epochs
    cfg.param_scheduler = dict(type='CosineAnnealingLR', T_max=epochs, by_epoch=True, begin=0,
                               end=epochs, convert_to_iter_based=True)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=epochs)
    cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [
        dict(type='ShrinkageMonitorHook', interval=5)]
    cfg.randomness = dict(seed=0)
    return Runner.from_cfg(cfg)


def curves(run_dir: Path):
    """(train steps, losses), (epochs, val top-1) from the run's scalars.json."""
    scalars = plot_shrinkage.find_scalars(run_dir)
    loss, acc = [], []
    for line in scalars.read_text().splitlines():
        rec = json.loads(line)
        if 'loss' in rec:
            loss.append((rec['step'], rec['loss']))
        if 'accuracy/top1' in rec:
            acc.append((rec['step'], rec['accuracy/top1']))
    return loss, acc, scalars


@torch.no_grad()
def noise_accuracy(runner: Runner, sigma: float) -> float:
    """Top-1 accuracy on the test split with N(0, sigma^2) added to the raw pixels."""
    model = runner.model
    model.eval()
    evaluator = runner.build_evaluator(runner.cfg.test_evaluator)
    loader = runner.build_dataloader(runner.cfg.test_dataloader)
    gen = torch.Generator().manual_seed(0)
    for data in loader:
        data = dict(data)
        data['inputs'] = [(img.float() + sigma * torch.randn(img.shape, generator=gen))
                          .clamp(0, 255) for img in data['inputs']]
        evaluator.process(data_samples=model.test_step(data), data_batch=data)
    return evaluator.evaluate(len(loader.dataset))['accuracy/top1']


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--work-dir', type=Path, default=ROOT / 'work_dirs' / 'demo')
    parser.add_argument('--epochs', type=int, default=15)
    args = parser.parse_args(argv)
    work_dir = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)

    results, logs = {}, {}
    for name, config in MODELS.items():
        runner = build_runner(name, config, work_dir, args.epochs)
        start = time.time()
        runner.train()
        train_s = time.time() - start
        test = runner.test()
        results[name] = dict(
            config=config, epochs=args.epochs, train_seconds=round(train_s, 1),
            test={k: round(v, 3) for k, v in test.items()},
            noise_top1={str(s): round(noise_accuracy(runner, s), 3) for s in NOISE_SIGMAS})
        logs[name] = curves(work_dir / name)

    metrics_path = work_dir / 'metrics.json'
    metrics_path.write_text(json.dumps(results, indent=2) + '\n')

    fig, (ax_loss, ax_acc, ax_noise) = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, (loss, acc, _) in logs.items():
        ax_loss.plot(*zip(*loss), label=name, lw=0.8)
        ax_acc.plot(range(1, len(acc) + 1), [a for _, a in acc], marker='o', label=name)
        noise = results[name]['noise_top1']
        ax_noise.plot([int(s) for s in noise], list(noise.values()), marker='o', label=name)
    ax_loss.set(title='training loss', xlabel='iteration')
    ax_acc.set(title='held-out top-1 (%)', xlabel='epoch')
    ax_noise.set(title='top-1 under Gaussian pixel noise (%)', xlabel='noise std (0-255 scale)')
    for ax in (ax_loss, ax_acc, ax_noise):
        ax.legend()
    fig.tight_layout()
    plot_path = work_dir / 'demo.png'
    fig.savefig(plot_path, dpi=100)
    plt.close(fig)

    shrink_path = work_dir / 'shrinkage.png'
    plot_shrinkage.plot(plot_shrinkage.load_series(logs['SyncJSBN'][2]), shrink_path,
                        title='SyncJSBN shrinkage factors')

    print(json.dumps(results, indent=2))
    print(f'metrics: {metrics_path}\nplot:    {plot_path}\nshrinkage plot: {shrink_path}')
    # One seed per layer: differences of a point or two can flip with the next seed.
    print('one seed each, a smoke test, not a result: for means, 95 % intervals and paired '
          'differences over seeds run tools/benchmark_robustness.py (docs/results.md, '
          '"Robustness")')
    return 0


if __name__ == '__main__':
    sys.exit(main())
