# Train a model from an mmengine config (mmsegmentation's tools/train.py, plus CPU/gloo
# multi-process launch and CPU bfloat16 --amp; see robustbn.openmmlab.launcher and
# robustbn.openmmlab.amp).
import argparse
import logging

import torch
from mmengine.logging import print_log
from run_common import add_launch_args, build_runner, load_config, parse

from robustbn.openmmlab.launcher import setup_deepspeed
from robustbn.openmmlab.resume import resolve_resume


def parse_args():
    parser = argparse.ArgumentParser(description='Train a model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume',
        action='store_true',
        default=False,
        help='resume from the latest checkpoint in the work_dir automatically (when the '
        'one last_checkpoint names is missing or truncated: the newest complete one)')
    parser.add_argument(
        '--amp',
        action='store_true',
        default=False,
        help='enable automatic-mixed-precision training (float16 on GPU, '
        'bfloat16 on CPU; DeepSpeed configs: the strategy\'s bf16)')
    add_launch_args(parser)
    return parse(parser)


def enable_amp(cfg):
    strategy = cfg.get('strategy') or {}
    if strategy.get('type') == 'DeepSpeedStrategy':
        # DeepSpeed's own mixed precision: bf16 parameters, float32 master weights.
        if not (strategy.get('fp16') or {}).get('enabled'):
            strategy['bf16'] = dict(strategy.get('bf16') or {}, enabled=True)
        strategy.setdefault('inputs_to_half', ['inputs'])
        return
    optim_wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
    amp_type = 'AmpOptimWrapper' if torch.cuda.is_available() else 'CPUAmpOptimWrapper'
    if optim_wrapper == amp_type:
        print_log('AMP training is already enabled in your config.',
                  logger='current', level=logging.WARNING)
        return
    if optim_wrapper != 'OptimWrapper':
        raise ValueError('`--amp` is only supported when the optimizer wrapper type is '
                         f'`OptimWrapper` but got {optim_wrapper}.')
    cfg.optim_wrapper.type = amp_type
    if amp_type == 'AmpOptimWrapper':
        cfg.optim_wrapper.loss_scale = 'dynamic'  # float16, as mmsegmentation


def main():
    args = parse_args()

    # work_dir: --work-dir > the config's > ./work_dirs/CONFIG_NAME
    cfg = load_config(args.config, args)

    if args.amp:
        enable_amp(cfg)

    cfg.resume = args.resume
    # A save interrupted under max_keep_ckpts leaves last_checkpoint naming a deleted or
    # truncated file: resume from the newest complete checkpoint instead (with a warning).
    resolve_resume(cfg)

    # DeepSpeed: a process group of one without a launcher; a plain .pth in load_from.
    setup_deepspeed(cfg)
    build_runner(cfg).train()


if __name__ == '__main__':
    main()
