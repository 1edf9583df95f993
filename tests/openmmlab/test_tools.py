"""tools/train.py, tools/test.py, the launch scripts and configs/seg, on CPU.

Multi-process runs use the real scripts (torchrun, gloo, DDP without device_ids) on the toy
model of tests/openmmlab/toy_components.py, which has three SyncJSBN layers:
- `dist_train.sh CONFIG 2` equals one process with the doubled batch, and every rank ends
  with identical weights and running statistics; the same through FlexibleRunner;
- two "nodes" (NNODES=2, one process each) form one world of size 2;
- `--resume` continues to the same iteration, weights and optimizer state;
- `--amp` on CPU runs under bfloat16 autocast;
- `dist_test.sh` (2 processes) and `test.py` give the same metric.
Every config under configs/seg builds its model and its data set on a synthesized
Cityscapes folder; one hr18 SyncJSBN config trains two iterations at a small crop, and
tools/test.py evaluates its checkpoint. Dockerfile and shell scripts are linted where
hadolint / shellcheck are installed.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    ROOT,
    SEG_CHILD,
    assert_state_equal,
    check_world,
    free_port,
    last_json,
    rank_states,
    run,
    tool_env,
    train_py,
    train_two_nodes,
    write_toy_cfg,
)

import robustbn  # noqa: F401  (mmengine checkpoints load under torch's weights_only)

SCRIPTS = ('dist_train.sh', 'dist_test.sh', 'slurm_train.sh')
SEG_CONFIGS = sorted((ROOT / 'configs' / 'seg').glob('*.py'))


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def toy_reference(tmp_path_factory):
    """One process, batch 8, 4 iterations: (config, work dir)."""
    d = tmp_path_factory.mktemp('toy_ref')
    cfg = write_toy_cfg(d)
    run(train_py(cfg, d / 'work', '--cfg-options', 'train_dataloader.batch_size=8'))
    return cfg, d / 'work'


# ------------------------------------------------------------------- multi-process launch
def test_dist_train_two_processes_equal_one_with_double_batch(tmp_path, toy_reference):
    cfg = write_toy_cfg(tmp_path)
    work = tmp_path / 'work'
    run(['bash', 'tools/dist_train.sh', cfg, 2, '--work-dir', work], tool_env(PORT=free_port()))
    states = rank_states(work, 2)
    check_world(states)
    assert (work / 'iter_4.pth').is_file()

    # Per-rank batch 4 x 2 ranks: the union of the ranks' batches is the single process's
    # batch of 8 (InfiniteSampler interleaves one permutation), SyncJSBN's statistics are
    # over that union and DDP averages the gradients: the same training up to rounding.
    ref = rank_states(toy_reference[1], 1)[0]
    assert (ref['world_size'], ref['backend'], ref['wrapper']) == (1, None, 'ToyNet')
    assert_state_equal(ref['state_dict'], states[0]['state_dict'], rtol=1e-5, atol=1e-6)


def test_two_nodes_form_one_world(tmp_path):
    check_world(train_two_nodes(write_toy_cfg(tmp_path), tmp_path / 'work'))


def test_flexible_runner_ddp_strategy_on_cpu(tmp_path):
    cfg = write_toy_cfg(tmp_path, "runner_type = 'FlexibleRunner'\n"
                                  "strategy = dict(type='DDPStrategy')\n")
    work = tmp_path / 'work'
    run(['bash', 'tools/dist_train.sh', cfg, 2, '--work-dir', work], tool_env(PORT=free_port()))
    check_world(rank_states(work, 2))


def test_dist_test_and_test_py_agree(tmp_path, toy_reference):
    cfg, ref_work = toy_reference
    ckpt = ref_work / 'iter_4.pth'
    run(['bash', 'tools/dist_test.sh', cfg, ckpt, 2, '--work-dir', tmp_path / 'dist'],
        tool_env(PORT=free_port()))
    run([sys.executable, 'tools/test.py', cfg, ckpt, '--work-dir', tmp_path / 'single'])
    dist_acc = last_json(tmp_path / 'dist')['accuracy']
    assert dist_acc == last_json(tmp_path / 'single')['accuracy']
    assert 0 <= dist_acc <= 100


# ---------------------------------------------------------------- single-process options
def test_resume_continues_to_same_iteration_and_weights(tmp_path):
    cfg = write_toy_cfg(tmp_path)
    work = tmp_path / 'work'
    opts = ['--cfg-options', 'train_cfg.max_iters=6', 'default_hooks.checkpoint.interval=3']
    run(train_py(cfg, work, *opts))
    straight = torch.load(work / 'iter_6.pth')
    (work / 'iter_6.pth').unlink()
    (work / 'last_checkpoint').write_text(str(work / 'iter_3.pth'))  # as if stopped at 3

    out = run(train_py(cfg, work, '--resume', *opts))
    assert 'Iter(train) [4/6]' in out and 'Iter(train) [1/6]' not in out
    resumed = torch.load(work / 'iter_6.pth')
    assert resumed['meta']['iter'] == straight['meta']['iter'] == 6
    assert_state_equal(straight['state_dict'], resumed['state_dict'])
    for a, b in zip(straight['optimizer']['state'].values(),
                    resumed['optimizer']['state'].values()):
        assert_state_equal(a, b)


def test_amp_on_cpu_uses_bfloat16(tmp_path):
    cfg = write_toy_cfg(tmp_path)
    work = tmp_path / 'work'
    run(train_py(cfg, work, '--amp'))
    state = rank_states(work, 1)[0]
    assert state['compute_dtype'] == 'torch.bfloat16'
    assert "type='CPUAmpOptimWrapper'" in (work / 'toy.py').read_text()  # dumped config
    assert all(torch.isfinite(v.float()).all() for v in state['state_dict'].values())


# ------------------------------------------------------------------ launcher, in process
@pytest.mark.skipif(torch.cuda.is_available(), reason='with CUDA mmengine launches (nccl)')
@pytest.mark.parametrize('launcher, env', [
    ('pytorch', dict(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1')),
    ('slurm', dict(SLURM_PROCID='0', SLURM_NTASKS='1', SLURM_LOCALID='0',
                   MASTER_ADDR='127.0.0.1')),
    ('mpi', dict(OMPI_COMM_WORLD_RANK='0', OMPI_COMM_WORLD_SIZE='1',
                 OMPI_COMM_WORLD_LOCAL_RANK='0', MASTER_ADDR='127.0.0.1')),
])
def test_setup_cpu_distributed(monkeypatch, launcher, env):
    import torch.distributed as dist
    from mmengine import Config

    from robustbn.openmmlab.launcher import setup_cpu_distributed

    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)
    for name, value in dict(env, MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(name, value)
    cfg = Config(dict(launcher=launcher, find_unused_parameters=True))
    if launcher != 'mpi':  # with and without env_cfg in the config
        cfg.env_cfg = dict(dist_cfg=dict(backend='nccl', timeout=60))
    try:
        assert setup_cpu_distributed(cfg)
        assert dist.get_backend() == 'gloo' and dist.get_world_size() == 1
        assert os.environ['RANK'] == '0' and os.environ['LOCAL_RANK'] == '0'
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    assert cfg.model_wrapper_cfg.to_dict() == dict(
        type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
        find_unused_parameters=True)


def test_setup_cpu_distributed_wrappers_and_errors(monkeypatch):
    from mmengine import Config

    from robustbn.openmmlab import launcher as L

    assert not L.setup_cpu_distributed(Config(dict(launcher='none')))
    # FlexibleRunner: DDPStrategy's default wrapper made CPU-capable; FSDP's left alone.
    cfg = Config(dict(strategy=dict(type='DDPStrategy')))
    L._set_model_wrapper(cfg)
    assert cfg.strategy.model_wrapper.to_dict() == dict(
        type='MMDistributedDataParallel', broadcast_buffers=False, device_ids=None)
    cfg = Config(dict(strategy=dict(type='FSDPStrategy')))
    L._set_model_wrapper(cfg)
    assert cfg.strategy.get('model_wrapper') is None
    # A user's non-DDP wrapper is kept as it is.
    cfg = Config(dict(model_wrapper_cfg=dict(type='MMFullyShardedDataParallel')))
    L._set_model_wrapper(cfg)
    assert 'device_ids' not in cfg.model_wrapper_cfg

    if not torch.cuda.is_available():
        monkeypatch.delenv('RANK', raising=False)
        with pytest.raises(RuntimeError, match='RANK'):
            L.setup_cpu_distributed(Config(dict(launcher='pytorch')))


# ---------------------------------------------------------------------- configs/seg
def _norm_types(module):
    from torch.nn.modules.batchnorm import _BatchNorm
    return {type(m).__name__ for m in module.modules() if isinstance(m, _BatchNorm)}


def test_seg_configs_build_model_and_dataset(cityscapes):
    from mmengine import Config
    from mmseg.registry import DATASETS, MODELS
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=True)

    assert len(SEG_CONFIGS) >= 8
    for path in SEG_CONFIGS:
        cfg = Config.fromfile(str(path))
        assert 'robustbn' in cfg.custom_imports.imports
        norm = 'SyncJSBN' if '_syncjsbn' in path.name else 'SyncBatchNorm'
        model = MODELS.build(cfg.model)
        assert _norm_types(model.backbone) == {norm}, path.name
        assert _norm_types(model.decode_head) == {norm}, path.name
        width = 48 if 'hr48' in path.name else 18
        assert model.backbone.stage4_cfg['num_channels'][0] == width
        for loader in (cfg.train_dataloader, cfg.val_dataloader):
            loader.dataset.data_root = str(cityscapes)
            dataset = DATASETS.build(loader.dataset)
            assert len(dataset) == 2
            sample = dataset[0]
            assert sample['inputs'].shape[0] == 3
            assert set(sample['data_samples'].gt_sem_seg.data.unique().tolist()) <= \
                set(range(19)) | {255}
        if 'albu' in path.name:
            assert any(t['type'] == 'Albu' for t in cfg.train_dataloader.dataset.pipeline)


def test_albu_geometric_transform_fills_label_with_ignore():
    import copy

    from mmengine import Config
    from mmseg.datasets.transforms import Albu

    path = next(p for p in SEG_CONFIGS if p.name.endswith('-albu.py'))
    albu_cfg = next(t for t in Config.fromfile(str(path)).train_pipeline if t['type'] == 'Albu')
    transforms = copy.deepcopy(albu_cfg['transforms'].to_list()
                               if hasattr(albu_cfg['transforms'], 'to_list')
                               else albu_cfg['transforms'])
    affine = [t for t in transforms if t['type'] == 'Affine']
    assert affine, 'the Albu variant has a geometric transform'
    affine = dict(affine[0], rotate=(30, 30), scale=(1.0, 1.0), p=1.0)  # corners uncovered
    out = Albu([affine]).transform(dict(img=np.full((64, 64, 3), 128, np.uint8),
                                        gt_seg_map=np.zeros((64, 64), np.uint8)))
    seg = out['gt_seg_map']
    assert set(np.unique(seg).tolist()) == {0, 255}
    assert seg[0, 0] == seg[0, -1] == seg[-1, 0] == seg[-1, -1] == 255


def test_seg_hr18_syncjsbn_trains_and_test_py_evaluates(tmp_path, cityscapes):
    base = ROOT / 'configs' / 'seg' / 'fcn_hr18_4xb2-40k_cityscapes-512x1024_syncjsbn.py'
    cfg = tmp_path / 'hr18_small.py'
    cfg.write_text(SEG_CHILD.format(base=base, data=cityscapes))
    work = tmp_path / 'work'
    run(train_py(cfg, work))
    scalars = [json.loads(line) for line in
               next(work.glob('*/vis_data/scalars.json')).read_text().splitlines()]
    losses = [s['loss'] for s in scalars if 'loss' in s]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)

    out_dir, show_dir = tmp_path / 'pred', tmp_path / 'show'
    run([sys.executable, 'tools/test.py', cfg, work / 'iter_2.pth', '--work-dir',
         tmp_path / 'test', '--out', out_dir, '--show-dir', show_dir,
         '--cfg-options', 'default_hooks.visualization.interval=1'])  # paint every image
    metrics = last_json(tmp_path / 'test')
    assert {'aAcc', 'mIoU', 'mAcc'} <= metrics.keys()
    assert all(math.isfinite(metrics[k]) for k in ('aAcc', 'mIoU', 'mAcc'))
    assert len(list(out_dir.glob('*.png'))) == 2  # --out: label maps
    assert len(list(show_dir.rglob('*.png'))) == 2  # --show-dir: painted predictions


# ------------------------------------------------------------------------------ lint
def _linter(name):
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent),
                                                    os.environ.get('PATH', '')]))


def test_shell_scripts_parse():
    for script in SCRIPTS:
        run(['bash', '-n', ROOT / 'tools' / script])


@pytest.mark.skipif(_linter('hadolint') is None, reason='hadolint not installed')
def test_dockerfile_hadolint():
    run([_linter('hadolint'), ROOT / 'docker' / 'Dockerfile'])


@pytest.mark.skipif(_linter('shellcheck') is None, reason='shellcheck not installed')
def test_shell_scripts_shellcheck():
    run([_linter('shellcheck'), *(ROOT / 'tools' / s for s in SCRIPTS)])
