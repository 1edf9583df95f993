"""Distributed launch on machines without a GPU (gloo), for tools/train.py and tools/test.py.

mmengine's launchers assume CUDA: ``init_dist`` calls ``torch.cuda.set_device`` and the
runner wraps the model in DDP with ``device_ids=[LOCAL_RANK]``; both fail on a CPU-only
machine. ``setup_cpu_distributed(cfg)`` therefore, only when CUDA is unavailable and a
launcher is given,

1. initializes the gloo process group itself from the launcher's environment (torchrun's
   RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT/LOCAL_RANK, or Slurm's or Open MPI's variables,
   read as mmengine reads them). ``Runner.setup_env`` and the strategies' ``_setup_env``
   call ``init_dist`` only when no process group exists yet, so they keep this one;
2. sets ``env_cfg.dist_cfg.backend = 'gloo'`` so the config (and the logged environment)
   says what is used;
3. gives the DDP wrapper ``device_ids=None`` through ``model_wrapper_cfg`` (Runner) or
   ``strategy.model_wrapper`` (FlexibleRunner's DDPStrategy): mmengine passes
   ``device_ids=[LOCAL_RANK]`` only as a default argument, which a config value overrides.

With CUDA available nothing is changed: mmengine's own path (nccl) runs. Setting
``CUDA_VISIBLE_DEVICES=''`` on a GPU machine selects the CPU path.

``setup_deepspeed(cfg)`` for DeepSpeed configs: DeepSpeed needs a process group even for
one process and, without a launcher's variables, looks for MPI (mpi4py): a run without a
launcher gets the env:// variables of a world of one instead. And DeepSpeedStrategy loads
``load_from`` only as a DeepSpeed checkpoint directory: a plain ``.pth`` (an exported or
an ordinary mmengine checkpoint) is loaded into the model before DeepSpeed wraps it.
"""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
from typing import Tuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

LAUNCHERS = ('pytorch', 'slurm', 'mpi')
DEFAULT_PORT = '29500'  # torch.distributed's default, as mmengine uses


def _env_int(name: str, launcher: str) -> int:
    try:
        return int(os.environ[name])
    except KeyError:
        raise RuntimeError(f"launcher '{launcher}' needs the environment variable {name}; "
                           'start the script with its launcher (tools/dist_train.sh, '
                           'tools/slurm_train.sh, mpirun) or use --launcher none') from None


