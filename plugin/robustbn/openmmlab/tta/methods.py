"""Test-time adaptation methods: model preparation, adapted parameters, entropy, reset.

``source``: the model as trained. ``bn_adapt``: every batch-norm layer normalizes with the
current test batch's statistics (no gradient). ``tent``: the same plus entropy
minimization of the norm layers' affine parameters (TENT, arXiv 2006.10726). ``gprebn``:
BN layers converted to GpreBN and the same entropy minimization (arXiv 2205.10210, with
DELTA's optimizer).

Train mode of the other layers (dropout, drop path, ...): TENT's ``configure_model`` puts
the whole model in train mode, so ``tent`` does too by default; ``source``, ``bn_adapt``
and ``gprebn`` (DELTA keeps the model in eval mode) do not. The norm layers behave as above
either way.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from mmengine.registry import OPTIMIZERS
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...convert import convert_norm, dim_of
from ...gprebn import GpreBatchNorm, GpreBN2d
from ...jsbn import JSBatchNorm, SyncJSBN

METHODS = ('source', 'bn_adapt', 'tent', 'gprebn')
GRADIENT_METHODS = ('tent', 'gprebn')
# TENT's paper setting (Adam 1e-3) and DELTA's for GpreBN/TBR (SGD 2.5e-4, momentum 0.9).
DEFAULT_OPTIMIZERS = {
    'tent': dict(type='Adam', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0),
    'gprebn': dict(type='SGD', lr=2.5e-4, momentum=0.9),
}
GPREBN_KWARGS = ('theta', 'target_momentum', 'batch_estimator', 'update_source_stats',
                 'target_init', 'target_average')
# Methods whose reference implementation adapts with the non-norm layers in train mode.
TRAIN_MODE_METHODS = ('tent',)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f'method must be one of {", ".join(METHODS)}; got {method!r}')


def check_steps(steps) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f'steps must be an integer >= 1, got {steps!r}')


def check_train_mode(train_mode) -> None:
    if train_mode is not None and not isinstance(train_mode, bool):
        raise ValueError(f'train_mode must be None, True or False, got {train_mode!r}')


def default_train_mode(method: str, train_mode: Optional[bool] = None) -> bool:
    """Whether the non-norm layers run in train mode: ``train_mode`` when given, else the
    method's reference implementation (True for 'tent' only)."""
    return method in TRAIN_MODE_METHODS if train_mode is None else train_mode


def check_norm_kwargs(norm_kwargs: Optional[dict]) -> dict:
    norm_kwargs = dict(norm_kwargs or {})
    unknown = sorted(set(norm_kwargs) - set(GPREBN_KWARGS))
    if unknown:
        raise ValueError(f'unknown norm_kwargs {unknown}; GpreBN takes {", ".join(GPREBN_KWARGS)}')
    GpreBN2d(1, **norm_kwargs)  # bad values (theta, target_init, ...) fail here, clearly
    return norm_kwargs


def optimizer_cfg(method: str, optimizer: Optional[dict]) -> Optional[dict]:
    """The optimizer config for ``method`` (its default when ``optimizer`` is None), checked
    against mmengine's OPTIMIZERS registry; None for methods without gradient steps."""
    if method not in GRADIENT_METHODS:
        return None
    cfg = dict(DEFAULT_OPTIMIZERS[method] if optimizer is None else optimizer)
    if 'params' in cfg:
        raise ValueError('optimizer must not set params: the norm affine parameters are adapted')
    if OPTIMIZERS.get(cfg.get('type')) is None:
        raise ValueError(f"optimizer type {cfg.get('type')!r} is not in mmengine's OPTIMIZERS "
                         "registry (e.g. 'SGD', 'Adam')")
    return cfg


def replace_norms(model: nn.Module, make: Callable[[_BatchNorm], nn.Module]) -> nn.Module:
    """Replace every ``_BatchNorm`` ``m`` of ``model`` by ``make(m)`` (in place)."""
    if isinstance(model, _BatchNorm):
        return make(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, _BatchNorm):
            parent_name, _, child = name.rpartition('.')
            new = make(m)
            if new is not m:
                setattr(model.get_submodule(parent_name), child, new)
    return model


def _batch_stats_layer(m: _BatchNorm, sync: bool) -> nn.Module:
    """A layer whose eval-mode forward normalizes with the batch's statistics and leaves
    its running statistics alone."""
    if isinstance(m, JSBatchNorm):  # keep the trained model's (shrunk) batch statistics
        if sync and not isinstance(m, SyncJSBN):
            m = convert_norm(m, 'SyncJSBN', estimator=m.estimator)
        m.eval_stats = 'batch'
        return m
    if sync or isinstance(m, GpreBatchNorm):
        # SyncJSBN with estimator 'none' is exactly BN, with statistics over all ranks
        # (torch's SyncBatchNorm refuses CPU tensors) and for input of any rank.
        return convert_norm(m, 'SyncJSBN', estimator='none', eval_stats='batch')
    # TENT's way for torch BN: without running statistics, eval mode uses batch statistics.
    m.track_running_stats = False
    m.running_mean = m.running_var = None
    return m


