# Training iteration time and peak GPU memory of fcn_hr18 SyncJSBN (batch 2 at 512x1024,
# bf16) through DeepSpeed ZeRO-2 (FlexibleRunner) vs the plain mmengine Runner with bf16
# autocast, one process each, through tools/train.py as a user runs them.
#
# Data: a synthesized Cityscapes folder (random 1024x2048 images and labels) written to
# --data (kept for reuse), mmseg's training pipeline unchanged, so the timed iteration is
# what a real run does per step (data time is logged apart by mmengine and excluded).
# Reported: median of mmengine's per-iteration `time` after --warmup iterations, and the
# peak memory mmengine logs (torch.cuda.max_memory_allocated, MB). Goal: DeepSpeed within
# 1.05x of the plain Runner's time. `--tiny` runs a CPU-sized smoke version.
#
#   python tools/benchmark_deepspeed.py [--iters 60] [--warmup 20] [--data /tmp/cs_bench]
import argparse
import json
import os
import os.path as osp
import platform
import statistics
import subprocess
import sys
import tempfile

import numpy as np

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
PLAIN = 'configs/seg/fcn_hr18_4xb2-40k_cityscapes-512x1024_syncjsbn.py'
DS = 'configs/seg/fcn_hr18_4xb2-40k_cityscapes-512x1024_syncjsbn-ds-zero2.py'

CHILD = """
_base_ = '{base}'
data_root = '{data}'
{tiny}
train_dataloader = dict(batch_size=2, num_workers={workers},
                        persistent_workers={persistent},
                        dataset=dict(data_root=data_root{pipeline}))
model = dict(pretrained=None{preprocessor})  # offline: the architecture is what is timed
train_cfg = dict(max_iters={iters}, val_interval=1000000)
val_dataloader = val_cfg = val_evaluator = None  # training only
test_dataloader = test_cfg = test_evaluator = None
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1000000))
custom_hooks = []  # no adversarial evaluation
{extra}
"""
TINY = """
crop_size = (64, 128)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(256, 128), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
"""


def parse_args():
    parser = argparse.ArgumentParser(description='DeepSpeed ZeRO-2 vs Runner, fcn_hr18')
    parser.add_argument('--iters', type=int, help='iterations per run (default 60, tiny 4)')
    parser.add_argument('--warmup', type=int, help='untimed first iterations (default 20, '
                        'tiny 1)')
    parser.add_argument('--data', default=osp.join(tempfile.gettempdir(), 'robustbn_cs_bench'))
    parser.add_argument('--workers', type=int, default=4)
    parser.add_argument('--tiny', action='store_true', help='CPU-sized smoke run')
    parser.add_argument('--out', help='also write the results as JSON here')
    args = parser.parse_args()
    args.iters = args.iters or (4 if args.tiny else 60)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 20)
    if args.iters <= args.warmup:
        parser.error('--iters must exceed --warmup')
    return args


def synthesize(root: str, n: int, size) -> None:
    import cv2
    h, w = size
    rng = np.random.default_rng(0)
    d_img = osp.join(root, 'leftImg8bit', 'train', 'bench')
    d_seg = osp.join(root, 'gtFine', 'train', 'bench')
    os.makedirs(d_img, exist_ok=True)
    os.makedirs(d_seg, exist_ok=True)
    for i in range(n):
        stem = f'bench_{i:06d}_000019'
        if osp.exists(osp.join(d_seg, f'{stem}_gtFine_labelTrainIds.png')):
            continue
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = rng.integers(0, 19, (h // 16, w // 16), dtype=np.uint8).repeat(16, 0).repeat(16, 1)
        cv2.imwrite(osp.join(d_img, f'{stem}_leftImg8bit.png'), img)
        cv2.imwrite(osp.join(d_seg, f'{stem}_gtFine_labelTrainIds.png'), label)


def run(name: str, base: str, args, work: str, extra: str = '') -> dict:
    cfg = osp.join(work, f'{name}.py')
    with open(cfg, 'w') as f:
        f.write(CHILD.format(base=osp.join(ROOT, base), data=args.data, iters=args.iters,
                             workers=args.workers, persistent=args.workers > 0,
                             tiny=TINY if args.tiny else '',
                             pipeline=', pipeline=train_pipeline' if args.tiny else '',
                             preprocessor=', data_preprocessor=dict(size=crop_size)'
                             if args.tiny else '', extra=extra))
    cmd = [sys.executable, osp.join(ROOT, 'tools/train.py'), cfg,
           '--work-dir', osp.join(work, name)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [osp.join(ROOT, 'plugin'), os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f'{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}')
    scalars = [json.loads(line) for d, _, files in os.walk(osp.join(work, name))
               for f in files if f == 'scalars.json'
               for line in open(osp.join(d, f)) if '"time"' in line]
    timed = [s for s in scalars if s.get('iter', 0) > args.warmup]
    return dict(ms=1000 * statistics.median(s['time'] for s in timed),
                memory_mb=max((s.get('memory', 0) for s in scalars), default=0),
                iters=len(timed))


def main():
    args = parse_args()
    import torch
    size = (128, 256) if args.tiny else (1024, 2048)
    synthesize(args.data, 8, size)
    with tempfile.TemporaryDirectory() as work:
        # The plain Runner in bf16 autocast (mmengine's AmpOptimWrapper, as --amp but bf16),
        # clipping the gradient norm at the DeepSpeed config's value: the same work.
        amp = ("optim_wrapper = dict(type='AmpOptimWrapper', dtype='bfloat16', "
               if torch.cuda.is_available() else "optim_wrapper = dict(type='CPUAmpOptimWrapper', ")
        amp += 'clip_grad=dict(_delete_=True, max_norm=35.0))'
        results = {'Runner, bf16 autocast': run('runner', PLAIN, args, work, amp),
                   'DeepSpeed ZeRO-2, bf16': run('deepspeed', DS, args, work)}
    base = results['Runner, bf16 autocast']
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else platform.processor() or 'cpu')
    import deepspeed
    import mmengine
    print(f'fcn_hr18 SyncJSBN, batch 2 at {"64x128" if args.tiny else "512x1024"}, '
          f'{args.iters - args.warmup} timed iterations after {args.warmup}; {device}; '
          f'torch {torch.__version__}, mmengine {mmengine.__version__}, '
          f'deepspeed {deepspeed.__version__}\n')
    print('| run | ms/iter | x Runner | peak memory (MB) | x Runner |')
    print('| --- | ---: | ---: | ---: | ---: |')
    for name, r in results.items():
        mem_ratio = r['memory_mb'] / base['memory_mb'] if base['memory_mb'] else float('nan')
        print(f'| {name} | {r["ms"]:.1f} | {r["ms"] / base["ms"]:.3f} | {r["memory_mb"]} | '
              f'{mem_ratio:.3f} |')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(device=device, results=results), f, indent=1)


if __name__ == '__main__':
    main()
