"""Swap the batch-norm layers of a built model: BN -> JS-BN family and back."""
from __future__ import annotations

from typing import Type, Union

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .gprebn import GpreBatchNorm, GpreBN1d, GpreBN2d, GpreBN3d, SyncGpreBN
from .jsbn import JSBatchNorm, JSBN1d, JSBN2d, JSBN3d, SyncJSBN

_BY_NAME = {'JSBN1d': JSBN1d, 'JSBN2d': JSBN2d, 'JSBN3d': JSBN3d, 'SyncJSBN': SyncJSBN,
            'GpreBN1d': GpreBN1d, 'GpreBN2d': GpreBN2d, 'GpreBN3d': GpreBN3d,
            'SyncGpreBN': SyncGpreBN}
# names that keep each layer's input rank
_BY_DIM = {'JSBN': {1: JSBN1d, 2: JSBN2d, 3: JSBN3d},
           'GpreBN': {1: GpreBN1d, 2: GpreBN2d, 3: GpreBN3d}}
_BN_BY_DIM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_DIM_OF = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3,
           nn.LazyBatchNorm1d: 1, nn.LazyBatchNorm2d: 2, nn.LazyBatchNorm3d: 3,
           JSBN1d: 1, JSBN2d: 2, JSBN3d: 3, GpreBN1d: 1, GpreBN2d: 2, GpreBN3d: 3}


class BatchNormXd(_BatchNorm):
    """torch BatchNorm for input of any rank >= 2: what a SyncJSBN reverts to."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f'expected at least 2D input (got {x.dim()}D input)')


def dim_of(module: _BatchNorm):
    """1, 2 or 3 for a BatchNorm1d/2d/3d-like layer, None for one of any rank (Sync*)."""
    for cls in type(module).__mro__:
        if cls in _DIM_OF:
            return _DIM_OF[cls]
    return None


def _target_class(module: _BatchNorm, norm: Union[str, Type[_BatchNorm]]):
    if not isinstance(norm, str):
        return norm
    if norm in _BY_NAME:
        return _BY_NAME[norm]
    if norm in _BY_DIM:
        dim = dim_of(module)
        if dim is None:
            raise ValueError(f"cannot tell the input rank of {type(module).__name__}: use "
                             f"'{norm}1d', '{norm}2d', '{norm}3d' or 'Sync{norm}'")
        return _BY_DIM[norm][dim]
    raise ValueError(f'unknown norm {norm!r}; valid: {", ".join([*_BY_DIM, *_BY_NAME])}')


def _swap(old: _BatchNorm, cls, **kwargs) -> _BatchNorm:
    args = dict(eps=old.eps, momentum=old.momentum, affine=old.affine,
                track_running_stats=old.track_running_stats)
    args.update(kwargs)
    new = cls(old.num_features, **args)
    # Share the parameter/buffer objects: weights, requires_grad, device and dtype stay.
    if old.affine and new.affine:
        new.weight, new.bias = old.weight, old.bias
    if old.track_running_stats and new.track_running_stats:
        new.running_mean, new.running_var = old.running_mean, old.running_var
        new.num_batches_tracked = old.num_batches_tracked
    if isinstance(new, GpreBatchNorm):
        new.reset_target()  # the test-time EMA starts from the (new) source statistics
        new._initialized = False  # known: torch.compile needs no read of the flag
    new.train(old.training)
    return new


def _replace(module: nn.Module, make) -> nn.Module:
    out = make(module)
    if out is None:
        out = module
    for name, child in module.named_children():
        new_child = _replace(child, make)
        if new_child is not child:
            out.add_module(name, new_child)
    return out


def convert_norm(model: nn.Module, norm: Union[str, Type[_BatchNorm]] = 'SyncJSBN',
                 **layer_kwargs) -> nn.Module:
    """Replace every ``_BatchNorm`` of ``model`` (SyncBatchNorm, JS-BN, GpreBN included) by
    ``norm``: 'JSBN' or 'GpreBN' (keeping each layer's rank), 'JSBN1d/2d/3d', 'SyncJSBN',
    'GpreBN1d/2d/3d', 'SyncGpreBN', or a class.

    Weights, running statistics, ``requires_grad`` and the train/eval mode are kept;
    ``layer_kwargs`` (e.g. ``estimator='classic'``) go to the new layers' constructor.
    Returns the converted model (the same object unless ``model`` itself is a BN layer).
    """
    _check_convertible(model)  # before any change: a bad model is left as it was

    def make(m):
        if isinstance(m, _BatchNorm):
            return _swap(m, _target_class(m, norm), **layer_kwargs)
        return None
    return _replace(model, make)


# BatchNorm forwards that a swap reproduces exactly (plain torch BN, SyncBatchNorm).
_PLAIN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def _check_convertible(model: nn.Module) -> None:
    """A ``_BatchNorm`` subclass with its own forward (timm's BatchNormAct2d fuses an
    activation, for example) would lose that forward when swapped: refuse it clearly."""
    for name, m in model.named_modules():
        if (isinstance(m, _BatchNorm) and not isinstance(m, (JSBatchNorm, GpreBatchNorm))
                and type(m).forward not in _PLAIN_FORWARDS):
            cls = type(m)
            raise ValueError(
                f"convert_norm: {cls.__module__}.{cls.__qualname__} at '{name or '(model)'}' "
                'overrides BatchNorm.forward (e.g. with a fused activation), which a swap '
                'would drop; build the model with plain BatchNorm layers (e.g. timm: '
                "norm_layer='batchnorm2d' where the model takes one) or swap those layers "
                'yourself. The model was not changed.')


def revert_norm(model: nn.Module) -> nn.Module:
    """Replace every JS-BN and GpreBN layer by torch BatchNorm1d/2d/3d (the Sync ones by
    ``BatchNormXd``), keeping weights, running (source) statistics, ``requires_grad`` and
    the train/eval mode."""
    def make(m):
        if isinstance(m, (JSBatchNorm, GpreBatchNorm)):
            dim = dim_of(m)
            return _swap(m, _BN_BY_DIM[dim] if dim else BatchNormXd)
        return None
    return _replace(model, make)


__all__ = ['convert_norm', 'revert_norm', 'BatchNormXd', 'dim_of']
