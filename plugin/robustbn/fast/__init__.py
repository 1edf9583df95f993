"""CUDA fast path of the shrunk batch norm: Triton kernels, 3 launches forward and 3
backward per layer (plus one collective each way when synchronized).

``shrunk_batch_norm`` takes it when :func:`fast_path_estimator` names an estimator:

- mode ``'auto'``: CUDA input in float32/bfloat16/float16, Triton importable;
- mode ``'on'``: any device and float64 too (CPU tensors need ``TRITON_INTERPRET=1``, set
  before Triton is imported: the kernels then run in Triton's interpreter, for tests);
- mode ``'off'`` (default): never (the reference path: plain torch, autograd on the
  C-vectors). The default stays 'off' until the GPU tests (tests/core/test_gpu.py) and
  benchmarks have run on hardware: the kernels are verified in Triton's interpreter only.

In every mode, calls the kernels cannot take use the reference path: an estimator without
a fast-path code (users' own from :func:`robustbn.register_estimator`, or a bare callable),
more than two running-statistics updates, more than ``MAX_CHANNELS`` channels.
The mode comes from the environment variable ``ROBUSTBN_FAST`` (``auto``/``1``/``0``) and
can be changed with :func:`set_fast_path` or the :func:`fast_path` context manager.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from ..estimators import EstimatorSpec

MODES = ('auto', 'on', 'off')
_ENV_MODES = {'auto': 'auto', '': 'off', '1': 'on', 'on': 'on', '0': 'off', 'off': 'off'}
# One program holds every channel's statistics in registers; beyond this, the reference.
MAX_CHANNELS = 8192
AUTO_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPES = AUTO_DTYPES + (torch.float64,)

TRITON_AVAILABLE = importlib.util.find_spec('triton') is not None
INTERPRETING = os.environ.get('TRITON_INTERPRET', '0') == '1'


def _mode_from_env() -> str:
    value = os.environ.get('ROBUSTBN_FAST', 'off').strip().lower()
    if value not in _ENV_MODES:
        raise ValueError(f'ROBUSTBN_FAST must be one of auto, 1, 0 (or on, off), got {value!r}')
    return _ENV_MODES[value]


_mode = _mode_from_env()


def get_fast_path() -> str:
    return _mode


def set_fast_path(mode: str) -> None:
    """'auto', 'on' or 'off' (see the module docstring)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f'fast path mode must be one of {MODES}, got {mode!r}')
    _mode = mode


@contextlib.contextmanager
def fast_path(mode: str):
    """Run a block with the fast path mode set to ``mode``."""
    old = _mode
    set_fast_path(mode)
    try:
        yield
    finally:
        set_fast_path(old)


def builtin_name(estimator):
    """The name of an estimator the kernels implement (a spec with a fast-path code), None
    for anything else."""
    if isinstance(estimator, EstimatorSpec) and estimator.fast_code is not None:
        return estimator.name
    return None


def fast_path_estimator(x: torch.Tensor, estimator, num_updates: int):
    """The estimator's name when the fast path takes this call, else None."""
    if _mode == 'off':
        return None
    name = builtin_name(estimator)
    if name is None or num_updates > 2 or x.dim() < 2 or not 0 < x.size(1) <= MAX_CHANNELS:
        return None
    if _mode == 'auto':
        ok = x.is_cuda and x.dtype in AUTO_DTYPES and TRITON_AVAILABLE
        return name if ok else None
    if x.dtype not in DTYPES:
        return None
    if not TRITON_AVAILABLE:
        raise RuntimeError('robustbn fast path forced on (ROBUSTBN_FAST=1) but triton is not '
                           'installed')
    if not x.is_cuda and not INTERPRETING:
        raise RuntimeError('robustbn fast path forced on for a CPU tensor: that needs Triton\'s '
                           'interpreter (TRITON_INTERPRET=1 set before triton is imported)')
    return name


def shrunk_batch_norm_fast(x, weight, bias, name, eps, group, updates, ref_stats, record,
                           nonfinite=None, sync_mode='reduce'):
    from .ops import shrunk_batch_norm_fast as impl
    return impl(x, weight, bias, name, eps, group, updates, ref_stats, record, nonfinite,
                sync_mode)
