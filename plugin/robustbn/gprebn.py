"""GpreBN (test-time batch norm, arXiv 2205.10210): GpreBN1d/2d/3d and SyncGpreBN.

With batch statistics mu_c, sigma_c and dataset-level statistics mu, sigma,

    y = weight * ((x - mu_c) / sigma_c * sg(sigma_c) + sg(mu_c) - mu) / sigma + bias,

whose value is batch norm with the dataset statistics and whose input gradient is the
batch-statistics BN gradient scaled by sigma_c / sigma (sg: stop-gradient). The dataset
statistics mix the frozen source running statistics with a test-time EMA of batch
statistics: mu = theta * mu_target + (1 - theta) * mu_source, the same for the variance.

Order: a training-mode forward normalizes with the target EMA as it was *before* this batch,
then updates it with the batch (as DELTA's TBR), so the value of a train-mode forward equals
the eval-mode output of the layer before the call.

Start of the test-time average (``target_init``): ``'first_batch'`` (DELTA's TBR, GitHub
bwbwzhao/DELTA ``algorithms/delta.py``) sets it from the first adapting batch's statistics
before that batch is normalized, so the first batch is normalized with its own statistics
(batch norm), and the EMA runs from the next batch on; ``'source'`` starts it at the source
running statistics (an unadapted layer is then the source model, and with momentum 0.05
the source statistics dominate for the first few dozen batches). What it averages
(``target_average``): the variance (the GpreBN paper's "the same for the variance") or the
standard deviation sqrt(var + eps) (DELTA's TBR); either way ``target_var`` holds a
variance, sigma_t^2 - eps for the standard deviation average sigma_t, so the buffer names
and the eval-mode formula stay those of BN.
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
from .comm import check_sync_mode
from .estimators import finite_channels, get_estimator
from .functional import as_estimator, batch_moments, count_nonfinite, normalize, shrunk_batch_norm

TARGET_BUFFERS = ('target_mean', 'target_var')
TARGET_INITS = ('first_batch', 'source')
TARGET_AVERAGES = ('var', 'std')


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
            ``target_var``) per training-mode forward (DELTA's prior 0.95). Default: 0.05
        target_init: ``'first_batch'``: the test-time average is set from the statistics
            of the first training-mode batch (of the global batch for SyncGpreBN), which is
            normalized with them (DELTA's TBR); ``'source'``: it starts at the source
            running statistics. ``reset_target()`` returns to the start. Default:
            ``'first_batch'``
        target_average: ``'var'``: the EMA averages the (unbiased) batch variance, as
            the GpreBN paper; ``'std'``: it averages sqrt(var + eps), as DELTA's TBR
            (``target_var`` then stores sigma_t^2 - eps). Default: ``'var'``
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
                 update_source_stats: bool = False, target_init: str = 'first_batch',
                 target_average: str = 'var', device=None, dtype=None) -> None:
        if target_init not in TARGET_INITS:
            raise ValueError(f'target_init must be one of {TARGET_INITS}, got {target_init!r}')
        if target_average not in TARGET_AVERAGES:
            raise ValueError(f'target_average must be one of {TARGET_AVERAGES}, '
                             f'got {target_average!r}')
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
        self.target_init, self.target_average = target_init, target_average
        self.register_buffer('target_mean', self.running_mean.clone())
        self.register_buffer('target_var', self.running_var.clone())
        # Whether the test-time average has seen a batch ('first_batch' sets it from the
        # first one). Saved, so a checkpoint taken during adaptation resumes where it was.
        self.register_buffer('target_initialized',
                             torch.zeros((), dtype=torch.bool, device=device))
        # Host copy of the flag (None: unknown, read the buffer once, e.g. after the flag
        # was written directly): no device sync per forward, and no data-dependent branch
        # for torch.compile where it is known (after a state dict load or convert_norm).
        self._initialized: Optional[bool] = None

    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, theta={self.theta}, '
                f'target_momentum={self.target_momentum}, '
                f'batch_estimator={self.batch_estimator!r}, '
                f'update_source_stats={self.update_source_stats}, '
                f'target_init={self.target_init!r}, target_average={self.target_average!r}')

    @torch.no_grad()
    def reset_target(self) -> None:
        """Return the test-time average to its start: the source statistics, not yet
        initialized (with ``target_init='first_batch'`` the next training-mode batch sets
        it)."""
        self.target_mean.copy_(self.running_mean)
        self.target_var.copy_(self.running_var)
        self.target_initialized.fill_(False)
        self._initialized = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A BN checkpoint has no target statistics: start them from its source statistics.
        for name, source in zip(TARGET_BUFFERS, ('running_mean', 'running_var')):
            if prefix + name not in state_dict and prefix + source in state_dict:
                state_dict[prefix + name] = state_dict[prefix + source].clone()
        flag = prefix + 'target_initialized'
        if flag not in state_dict and prefix + 'target_mean' in state_dict:
            # Saved before the flag existed: initialized if the average moved off the source.
            moved = [not torch.equal(state_dict[prefix + t], state_dict[prefix + s])
                     for t, s in zip(TARGET_BUFFERS, ('running_mean', 'running_var'))
                     if prefix + s in state_dict]
            state_dict[flag] = torch.tensor(any(moved))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if flag in state_dict:  # the flag changed: read it here if that needs no device sync
            saved = state_dict[flag]
            self._initialized = bool(saved) if saved.device.type == 'cpu' else None

    def dataset_stats(self):
        """(mu, var): theta * target + (1 - theta) * source (new tensors)."""
        mu = torch.lerp(self.running_mean, self.target_mean, self.theta)
        var = torch.lerp(self.running_var, self.target_var, self.theta)
        return mu, var

    def _needs_first_batch(self) -> bool:
        if self.target_init != 'first_batch':
            return False
        if self._initialized is None and bool(self.target_initialized):
            self._initialized = True
        return not self._initialized

    @torch.no_grad()
    def _init_target(self, x: Tensor, group, count_nonfinite_here: bool) -> None:
        """Set the test-time average from the (shrunk) statistics of this (global) batch.
        Normalizing with them is batch norm, so the biased variance is stored."""
        n, m, v = batch_moments(x, group, self.sync_mode)
        if not isinstance(n, Tensor) and n == 0:  # an empty local batch: nothing to learn
            return
        mu, var = as_estimator(self._estimator)(m, v, n, finite_channels(m, v))
        ok = count_nonfinite(self.nonfinite_batches if count_nonfinite_here else None, mu, var)
        if isinstance(n, Tensor):  # a global count: no host sync
            ok = ok & (n > 0)
        # A channel without finite statistics keeps the source statistics.
        self.target_mean.copy_(torch.where(ok, mu.to(self.target_mean.dtype), self.running_mean))
        self.target_var.copy_(torch.where(ok, var.to(self.target_var.dtype), self.running_var))
        if isinstance(n, Tensor):
            self.target_initialized.copy_(n > 0)
            self._initialized = None  # known on the device only
        else:
            self.target_initialized.fill_(True)
            self._initialized = True

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self.training:
            mu, var = self.dataset_stats()
            return normalize(x, mu, var, self.weight, self.bias, self.eps)
        group = self._sync_group()
        check_batch_stats_input(x, group)
        updates = []
        if self.update_source_stats:
            updates.append((self.running_mean, self.running_var, ema_factor(self)))
        first = self._needs_first_batch()
        if first:
            # The batch sets the average and is normalized with it; no EMA step on top
            # (the average of one batch is that batch).
            self._init_target(x, group, count_nonfinite_here=not updates)
        elif not self._initialized:  # 'source': the flag only records that a batch came
            self.target_initialized.fill_(True)
            self._initialized = True
        mu, var = self.dataset_stats()
        scratch = None
        if not first:
            if self.target_average == 'var':
                updates.insert(0, (self.target_mean, self.target_var, self.target_momentum))
            else:
                # The Function writes the batch statistics into scratch buffers (factor 1;
                # a non-finite channel keeps the old value, the current average), the
                # standard deviation EMA is taken below.
                scratch = (self.target_mean.clone(), self.target_var.clone())
                updates.insert(0, (*scratch, 1.0))
        y = shrunk_batch_norm(x, self.weight, self.bias, None, None, self._estimator,
                              self.eps, group=group, ref_stats=(mu, var),
                              extra_updates=updates, nonfinite=self.nonfinite_batches,
                              sync_mode=self.sync_mode)
        if scratch is not None:
            self._std_update(*scratch)
        return y

    @torch.no_grad()
    def _std_update(self, batch_mean: Tensor, batch_var: Tensor) -> None:
        """EMA of the mean and of sqrt(var + eps) (DELTA's TBR); target_var = sigma^2 - eps."""
        f = self.target_momentum
        sigma = torch.lerp((self.target_var + self.eps).clamp_min(0).sqrt(),
                           (batch_var + self.eps).clamp_min(0).sqrt(), f)
        self.target_mean.lerp_(batch_mean, f)
        self.target_var.copy_(sigma.square() - self.eps)


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
                 update_source_stats: bool = False, process_group=None,
                 target_init: str = 'first_batch', target_average: str = 'var',
                 sync_mode: str = 'reduce', device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, theta,
                         target_momentum, batch_estimator, update_source_stats, target_init,
                         target_average, device, dtype)
        self.process_group = process_group
        self.sync_mode = check_sync_mode(sync_mode)