def _ranks_from_env(launcher: str) -> Tuple[int, int, int]:
    """(rank, world size, local rank); sets the env:// variables where a launcher has
    its own names, as mmengine's ``_init_dist_slurm`` / ``_init_dist_mpi`` do."""
    if launcher == 'pytorch':
        rank, world, local = (_env_int(name, launcher)
                              for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'))
        if 'MASTER_ADDR' not in os.environ:
            raise RuntimeError("launcher 'pytorch' needs MASTER_ADDR (set by torchrun)")
    elif launcher == 'slurm':
        rank, world = _env_int('SLURM_PROCID', launcher), _env_int('SLURM_NTASKS', launcher)
        local = int(os.environ.get('SLURM_LOCALID', 0))
        if 'MASTER_ADDR' not in os.environ:  # the first node of the job, as mmengine
            nodes = os.environ.get('SLURM_NODELIST')
            if not nodes:
                raise RuntimeError("launcher 'slurm' needs MASTER_ADDR or SLURM_NODELIST")
            os.environ['MASTER_ADDR'] = subprocess.getoutput(
                f'scontrol show hostname {nodes} | head -n1')
    elif launcher == 'mpi':
        rank = _env_int('OMPI_COMM_WORLD_RANK', launcher)
        world = _env_int('OMPI_COMM_WORLD_SIZE', launcher)
        local = _env_int('OMPI_COMM_WORLD_LOCAL_RANK', launcher)
        if 'MASTER_ADDR' not in os.environ:
            raise RuntimeError("launcher 'mpi' needs MASTER_ADDR (the address of rank 0)")
    else:
        raise ValueError(f'launcher must be one of none, {", ".join(LAUNCHERS)}; '
                         f'got {launcher!r}')
    os.environ.setdefault('MASTER_PORT', DEFAULT_PORT)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    return rank, world, local


def _is_ddp(wrapper_type) -> bool:
    from mmengine.registry import MODEL_WRAPPERS
    cls = MODEL_WRAPPERS.get(wrapper_type) if isinstance(wrapper_type, str) else wrapper_type
    return isinstance(cls, type) and issubclass(cls, DistributedDataParallel)


def _cpu_ddp(wrapper_cfg: dict) -> dict:
    """``wrapper_cfg`` with ``device_ids=None`` when it builds a DDP subclass."""
    wrapper_cfg.setdefault('type', 'MMDistributedDataParallel')
    if _is_ddp(wrapper_cfg['type']):
        wrapper_cfg['device_ids'] = None
    return wrapper_cfg


def _set_model_wrapper(cfg) -> None:
    strategy = cfg.get('strategy')
    if strategy is not None:  # FlexibleRunner
        from mmengine._strategy import DDPStrategy
        from mmengine.registry import STRATEGIES
        stype = strategy.get('type')
        scls = STRATEGIES.get(stype) if isinstance(stype, str) else stype
        wrapper_cfg = strategy.get('model_wrapper')
        if (wrapper_cfg is None and isinstance(scls, type) and issubclass(scls, DDPStrategy)
                and scls._wrap_model is DDPStrategy._wrap_model):
            # The wrapper DDPStrategy._wrap_model builds when model_wrapper is None.
            wrapper_cfg = dict(type='MMDistributedDataParallel', broadcast_buffers=False)
        if wrapper_cfg is not None:
            strategy['model_wrapper'] = _cpu_ddp(wrapper_cfg)
        return
    wrapper_cfg = cfg.get('model_wrapper_cfg')
    if wrapper_cfg is None:
        # The wrapper Runner.wrap_model builds when model_wrapper_cfg is None.
        wrapper_cfg = dict(type='MMDistributedDataParallel', broadcast_buffers=False,
                           find_unused_parameters=cfg.get('find_unused_parameters', False))
    cfg.model_wrapper_cfg = _cpu_ddp(wrapper_cfg)


def setup_cpu_distributed(cfg) -> bool:
    """Prepare ``cfg`` (an mmengine Config with ``launcher`` set) for a CPU-only
    multi-process run and initialize gloo. Returns True when it did so, False when there
    is nothing to do (``launcher='none'`` or CUDA available)."""
    launcher = cfg.get('launcher', 'none') or 'none'
    if launcher == 'none' or torch.cuda.is_available():
        return False
    rank, world, _ = _ranks_from_env(launcher)

    # (Config.setdefault would not keep a new nested dict: assign instead.)
    if cfg.get('env_cfg') is None:
        cfg.env_cfg = dict()
    if cfg.env_cfg.get('dist_cfg') is None:
        cfg.env_cfg.dist_cfg = dict()
    dist_cfg = cfg.env_cfg.dist_cfg
    dist_cfg.backend = 'gloo'  # nccl needs GPUs
    if not dist.is_initialized():
        timeout = dist_cfg.get('timeout')
        kwargs = {} if timeout is None else dict(timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group('gloo', init_method='env://', rank=rank, world_size=world,
                                **kwargs)
    _set_model_wrapper(cfg)
    return True


def is_deepspeed(cfg) -> bool:
    """Whether ``cfg`` trains through FlexibleRunner + DeepSpeedStrategy."""
    strategy = cfg.get('strategy') or {}
    return cfg.get('runner_type') == 'FlexibleRunner' and \
        strategy.get('type') == 'DeepSpeedStrategy'


def setup_deepspeed(cfg) -> bool:
    """For a DeepSpeed config: with ``launcher='none'``, RANK/WORLD_SIZE/LOCAL_RANK and
    MASTER_ADDR/MASTER_PORT (a free local port) of a world of one where not set; a plain
    checkpoint file in ``load_from`` becomes the model's ``init_cfg=dict(type='Pretrained')``.
    Returns whether ``cfg`` is a DeepSpeed config."""
    if not is_deepspeed(cfg):
        return False
    if (cfg.get('launcher') or 'none') == 'none':
        if 'MASTER_PORT' not in os.environ:
            with socket.socket() as sock:
                sock.bind(('127.0.0.1', 0))
                os.environ['MASTER_PORT'] = str(sock.getsockname()[1])
        for name, value in (('RANK', '0'), ('WORLD_SIZE', '1'), ('LOCAL_RANK', '0'),
                            ('MASTER_ADDR', '127.0.0.1')):
            os.environ.setdefault(name, value)
    load_from = cfg.get('load_from')
    if load_from and os.path.isfile(load_from):
        # Loaded by init_weights, which DeepSpeedStrategy calls before deepspeed.initialize;
        # --resume then looks for the latest DeepSpeed checkpoint in the work dir (mmengine
        # would try to resume from load_from, which DeepSpeed cannot read).
        cfg.model.init_cfg = dict(type='Pretrained', checkpoint=load_from)
        cfg.load_from = None
    return True
