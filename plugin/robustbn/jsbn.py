"""James-Stein batch norm layers: JSBN1d/2d/3d and SyncJSBN.

Batch norm whose per-channel batch mean and variance are replaced by shrinkage estimates
(``robustbn.estimators``) in training; eval mode uses the running statistics, which are
an EMA of the estimates used. ``estimator='none'`` is exactly torch BatchNorm.
"""
from __future__ import annotations

from typing import Optional

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
from .estimators import get_estimator
from .functional import normalize, shrunk_batch_norm

EVAL_STATS = ('running', 'batch')

_ARGS = ARGS_HEAD + r"""\
        momentum: the value used for the running_mean and running_var computation.
            Can be set to ``None`` for cumulative moving average. Default: 0.1
        affine: when ``True``, the layer has learnable affine parameters. Default: ``True``
        track_running_stats: when ``True``, the layer tracks running statistics (an EMA
            of the shrunk estimates) and uses them in eval mode; when ``False``, it uses
            batch statistics in both modes. Default: ``True``
        estimator: name of the shrinkage estimator of the batch statistics:
            ``'paper'``, ``'paper_mean'``, ``'wacv'``, ``'classic'``, ``'none'`` (plain
            BatchNorm) or one added with :func:`robustbn.register_estimator`.
            Default: ``'paper'``
        eval_stats: ``'running'`` (as BatchNorm) or ``'batch'``: eval mode normalizes
            with the estimator's statistics of the current batch, as the paper's code
            does (predictions then depend on the rest of the batch). Default: ``'running'``
""" + SHAPE_DOC + r"""
    Examples::

        >>> m = robustbn.{name}({example})
        >>> output = m(torch.randn({input}))
"""


class JSBatchNorm(ShrunkBatchNorm):
    """Base of the JS-BN layers (not for direct use): the estimator and the forward."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, estimator: str = 'paper',
                 eval_stats: str = 'running', device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._estimator = get_estimator(estimator)
        if eval_stats not in EVAL_STATS:
            raise ValueError(f'eval_stats must be one of {EVAL_STATS}, got {eval_stats!r}')
        self.estimator = estimator
        self.eval_stats = eval_stats
        # Set by ShrinkageMonitorHook for the iterations it logs: the next batch-statistics
        # forward stores its shrinkage_factors (device tensor) in last_factors.
        self.record_factors = False
        self.last_factors: Optional[Tensor] = None

    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, estimator={self.estimator!r}, '
                f'eval_stats={self.eval_stats!r}')

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
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
                              self._estimator, self.eps, avg_factor, group, record,
                              nonfinite=self.nonfinite_batches, sync_mode=self.sync_mode)
        if record:
            self.last_factors = record[0]
        return y


class JSBN1d(JSBatchNorm):
    __doc__ = """James-Stein batch norm over a 2D or 3D input.
""" + _ARGS.format(shape='N, C)` or :math:`(N, C, L', name='JSBN1d', example='100',
                   input='20, 100', extra='')
    input_dims = (2, 3)


class JSBN2d(JSBatchNorm):
    __doc__ = """James-Stein batch norm over a 4D input (a mini-batch of 2D inputs with
    channels): y = weight * (x - mean_used) / sqrt(var_used + eps) + bias, where
    (mean_used, var_used) = estimator(batch mean, biased batch variance, N * H * W) per
    channel in training (and with ``eval_stats='batch'``), the running statistics in eval.
""" + _ARGS.format(shape='N, C, H, W', name='JSBN2d', example="100, estimator='classic'",
                   input='20, 100, 35, 45', extra='')
    input_dims = (4,)


class JSBN3d(JSBatchNorm):
    __doc__ = """James-Stein batch norm over a 5D input.
""" + _ARGS.format(shape='N, C, D, H, W', name='JSBN3d', example='100',
                   input='20, 100, 35, 45, 10', extra='')
    input_dims = (5,)


class SyncJSBN(JSBatchNorm):
    __doc__ = """James-Stein batch norm with statistics over all ranks of ``process_group``.

    Exactly JS-BN on the concatenation of all ranks' batches (uneven and empty per-rank
    batches included): one collective of per-channel statistics forward (by default an
    ``all_reduce`` of 2C + 1 float64 sums, whatever the world size), one ``all_reduce`` of
    two per-channel sums backward. Without an initialized process group,
    or with one rank, it is JSBN, so single-GPU and CPU runs need no conversion. Unlike
    torch's SyncBatchNorm it runs on CPU with gloo, and it is deliberately not an
    ``nn.SyncBatchNorm`` subclass, so mmengine's ``revert_sync_batchnorm`` keeps it.
""" + _ARGS.format(shape='N, C, +', name='SyncJSBN', example='100',
                   input='20, 100, 35, 45', extra=PROCESS_GROUP_ARG)

    synchronized = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, estimator: str = 'paper',
                 eval_stats: str = 'running', process_group=None, sync_mode: str = 'reduce',
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, estimator,
                         eval_stats, device, dtype)
        self.process_group = process_group
        self.sync_mode = check_sync_mode(sync_mode)

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, sync_mode={self.sync_mode!r}'