def _gprebn_layer(m: _BatchNorm, sync: bool, norm_kwargs: dict) -> nn.Module:
    # SyncGpreBN takes any input rank and is GpreBN without a group: use it where the
    # layer's rank is unknown (torch SyncBatchNorm, mmengine's reverted BatchNormXd).
    norm = 'SyncGpreBN' if sync or dim_of(m) is None else 'GpreBN'
    new = convert_norm(m, norm, **norm_kwargs)
    new.train()  # GpreBN's test-time forward (and gradient) is its training-mode forward
    return new


def norm_affine_params(model: nn.Module) -> List[nn.Parameter]:
    """The weight and bias of every affine batch-norm layer (TENT's parameter choice)."""
    params, seen = [], set()
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.affine:
            for p in (m.weight, m.bias):
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


def configure_model(model: nn.Module, method: str, norm_kwargs: Optional[dict] = None,
                    sync: bool = False, train_mode: Optional[bool] = None) -> nn.Module:
    """Prepare ``model`` (a copy: it is changed in place) for ``method``. ``sync``: batch
    statistics over all ranks of the default process group. ``train_mode``: the non-norm
    layers (dropout, ...) in train mode; None: the method's default (see the module)."""
    check_method(method)
    check_train_mode(train_mode)
    if default_train_mode(method, train_mode):
        model.train()  # as TENT: dropout and the like as in training
        for m in model.modules():  # norm layers: batch statistics in eval mode (below)
            if isinstance(m, _BatchNorm):
                m.eval()
    else:
        model.eval()  # dropout and the like stay in inference mode
    if method in ('bn_adapt', 'tent'):
        model = replace_norms(model, lambda m: _batch_stats_layer(m, sync))
    elif method == 'gprebn':
        kwargs = check_norm_kwargs(norm_kwargs)
        model = replace_norms(model, lambda m: _gprebn_layer(m, sync, kwargs))
    if method in GRADIENT_METHODS:
        model.requires_grad_(False)
        params = norm_affine_params(model)
        if not params:
            raise ValueError(f"method '{method}' adapts the affine parameters of batch-norm "
                             'layers, and the model has none')
        for p in params:
            p.requires_grad_(True)
    return model


def build_optimizer(cfg: dict, params: List[nn.Parameter]) -> torch.optim.Optimizer:
    return OPTIMIZERS.build(dict(cfg, params=params))


def entropy_sum(logits: Tensor) -> Tuple[Tensor, int]:
    """Sum of the prediction entropies over all positions of ``logits`` (N, K, ...) — one
    per sample, or per sample and pixel — and the number of positions. Classes on dim 1
    (softmax); a single channel is a sigmoid (binary) prediction, as mmseg treats it."""
    # float32 under fp16/bf16 autocast; a float64 model keeps its precision
    x = logits if logits.dtype == torch.float64 else logits.float()
    if x.size(1) == 1:
        p = torch.sigmoid(x)
        h = p * F.softplus(-x) + (1 - p) * F.softplus(x)
    else:
        logp = x.log_softmax(dim=1)
        h = -(logp.exp() * logp).sum(dim=1)
    return h.sum(), h.numel()


def find_logits_module(model: nn.Module, name: Optional[str] = None) -> nn.Module:
    """The submodule whose output is the logits: ``name`` if given, else mmseg's
    ``decode_head.conv_seg`` (the last head of a cascade), else ``head`` (classifiers)."""
    if name:
        try:
            return model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f'logits_module {name!r} is not a submodule of the model') from e
    head = getattr(model, 'decode_head', None)
    if head is not None:
        head = head[-1] if isinstance(head, nn.ModuleList) else head
        conv = getattr(head, 'conv_seg', None)
        if isinstance(conv, nn.Module):
            return conv
    head = getattr(model, 'head', None)
    if isinstance(head, nn.Module):
        return head
    raise ValueError(f'cannot tell which submodule of {type(model).__name__} outputs the '
                     "logits; set the loop's logits_module to its name")


@contextlib.contextmanager
def capture_outputs(module: nn.Module):
    """Collect every output of ``module`` while active: the logits of the very forward
    that makes the predictions (mmseg's slide inference calls the head once per crop)."""
    outputs: List[Tensor] = []

    def hook(_, __, out):
        if not isinstance(out, Tensor):
            raise TypeError(f'the logits module {type(module).__name__} returned '
                            f'{type(out).__name__}, not a tensor of logits')
        outputs.append(out)
    handle = module.register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


class Snapshot:
    """Model and optimizer state to return to: episodic adaptation resets after every batch."""

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
        # Clones: a state_dict shares storage with the live tensors.
        self.model_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.optim_state = None if optimizer is None else copy.deepcopy(optimizer.state_dict())

    def restore(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
        model.load_state_dict(self.model_state)  # copy_ into the live tensors: bit-identical
        if optimizer is not None:
            optimizer.load_state_dict(copy.deepcopy(self.optim_state))
