"""Plain helpers shared by the test modules of tests/core and tests/openmmlab.

Importable with torch, numpy and pytest alone (tests/core runs without OpenMMLab): cv2 is
imported where it is used. pytest puts tests/ on sys.path (tests/conftest.py, default
"prepend" import mode); scripts run from tests/core insert it themselves.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
# toy_components.py and tta_components.py: the tools import them (custom_imports)
OPENMMLAB_TESTS = TESTS / 'openmmlab'
TIMEOUT = 300


# ----------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world_size: int, port: int, timeout=None):
    """This process as ``rank`` of a gloo group on 127.0.0.1:``port``, destroyed on exit."""
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                            world_size=world_size, timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


def load_tool(name: str):
    """tools/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tool_env(**extra) -> dict:
    """The environment of a tool run on CPU: the test components and the plugin on the
    path, no GPU, one OpenMP thread; ``extra`` on top."""
    env = dict(os.environ)
    path = [str(OPENMMLAB_TESTS), str(ROOT / 'plugin')] + \
        ([env['PYTHONPATH']] if env.get('PYTHONPATH') else [])
    env.update(PYTHON=sys.executable, PYTHONPATH=os.pathsep.join(path),
               CUDA_VISIBLE_DEVICES='',  # the CPU (gloo) path, on GPU machines too
               OMP_NUM_THREADS='1',  # the processes share few cores; oversubscribed OpenMP crawls
               NO_ALBUMENTATIONS_UPDATE='1')
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start(cmd, env=None) -> subprocess.Popen:
    return subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env or tool_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # own process group: killed whole on timeout


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> str:
    """Wait for ``proc``; fail the test with its output if it fails or times out."""
    try:
        out, err = proc.communicate(timeout=timeout)
        why = f'exited with {proc.returncode}'
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        why = f'timed out after {timeout} s'
    if proc.returncode != 0:
        pytest.fail(f'{" ".join(proc.args)} {why}\n--- stdout (end)\n{out[-4000:]}\n'
                    f'--- stderr (end)\n{err[-12000:]}', pytrace=False)
    return out


def run(cmd, env=None, timeout: float = TIMEOUT) -> str:
    return finish(start(cmd, env), timeout)


