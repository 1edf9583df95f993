"""GpreBN (test-time batch norm, arXiv 2205.10210): GpreBN1d/2d/3d and SyncGpreBN.

With batch statistics mu_c, sigma_c and dataset-level statistics mu, sigma,

    y = weight * ((x - mu_c) / sigma_c * sg(sigma_c) + sg(mu_c) - mu) / sigma + bias,

whose value is batch norm with the dataset statistics and whose input gradient is the
batch-statistics BN gradient scaled by sigma_c / sigma (sg: stop-gradient). The dataset
statistics mix the frozen source running statistics with a test-time EMA of batch
statistics: mu = theta * mu_target + (1 - theta) * mu_source, the same for the variance.

Order: a training-mode forward normalizes with the target EMA as it was *before* this batch,
then updates it with the batch (as DELTA's TBR), so a batch never normalizes itself and the
value of a train-mode forward equals the eval-mode output of the layer before the call.
The target EMA starts at the source statistics: an unadapted GpreBN is the source model.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import (
    ARGS_HEAD,
    PROCESS_GROUP_ARG,
    SHAPE_DOC,
    ShrunkBatchNorm,
    check_batch_stats_input,
    ema_factor,
)
from .estimators import get_estimator
from .functional import normalize, shrunk_batch_norm

TARGET_BUFFERS = ('target_mean', 'target_var')


_ARGS = ARGS_HEAD + r"""\
        momentum: the source running statistics' EMA factor, used only with
            ``update_source_stats=True`` (``None``: cumulative average). Default: 0.1
        affine: when ``True``, the layer has learnable affine parameters (the ones
            test-time adaptation optimizes). Default: ``True``
        track_running_stats: must be ``True``: the running statistics are the source
            statistics.
        theta: weight of the test-time average in the dataset statistics,
            mu = theta * target_mean + (1 - theta) * running_mean (the same for the
            variance); 0 is the source model. Default: 1.0
        target_momentum: EMA factor of the test-time average (``target_mean``,
            ``target_var``) per training-mode forward. Default: 0.05
        batch_estimator: ``'sample'`` (plain batch statistics, the paper) or a JS-BN
            estimator name that shrinks the batch statistics. Default: ``'sample'``
        update_source_stats: also update the source running statistics with the batch
            statistics (with ``momentum``). Default: ``False``
""" + SHAPE_DOC + r"""
    Examples::

        >>> m = robustbn.{name}(100)
        >>> m.load_state_dict(nn.BatchNorm{bn}(100).state_dict())  # source statistics
        >>> output = m.train()(torch.randn({input}))  # value: BN, dataset statistics
"""


class GpreBatchNorm(ShrunkBatchNorm):
    """Base of the GpreBN layers (not for direct use): dataset statistics and the forward."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, theta: float = 1.0,
                 target_momentum: float = 0.05, batch_estimator: str = 'sample',
                 update_source_stats: bool = False, device=None, dtype=None) -> None:
        if not track_running_stats:
            raise ValueError(f'{type(self).__name__} needs the source running statistics: '
                             'track_running_stats must be True')
        if not 0.0 <= theta <= 1.0:
            raise ValueError(f'theta must be in [0, 1], got {theta}')
        if not 0.0 <= target_momentum <= 1.0:
            raise ValueError(f'target_momentum must be in [0, 1], got {target_momentum}')
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        # 'sample' = plain batch statistics; a JS-BN estimator name shrinks them.
        self._estimator = get_estimator('none' if batch_estimator == 'sample'
                                        else batch_estimator)
        self.batch_estimator = batch_estimator
        self.theta = theta
        self.target_momentum = target_momentum
        self.update_source_stats = update_source_stats
        self.register_buffer('target_mean', self.running_mean.clone())
        self.register_buffer('target_var', self.running_var.clone())

    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, theta={self.theta}, '
                f'target_momentum={self.target_momentum}, '
                f'batch_estimator={self.batch_estimator!r}, '
                f'update_source_stats={self.update_source_stats}')

    @torch.no_grad()
    def reset_target(self) -> None:
        """Restart the test-time EMA from the source statistics."""
        self.target_mean.copy_(self.running_mean)
        self.target_var.copy_(self.running_var)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A BN checkpoint has no target statistics: start them from its source statistics.
        for name, source in zip(TARGET_BUFFERS, ('running_mean', 'running_var')):
            if prefix + name not in state_dict and prefix + source in state_dict:
                state_dict[prefix + name] = state_dict[prefix + source].clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def dataset_stats(self):
        """(mu, var): theta * target + (1 - theta) * source (new tensors)."""
        mu = torch.lerp(self.running_mean, self.target_mean, self.theta)
        var = torch.lerp(self.running_var, self.target_var, self.theta)
        return mu, var

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        mu, var = self.dataset_stats()
        if not self.training:
            return normalize(x, mu, var, self.weight, self.bias, self.eps)
        group = self._sync_group()
        check_batch_stats_input(x, group)
        updates = [(self.target_mean, self.target_var, self.target_momentum)]
        if self.update_source_stats:
            updates.append((self.running_mean, self.running_var, ema_factor(self)))
        return shrunk_batch_norm(x, self.weight, self.bias, None, None, self._estimator,
                                 self.eps, group=group, ref_stats=(mu, var),
                                 extra_updates=updates, nonfinite=self.nonfinite_batches)


class GpreBN1d(GpreBatchNorm):
    __doc__ = """GpreBN over a 2D or 3D input.
""" + _ARGS.format(shape='N, C)` or :math:`(N, C, L', name='GpreBN1d', bn='1d',
                   input='20, 100', extra='')
    input_dims = (2, 3)


class GpreBN2d(GpreBatchNorm):
    __doc__ = """GpreBN (test-time batch norm) over a 4D input: in training mode the value
    is batch norm with the dataset statistics, the input gradient that of batch norm with
    the batch statistics (scaled by sigma_c / sigma); eval mode normalizes with the
    dataset statistics.
""" + _ARGS.format(shape='N, C, H, W', name='GpreBN2d', bn='2d', input='20, 100, 35, 45',
                   extra='')
    input_dims = (4,)


class GpreBN3d(GpreBatchNorm):
    __doc__ = """GpreBN over a 5D input.
""" + _ARGS.format(shape='N, C, D, H, W', name='GpreBN3d', bn='3d',
                   input='20, 100, 35, 45, 10', extra='')
    input_dims = (5,)


class SyncGpreBN(GpreBatchNorm):
    __doc__ = """GpreBN with batch statistics (and the backward's sums) over all ranks of
    ``process_group``: exactly GpreBN on the concatenated batch; GpreBN without a group.
""" + _ARGS.format(shape='N, C, +', name='SyncGpreBN', bn='2d', input='20, 100, 35, 45',
                   extra=PROCESS_GROUP_ARG)

    synchronized = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, theta: float = 1.0,
                 target_momentum: float = 0.05, batch_estimator: str = 'sample',
                 update_source_stats: bool = False, process_group=None, device=None,
                 dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, theta,
                         target_momentum, batch_estimator, update_source_stats, device, dtype)
        self.process_group = process_group
