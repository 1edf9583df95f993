"""What the JS-BN and GpreBN layer families share: input checks, the process group to
synchronize over, and the running-statistics bookkeeping of torch's ``_BatchNorm``."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

# Pieces of the public layers' docstrings (formatted with shape, name, ...).
ARGS_HEAD = r"""
    Args:
        num_features: :math:`C` from an expected input of size :math:`({shape})`.
        eps: a value added to the denominator for numerical stability. Default: 1e-5
"""
PROCESS_GROUP_ARG = """\
        process_group: the group to synchronize over; None: the default (world) group.
        sync_mode: how the forward merges the ranks' statistics: ``'reduce'`` (one
            ``all_reduce`` of 2C + 1 float64 sums, the same size at any world size) or
            ``'gather'`` (one ``all_gather`` of every rank's 2C + 1 moments; each rank
            receives W times that). Equal results up to rounding. Default: ``'reduce'``
"""
SHAPE_DOC = r"""{extra}
    Shape:
        - Input: :math:`({shape})`
        - Output: :math:`({shape})` (same shape as input)
"""


class ShrunkBatchNorm(_BatchNorm):
    """Base of every robustbn norm layer (not for direct use).

    A ``_BatchNorm`` subclass with torch's parameter and buffer names, so BN checkpoints
    load unchanged and mmengine/mmcv treat the layers as BN (weight decay multipliers,
    ``norm_eval``, ``is_norm``). Subclasses set ``input_dims`` (the accepted ``x.dim()``
    values, None for any >= 2) and, for the synchronized layers, ``synchronized = True``
    with ``process_group`` and ``sync_mode`` attributes.
    """

    _abbr_ = 'bn'  # mmcv's build_norm_layer names layers bn1, bn2, ... (checkpoint keys)
    input_dims: Optional[Tuple[int, ...]] = None
    synchronized = False
    process_group = None
    sync_mode = 'reduce'

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype)
        # Training batches whose statistics were not finite in some channel (that
        # channel's running statistics were kept). Not saved: BN checkpoints stay as they are.
        self.register_buffer('nonfinite_batches',
                             torch.zeros((), dtype=torch.long, device=device), persistent=False)

    def _check_input_dim(self, x: Tensor) -> None:
        dims = self.input_dims
        if dims is None and x.dim() < 2:
            raise ValueError(f'expected at least 2D input (got {x.dim()}D input)')
        if dims is not None and x.dim() not in dims:
            want = ' or '.join(f'{d}D' for d in dims)
            raise ValueError(f'expected {want} input (got {x.dim()}D input)')

    def _check_input(self, x: Tensor) -> None:
        self._check_input_dim(x)
        if x.size(1) != self.num_features:
            raise ValueError(f'{type(self).__name__} expected {self.num_features} channels '
                             f'(dim 1), got input of shape {tuple(x.shape)}')

    def _sync_group(self):
        """The process group to synchronize statistics over, or None for local ones."""
        return sync_group(self.process_group) if self.synchronized else None


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
    across ranks the global count would need a host sync). An empty batch is fine."""
    if group is None and x.numel() // x.size(1) == 1:
        raise ValueError('Expected more than 1 value per channel when using batch '
                         f'statistics, got input size {tuple(x.shape)}')


__all__ = ['ShrunkBatchNorm', 'ema_factor', 'sync_group', 'check_batch_stats_input']