# ----------------------------------------------------------------------------- data
def write_cityscapes(root: Path, splits=(('val', 2),), size=(64, 128),
                     random_labels: bool = False) -> Path:
    """A tiny Cityscapes folder under ``root``: leftImg8bit/<split>/<split>city/
    *_leftImg8bit.png and gtFine/<split>/<split>city/*_gtFine_labelTrainIds.png, ``size``
    (h, w), train ids 0..18 in vertical stripes (or random), the top h // 8 rows 255
    (ignored). One random stream over all images, in order."""
    import cv2
    rng = np.random.default_rng(0)
    h, w = size
    for split, n in splits:
        for i in range(n):
            stem = f'{split}city_{i:06d}_000019'
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            if random_labels:
                label = rng.integers(0, 19, (h, w), dtype=np.uint8)
            else:
                label = np.repeat(np.arange(19, dtype=np.uint8), -(-w // 19))[None, :w]
                label = label.repeat(h, 0)
            label[:h // 8] = 255
            for sub, name, arr in (('leftImg8bit', 'leftImg8bit', img),
                                   ('gtFine', 'gtFine_labelTrainIds', label)):
                d = root / sub / split / f'{split}city'
                d.mkdir(parents=True, exist_ok=True)
                assert cv2.imwrite(str(d / f'{stem}_{name}.png'), arr)
    return root


# ------------------------------------------- toy training runs (test_tools, test_deepspeed)
TOY_CFG = """
custom_imports = dict(imports=['robustbn', 'toy_components'], allow_failed_imports=False)
model = dict(type='ToyNet')
loader = dict(num_workers=0, collate_fn=dict(type='default_collate'))
train_dataloader = dict(**loader, batch_size=4,
                        sampler=dict(type='InfiniteSampler', shuffle=True),
                        dataset=dict(type='ToyDataset', size=64))
train_cfg = dict(type='IterBasedTrainLoop', max_iters=4)
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.05, momentum=0.9))
param_scheduler = [dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=6)]
test_dataloader = dict(**loader, batch_size=8,
                       sampler=dict(type='DefaultSampler', shuffle=False),
                       dataset=dict(type='ToyDataset', size=32, seed=1))
test_cfg = dict(type='TestLoop')
test_evaluator = dict(type='ToyAccuracy')
default_hooks = dict(logger=dict(type='LoggerHook', interval=1),
                     checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2))
custom_hooks = [dict(type='DumpStateHook')]
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
env_cfg = dict(dist_cfg=dict(backend='nccl'))  # as mmseg's runtime; CPU runs switch to gloo
"""

SEG_CHILD = """
_base_ = '{base}'
data_root = '{data}'
crop_size = (64, 128)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(256, 128), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(256, 128), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
loader = dict(num_workers=0, persistent_workers=False)
train_dataloader = dict(**loader, dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(**loader, dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
model = dict(pretrained=None, data_preprocessor=dict(size=crop_size))  # offline
train_cfg = dict(max_iters=2, val_interval=100)
param_scheduler = [dict(type='PolyLR', power=0.9, begin=0, end=2, by_epoch=False)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
randomness = dict(seed=0)
"""


def train_py(cfg, work_dir, *args):
    return [sys.executable, 'tools/train.py', cfg, '--work-dir', work_dir, *args]


def write_toy_cfg(directory: Path, extra: str = '') -> Path:
    path = directory / 'toy.py'
    path.write_text(TOY_CFG + extra)
    return path


def rank_states(work_dir: Path, world_size: int) -> list:
    return [torch.load(work_dir / f'state_rank{r}.pth') for r in range(world_size)]


def assert_state_equal(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **(tol or dict(rtol=0, atol=0)), msg=k)


def check_world(states, wrapper='MMDistributedDataParallel', iters=4):
    world = len(states)
    assert sorted(s['rank'] for s in states) == list(range(world))
    for s in states:
        assert (s['world_size'], s['backend'], s['wrapper'], s['iter']) == \
            (world, 'gloo', wrapper, iters)
    for s in states[1:]:  # SyncJSBN running stats (and DDP's weights) equal on every rank
        assert_state_equal(states[0]['state_dict'], s['state_dict'])
    tracked = [v for k, v in states[0]['state_dict'].items() if k.endswith('num_batches_tracked')]
    assert len(tracked) == 3 and all(int(t) == iters for t in tracked)


def last_json(work_dir: Path) -> dict:
    """Metrics that mmengine's LoggerHook dumped after tools/test.py."""
    files = sorted(work_dir.glob('*/*.json'))
    assert files, f'no metrics json under {work_dir}'
    return json.loads(files[-1].read_text())


def train_two_nodes(cfg, work) -> list:
    """`dist_train.sh CFG 1` on two "nodes" (NNODES=2 on 127.0.0.1) sharing ``work``, as
    a cluster file system; the ranks' dumped states."""
    port = free_port()
    procs = [start(['bash', 'tools/dist_train.sh', cfg, 1, '--work-dir', work],
                   tool_env(NNODES=2, NODE_RANK=node, MASTER_ADDR='127.0.0.1', PORT=port))
             for node in (0, 1)]
    for p in procs:
        finish(p)
    return rank_states(work, 2)


# ----------------------------------------------------------------------------- DeepSpeed
CLIP = 0.05  # small enough to be active in every iteration of the toy runs

DS_TOY = TOY_CFG.replace(
    "optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.05, momentum=0.9))",
    "optim_wrapper = dict(type='DeepSpeedOptimWrapper',\n"
    "                     optimizer=dict(type='SGD', lr=0.05, momentum=0.9))") + f"""
runner_type = 'FlexibleRunner'
strategy = dict(type='DeepSpeedStrategy', zero_optimization=dict(stage=2),
                gradient_clipping={CLIP}, config=dict(zero_allow_untested_optimizer=True))
"""
DS_TOY = DS_TOY.replace(
    "checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2))",
    "checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2),\n"
    "                     buffer_check=dict(type='BufferConsistencyHook', interval=1))")
assert 'DeepSpeedOptimWrapper' in DS_TOY and 'BufferConsistencyHook' in DS_TOY


def write_cfg(directory: Path, text: str, name: str = 'toy_ds.py') -> Path:
    path = directory / name
    path.write_text(text)
    return path


def dist_train(cfg, work, nproc=2, *args, **env):
    return run(['bash', 'tools/dist_train.sh', cfg, nproc, '--work-dir', work, *args],
               tool_env(PORT=free_port(), **env))


# A tiny ResNet9 classifier of the digits (test-time adaptation tests).
DIGITS_SIZE = 16  # digits resized to 16x16: fast, and ResNet9's last stage is still 2x2
DIGITS_MODEL = dict(
    type='ImageClassifier',
    data_preprocessor=dict(type='ImgDataPreprocessor', mean=[0.] * 3, std=[255.] * 3,
                           bgr_to_rgb=True),
    backbone=dict(type='CifarResNet', depth=9, stem_channels=8, base_channels=8,
                  zero_init_residual=False, init_cfg=[],
                  norm_cfg=dict(type='BN', requires_grad=True)),
    head=dict(in_channels=64, num_classes=10))


# ----------------------------------------------------------------------------- op counts
class AtenOps(TorchDispatchMode):
    """Counts the ATen ops that do arithmetic (about one CUDA kernel each)."""
    NO_KERNEL = ('view', 'empty', 'detach', 'alias', 'as_strided', 'expand', 'squeeze',
                 'slice', 'select', 'permute', 'transpose', 'split', 'chunk', 'lift_fresh',
                 'unbind', 'reshape', 'is_same_size', '_local_scalar_dense')

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not any(k in str(func) for k in self.NO_KERNEL):
            self.count += 1
        return func(*args, **(kwargs or {}))
