"""DeepSpeed (ZeRO) through mmengine's FlexibleRunner on CPU with gloo.

The toy model of tests/openmmlab/toy_components.py (three SyncJSBN layers) trains through the real
scripts and DeepSpeed 0.19.6:
- 2 processes, ZeRO-2, float32: finite losses, identical running statistics on both ranks
  (BufferConsistencyHook checks them at every iteration), the same weights as DDP with
  the same gradient clipping; `--resume` from a DeepSpeed checkpoint equals the
  uninterrupted run; 2 "nodes" on 127.0.0.1 form the same world;
- bf16 (DeepSpeed's: bf16 parameters, float32 master weights and running statistics)
  through the `deepspeed` launcher;
- a DeepSpeed checkpoint exports to a plain .pth (float32 master weights) that
  tools/test.py evaluates and `load_from` loads into a DeepSpeed run of one process;
- local-statistics layers make BufferConsistencyHook stop training (or copy rank 0's);
- every DeepSpeed config builds, and fcn_hr18 SyncJSBN ZeRO-2 trains two iterations on a
  synthesized Cityscapes folder and its export is tested.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip('deepspeed')

from helpers import (  # noqa: E402
    CLIP,
    DS_TOY,
    ROOT,
    SEG_CHILD,
    TOY_CFG,
    assert_state_equal,
    check_world,
    dist_train,
    free_port,
    last_json,
    rank_states,
    run,
    start,
    tool_env,
    train_py,
    train_two_nodes,
    write_cfg,
)

import robustbn  # noqa: E402,F401  (registers the layers the toy configs name)

DS_CONFIGS = sorted(ROOT.glob('configs/*/*-ds-zero*.py'))
def losses(work: Path) -> list:
    # the latest run
    scalars = sorted(work.glob('*/vis_data/scalars.json'))[-1].read_text().splitlines()
    return [json.loads(line)['loss'] for line in scalars if '"loss"' in line]


def initial_weights(path: Path) -> Path:
    """A plain checkpoint of a fresh ToyNet: the runners build (and seed) models at
    different points, so equivalence runs start from this file (`load_from`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from toy_components import ToyNet
    torch.manual_seed(0)
    torch.save(dict(state_dict=ToyNet().state_dict()), path)
    return path


@pytest.fixture(scope='module')
def ds_reference(tmp_path_factory):
    """ZeRO-2, float32, 2 processes, 4 iterations (checkpoints at 2 and 4), from fixed
    initial weights: (config, work dir)."""
    d = tmp_path_factory.mktemp('ds_ref')
    init = initial_weights(d / 'init.pth')
    cfg = write_cfg(d, DS_TOY + f"load_from = '{init}'\n")
    dist_train(cfg, d / 'work')
    return cfg, d / 'work'


# ------------------------------------------------------------------ ZeRO-2, 2 processes
def test_zero2_two_processes_identical_buffers(ds_reference):
    _, work = ds_reference
    states = rank_states(work, 2)
    check_world(states, wrapper='MMDeepSpeedEngineWrapper')  # ranks' states bit-identical
    assert all(s['compute_dtype'] == 'torch.float32' for s in states)
    values = losses(work)
    assert len(values) == 4 and all(math.isfinite(v) for v in values)
    for it in (2, 4):  # DeepSpeed checkpoints: a directory, one ZeRO partition per rank
        ckpt = work / f'iter_{it}.pth'
        assert ckpt.is_dir() and len(list(ckpt.glob('*zero_pp_rank_*_optim_states.pt'))) == 2
    assert (work / 'last_checkpoint').read_text().strip().endswith('iter_4.pth')


def test_zero2_equals_ddp_with_the_same_clipping(tmp_path, ds_reference):
    ddp = TOY_CFG.replace("momentum=0.9))", f"momentum=0.9),\n    clip_grad=dict(max_norm={CLIP}))")
    assert 'clip_grad' in ddp
    ddp += f"load_from = '{initial_weights(tmp_path / 'init.pth')}'\n"
    cfg = write_cfg(tmp_path, ddp, 'toy_ddp.py')
    dist_train(cfg, tmp_path / 'work')
    ddp_state = rank_states(tmp_path / 'work', 2)[0]
    ds_state = rank_states(ds_reference[1], 2)[0]
    assert ddp_state['wrapper'] == 'MMDistributedDataParallel'
    # ZeRO-2 reduce-scatters the gradients in buckets: the same sums in another order.
    assert_state_equal(ddp_state['state_dict'], ds_state['state_dict'], rtol=1e-5, atol=1e-6)


def test_resume_from_deepspeed_checkpoint_matches_uninterrupted(tmp_path, ds_reference):
    cfg, ref_work = ds_reference
    work = tmp_path / 'work'
    dist_train(cfg, work, 2, '--cfg-options', 'train_cfg.max_iters=2')
    dist_train(cfg, work, 2, '--resume')
    resumed, ref = rank_states(work, 2), rank_states(ref_work, 2)
    check_world(resumed, wrapper='MMDeepSpeedEngineWrapper')
    assert_state_equal(ref[0]['state_dict'], resumed[0]['state_dict'])
    assert losses(work)[-2:] == losses(ref_work)[-2:]


def test_two_nodes_via_dist_train(tmp_path, ds_reference):
    cfg, ref_work = ds_reference
    states = train_two_nodes(cfg, tmp_path / 'work')
    check_world(states, wrapper='MMDeepSpeedEngineWrapper')
    assert_state_equal(rank_states(ref_work, 2)[0]['state_dict'], states[0]['state_dict'])


# ------------------------------------------------------------- bf16, deepspeed launcher
def test_bf16_with_the_deepspeed_launcher(tmp_path):
    text = DS_TOY.replace('zero_optimization=dict(stage=2)',
                          "zero_optimization=dict(stage=1), bf16=dict(enabled=True), "
                          "inputs_to_half=['inputs']")
    cfg = write_cfg(tmp_path, text)
    work = tmp_path / 'work'
    launcher = Path(sys.executable).parent / 'deepspeed'
    env = tool_env()
    env['PYTHONPATH'] += f':{ROOT / "plugin"}'
    run([sys.executable, launcher, '--num_gpus', 2, '--master_port', free_port(),
         'tools/train.py', cfg, '--launcher', 'pytorch', '--work-dir', work], env)
    states = rank_states(work, 2)
    check_world(states, wrapper='MMDeepSpeedEngineWrapper')
    assert all(s['compute_dtype'] == 'torch.bfloat16' for s in states)
    sd = states[0]['state_dict']
    assert sd['features.1.weight'].dtype == torch.bfloat16  # parameters cast by DeepSpeed
    assert sd['features.1.running_mean'].dtype == torch.float32  # buffers are not
    assert all(math.isfinite(v) for v in losses(work))

    # The export holds the float32 master weights: the bf16 copies are their rounding.
    run([sys.executable, 'tools/export_deepspeed_checkpoint.py', work])
    exported = torch.load(work / 'iter_4_model.pth')['state_dict']
    assert exported.keys() == sd.keys()
    for k, v in sd.items():
        if v.dtype == torch.bfloat16:
            assert exported[k].dtype == torch.float32
            assert torch.equal(exported[k].bfloat16(), v), k
        else:
            assert torch.equal(exported[k], v), k


# ---------------------------------------------------------------- export, test, load_from
def test_export_then_test_py_and_load_from(tmp_path, ds_reference):
    cfg, ref_work = ds_reference
    ckpt = ref_work / 'iter_4.pth'
    out = tmp_path / 'model.pth'
    run([sys.executable, 'tools/export_deepspeed_checkpoint.py', ckpt, out])
    exported = torch.load(out)  # weights_only: a plain mmengine checkpoint
    assert exported['meta']['iter'] == 4
    final = rank_states(ref_work, 2)[0]['state_dict']
    assert_state_equal(final, exported['state_dict'])  # float32 training: masters == module

    # tools/test.py: a DeepSpeed directory gets the export command, the .pth is tested.
    proc = start([sys.executable, 'tools/test.py', cfg, ckpt, '--work-dir', tmp_path / 't0'])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and 'export_deepspeed_checkpoint.py' in err
    run([sys.executable, 'tools/test.py', cfg, out, '--work-dir', tmp_path / 't1'])
    acc = last_json(tmp_path / 't1')['accuracy']
    assert 0 <= acc <= 100

    # load_from a plain .pth in a DeepSpeed config, one process without a launcher: with
    # lr 0 the parameters after one iteration are the exported ones.
    work = tmp_path / 'work'
    run(train_py(cfg, work, '--cfg-options', f'load_from={out}', 'train_cfg.max_iters=1',
                 'optim_wrapper.optimizer.lr=0.0'))
    state = rank_states(work, 1)[0]
    assert (state['world_size'], state['wrapper']) == (1, 'MMDeepSpeedEngineWrapper')
    for k, v in state['state_dict'].items():
        if 'running' not in k and 'num_batches' not in k:
            assert torch.equal(v, exported['state_dict'][k]), k


# ------------------------------------------------------------------ buffer consistency
def test_buffer_check_stops_local_statistics(tmp_path):
    cfg = write_cfg(tmp_path, DS_TOY + "model = dict(type='ToyNet', norm='BatchNormXd')\n")
    proc = start(['bash', 'tools/dist_train.sh', cfg, 2, '--work-dir', tmp_path / 'work'],
                 tool_env(PORT=free_port()))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert 'model buffers differ between ranks after iteration 1' in err
    assert 'features.1.running_mean' in err


def test_buffer_check_broadcast_makes_ranks_agree(tmp_path):
    text = DS_TOY.replace("dict(type='BufferConsistencyHook', interval=1)",
                          "dict(type='BufferConsistencyHook', interval=2, action='broadcast')")
    cfg = write_cfg(tmp_path, text + "model = dict(type='ToyNet', norm='BatchNormXd')\n")
    work = tmp_path / 'work'
    out = dist_train(cfg, work)
    check_world(rank_states(work, 2), wrapper='MMDeepSpeedEngineWrapper')
    assert out.count("copied rank 0's values of") == 2  # after iterations 2 and 4


# ----------------------------------------------------------------------------- configs
def test_deepspeed_configs_build():
    from deepspeed.runtime.config import DeepSpeedConfig
    from mmengine import Config
    from mmengine.registry import MODELS
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=True)

    assert len(DS_CONFIGS) == 4, DS_CONFIGS
    for path in DS_CONFIGS:
        cfg = Config.fromfile(str(path))
        plain = Config.fromfile(str(path).split('-ds-')[0] + '.py')
        stage = int(path.stem[-1])
        assert cfg.runner_type == 'FlexibleRunner'
        s = cfg.strategy
        assert (s.type, s.zero_optimization.stage, s.bf16.enabled) == ('DeepSpeedStrategy',
                                                                        stage, True)
        assert s.gradient_clipping > 0 and s.inputs_to_half == ['inputs']
        # mmseg's / the recipe's optimizer and schedule, unchanged
        assert cfg.optim_wrapper.type == 'DeepSpeedOptimWrapper'
        assert 'clip_grad' not in cfg.optim_wrapper
        opt = {k: v for k, v in plain.optim_wrapper.optimizer.items() if k != '_scope_'}
        assert cfg.optim_wrapper.optimizer == opt
        assert cfg.param_scheduler == plain.param_scheduler
        assert cfg.train_cfg == plain.train_cfg
        hook = cfg.default_hooks.buffer_check
        ckpt = cfg.default_hooks.checkpoint
        assert hook.type == 'BufferConsistencyHook' and hook.interval == ckpt.interval
        assert hook.get('by_epoch', False) == ckpt.get('by_epoch', True)

        # The engine's configuration as DeepSpeedStrategy assembles it, validated by
        # DeepSpeed (unknown keys and bad values raise).
        DeepSpeedConfig(dict(s.config, zero_optimization=s.zero_optimization, bf16=s.bf16,
                             gradient_clipping=s.gradient_clipping,
                             train_micro_batch_size_per_gpu=cfg.train_dataloader.batch_size,
                             gradient_accumulation_steps=1))
        model = MODELS.build(cfg.model)
        norms = {type(m).__name__ for m in model.modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
        assert norms == ({'SyncJSBN'} if 'syncjsbn' in path.name else {'JSBN2d'}), path.name


def test_seg_hr18_syncjsbn_zero2_trains_on_cpu(tmp_path, cityscapes):
    base = ROOT / 'configs' / 'seg' / 'fcn_hr18_4xb2-40k_cityscapes-512x1024_syncjsbn-ds-zero2.py'
    hooks = 'default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))\n'
    text = SEG_CHILD.format(base=base, data=cityscapes)
    assert hooks in text
    text = text.replace(hooks, hooks[:-2] + ',\n    buffer_check=dict(interval=1))\n')
    text += 'custom_hooks = []  # adversarial evaluation: tests/openmmlab/test_adversarial.py\n'
    cfg = tmp_path / 'hr18_ds.py'
    cfg.write_text(text)
    work = tmp_path / 'work'
    dist_train(cfg, work, 2, '--cfg-options', 'train_dataloader.batch_size=1')
    values = losses(work)
    assert len(values) == 2 and all(math.isfinite(v) for v in values)
    assert (work / 'iter_2.pth').is_dir()
    run([sys.executable, 'tools/export_deepspeed_checkpoint.py', work / 'iter_2.pth',
         tmp_path / 'hr18.pth'])
    run([sys.executable, 'tools/test.py', cfg, tmp_path / 'hr18.pth', '--work-dir',
         tmp_path / 'test'])
    metrics = last_json(tmp_path / 'test')
    assert all(math.isfinite(metrics[k]) for k in ('aAcc', 'mIoU', 'mAcc'))
