"""James-Stein batch norm layers: JSBN1d/2d/3d and SyncJSBN.

They subclass torch's ``_BatchNorm`` and keep its parameter and buffer names, so BN
checkpoints load unchanged and mmengine/mmcv treat them as BN (weight decay multipliers,
``norm_eval``, ``is_norm``). ``estimator='none'`` is exactly torch BatchNorm.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .estimators import get_estimator
from .functional import normalize, shrunk_batch_norm

EVAL_STATS = ('running', 'batch')


class _JSBatchNorm(_BatchNorm):
    _abbr_ = 'bn'  # mmcv's build_norm_layer names layers bn1, bn2, ... (checkpoint keys)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, estimator: str = 'paper',
                 eval_stats: str = 'running', device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._estimator_fn = get_estimator(estimator)
        if eval_stats not in EVAL_STATS:
            raise ValueError(f'eval_stats must be one of {EVAL_STATS}, got {eval_stats!r}')
        self.estimator = estimator
        self.eval_stats = eval_stats
        # Set by ShrinkageMonitorHook for the iterations it logs: the next batch-statistics
        # forward stores its shrinkage_factors (device tensor) in last_factors.
        self.record_factors = False
        self.last_factors: Optional[Tensor] = None

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, estimator={self.estimator!r}, eval_stats={self.eval_stats!r}'

    def _sync_group(self):
        """The process group to synchronize statistics over, or None for local statistics."""
        return None

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        check_channels(self, x)
        use_batch_stats = (self.training or self.running_mean is None
                           or self.eval_stats == 'batch')
        if not use_batch_stats:
            return normalize(x, self.running_mean, self.running_var, self.weight, self.bias,
                             self.eps)

        group = self._sync_group()
        check_batch_stats_input(x, group)
        avg_factor = ema_factor(self) if self.training and self.track_running_stats else 0.0
        record = [] if self.record_factors else None
        y = shrunk_batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                              self._estimator_fn, self.eps, avg_factor, group, record)
        if record:
            self.last_factors = record[0]
        return y


class JSBN1d(_JSBatchNorm):
    """James-Stein BatchNorm over (N, C) or (N, C, L) input."""

    def _check_input_dim(self, x):
        if x.dim() not in (2, 3):
            raise ValueError(f'expected 2D or 3D input (got {x.dim()}D input)')


class JSBN2d(_JSBatchNorm):
    """James-Stein BatchNorm over (N, C, H, W) input."""

    def _check_input_dim(self, x):
        if x.dim() != 4:
            raise ValueError(f'expected 4D input (got {x.dim()}D input)')


class JSBN3d(_JSBatchNorm):
    """James-Stein BatchNorm over (N, C, D, H, W) input."""

    def _check_input_dim(self, x):
        if x.dim() != 5:
            raise ValueError(f'expected 5D input (got {x.dim()}D input)')


class SyncJSBN(_JSBatchNorm):
    """James-Stein BatchNorm with statistics over all ranks of ``process_group``.

    Exactly JS-BN on the concatenation of all ranks' batches (uneven and empty per-rank
    batches included). Without an initialized process group, or with one rank, it is
    JSBN, so single-GPU and CPU runs need no conversion. Any input with >= 2 dims.
    Unlike torch's SyncBatchNorm it runs on CPU with gloo, and it is deliberately not an
    ``nn.SyncBatchNorm`` subclass, so mmengine's ``revert_sync_batchnorm`` keeps it.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, estimator: str = 'paper',
                 eval_stats: str = 'running', process_group=None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, estimator,
                         eval_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f'expected at least 2D input (got {x.dim()}D input)')

    def _sync_group(self):
        return sync_group(self.process_group)


def ema_factor(layer: _BatchNorm) -> float:
    """Count one more tracked batch and return the running-statistics EMA factor, as
    _BatchNorm.forward does (momentum=None: cumulative average)."""
    if layer.num_batches_tracked is not None:
        layer.num_batches_tracked.add_(1)
    if layer.momentum is None:
        return 1.0 / float(layer.num_batches_tracked)
    return layer.momentum


def sync_group(process_group=None):
    """The group to synchronize statistics over: None without an initialized process group
    or with one rank (then statistics are local, exactly as without synchronization)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def check_batch_stats_input(x: Tensor, group) -> None:
    """BatchNorm's error for a batch with one value per channel (checked locally only:
    across ranks the global count would need a host sync)."""
    if group is None and x.numel() // x.size(1) <= 1:
        raise ValueError('Expected more than 1 value per channel when using batch '
                         f'statistics, got input size {tuple(x.shape)}')


def check_channels(layer: _BatchNorm, x: Tensor) -> None:
    if x.size(1) != layer.num_features:
        raise ValueError(f'{type(layer).__name__} expected {layer.num_features} channels '
                         f'(dim 1), got input of shape {tuple(x.shape)}')
