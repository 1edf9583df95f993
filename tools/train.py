# Train a model from an mmengine config (mmsegmentation's tools/train.py, plus CPU/gloo
# multi-process launch and CPU bfloat16 --amp; see robustbn.launcher and robustbn.amp).
import argparse
import logging
import os
import os.path as osp

import torch
from mmengine.config import Config, DictAction
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from robustbn.launcher import setup_cpu_distributed, setup_deepspeed


def parse_args():
    parser = argparse.ArgumentParser(description='Train a model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume',
        action='store_true',
        default=False,
        help='resume from the latest checkpoint in the work_dir automatically')
    parser.add_argument(
        '--amp',
        action='store_true',
        default=False,
        help='enable automatic-mixed-precision training (float16 on GPU, '
        'bfloat16 on CPU; DeepSpeed configs: the strategy\'s bf16)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file. If the value to '
        'be overwritten is a list, it should be like key="[a,b]" or key=a,b '
        'It also allows nested list/tuple values, e.g. key="[(a,b),(c,d)]" '
        'Note that the quotation marks are necessary and that no white space '
        'is allowed.')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or --local_rank;
    # torchrun sets LOCAL_RANK instead.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


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

    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)

    # work_dir is determined in this priority: CLI > segment in file > filename
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])

    if args.amp:
        enable_amp(cfg)

    cfg.resume = args.resume

    # Without CUDA: gloo process group and CPU DDP (no-op otherwise).
    setup_cpu_distributed(cfg)
    # DeepSpeed: a process group of one without a launcher; a plain .pth in load_from.
    setup_deepspeed(cfg)

    # runner_type (e.g. FlexibleRunner) is looked up in mmengine's root registry.
    if 'runner_type' not in cfg:
        runner = Runner.from_cfg(cfg)
    else:
        runner = RUNNERS.build(cfg)

    runner.train()


if __name__ == '__main__':
    main()
