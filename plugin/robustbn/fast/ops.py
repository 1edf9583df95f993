"""Host side of the fast path: launch configuration, the forward and backward passes, an
autograd Function (eager) and custom ops (torch.compile).

Forward: ``moments_kernel`` (partials of (count, mean, M2)) -> [synchronized: the
partials merged over ranks, ``robustbn.comm.sync_moment_rows``] -> ``estimate_kernel``
(merge, estimator, affine map, EMA updates) -> ``channel_affine_kernel`` (output).
Backward: ``grad_sums_kernel`` -> [``all_reduce``] -> ``vjp_kernel`` ->
``channel_affine_kernel`` (input gradient). Nothing waits on the device.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import comm
from ..estimators import ESTIMATORS, shrinkage_factors
from ..functional import count_nonfinite, stat_dtype, update_running
from . import INTERPRETING
from . import kernels as K
from . import vector_kernels as V

# Speed only, not results (beyond rounding); not yet tuned on a GPU. Elements per tile of
# the reduction and elementwise kernels; programs per SM the local reductions aim for;
# rows x channels of the partials when synchronized: their row count depends on C only,
# so every rank gathers and all-reduces buffers of one size whatever its batch.
TUNING = dict(reduce_tile=2048, affine_tile=4096, programs_per_sm=8, max_splits=256,
              sync_rows_x_channels=4096, min_sync_rows=2, max_sync_rows=64)
FOR_LOOP = not INTERPRETING


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_SM_COUNT = {}


def _sm_count(device: torch.device) -> int:
    if device.type != 'cuda':
        return 2  # the interpreter: few programs
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def layout(t: Tensor) -> Optional[bool]:
    """True: rows of C contiguous values (channels last, or no spatial dims); False:
    contiguous NC(D)HW; None: neither (copied first)."""
    if t.is_contiguous():
        return math.prod(t.shape[2:]) == 1
    if t.dim() > 2 and t.permute(0, *range(2, t.dim()), 1).is_contiguous():
        return True
    return None


def to_layout(t: Tensor, cl: bool) -> Tensor:
    if not cl:
        return t.contiguous()
    d = t.dim()
    return t.permute(0, *range(2, d), 1).contiguous().permute(0, d - 1, *range(1, d - 1))


class Config(NamedTuple):
    cl: bool
    N: int
    C: int
    HW: int
    R: int
    programs: int   # channel programs of the reduction kernels (grid axis 0)
    splits: int     # S: rows of partials (grid axis 1)
    block_a: int
    block_b: int
    num_tiles: int
    n_hw_tiles: int


def reduce_config(shape, cl: bool, synced: bool, device: torch.device) -> Config:
    n, c = shape[0], shape[1]
    hw = math.prod(shape[2:])
    tile = TUNING['reduce_tile']
    if cl:
        bb = min(_pow2(c), 16 if synced else 32)  # narrower: more programs for fixed rows
        ba = max(1, tile // bb)
        n_hw_tiles, num_tiles, programs = 1, _cdiv(n * hw, ba), _cdiv(c, bb)
    else:
        bb = min(_pow2(hw), 1024)
        ba = max(1, min(tile // bb, _pow2(n)))
        n_hw_tiles = _cdiv(hw, bb)
        num_tiles, programs = _cdiv(n, ba) * n_hw_tiles, c
    if synced:
        splits = min(TUNING['max_sync_rows'], max(TUNING['min_sync_rows'],
                                                  _cdiv(TUNING['sync_rows_x_channels'], c)))
    else:
        splits = min(TUNING['max_splits'], num_tiles,
                     _cdiv(TUNING['programs_per_sm'] * _sm_count(device), programs))
    return Config(cl, n, c, hw, n * hw, programs, max(1, splits), ba, bb, num_tiles, n_hw_tiles)


def estimator_code(name: str, c: int) -> int:
    """The kernels' EST code; below the estimator's minimum channel count it is 'none'."""
    spec = ESTIMATORS[name]
    return spec.fast_code if spec.shrinks(c) else ESTIMATORS['none'].fast_code


def _vector_launch(c: int, n_rows: int):
    """(BLOCK_S, BLOCK_C, num_warps) of a single-program kernel: about 8 values per thread
    of each C-vector and of each (rows x channels) tile of partials."""
    block_c = _pow2(c)
    block_s = max(1, min(_pow2(n_rows), 2048 // block_c))
    return block_s, block_c, max(1, min(16, block_s * block_c // 256))


def _on_device(x: Tensor):
    """Triton launches on the current CUDA device: make it x's."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _int64(x: Tensor) -> bool:
    return x.numel() >= 2 ** 31


def _affine(x: Tensor, g: Optional[Tensor], out: Tensor, coef: Tensor, cfg: Config) -> None:
    if x.numel() == 0:
        return
    tile = TUNING['affine_tile'] * 4 // max(4, out.element_size())  # fewer 8-byte values
    if cfg.cl:
        bb = min(_pow2(cfg.C), 128)
        ba = max(1, tile // bb)
        grid = (_cdiv(cfg.R, ba), _cdiv(cfg.C, bb))
    else:
        bb = min(_pow2(cfg.HW), 1024)
        ba = max(1, tile // bb)
        grid = (_cdiv(cfg.N * cfg.C, ba), _cdiv(cfg.HW, bb))
    K.channel_affine_kernel[grid](x, x if g is None else g, out, coef, cfg.N * cfg.C, cfg.C,
                                  cfg.HW, cfg.R, HAS_G=g is not None, CL=cfg.cl,
                                  INT64=_int64(x), BLOCK_A=ba, BLOCK_B=bb, num_warps=4)


def forward_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], name: str,
                 eps: float, group, updates, ref_mu: Optional[Tensor],
                 ref_var: Optional[Tensor], sync_mode: str = 'reduce') -> Tuple[Tensor, Tensor]:
    """(y, stats); x in a supported layout, stats the (9C + 1) buffer of kernels.SLOT."""
    cfg = reduce_config(x.shape, layout(x), group is not None, x.device)
    c, sdt = cfg.C, stat_dtype(x.dtype)
    row = 1 + 2 * c
    partials = torch.empty(cfg.splits * row, dtype=sdt, device=x.device)
    K.moments_kernel[(cfg.programs, cfg.splits)](
        x, partials, cfg.N, c, cfg.HW, cfg.R, cfg.num_tiles, cfg.n_hw_tiles, cfg.splits,
        CL=cfg.cl, INT64=_int64(x), FOR_LOOP=FOR_LOOP, BLOCK_A=cfg.block_a,
        BLOCK_B=cfg.block_b, num_warps=4)
    n_rows = cfg.splits
    if group is not None:
        rows = comm.sync_moment_rows(partials.view(cfg.splits, row), group, sync_mode)
        partials, n_rows = rows.reshape(-1), rows.size(0)

    stats = torch.empty(K.NUM_SLOTS * c + 1, dtype=sdt, device=x.device)
    code = estimator_code(name, c)
    ups = [(m, v, float(f)) for m, v, f in updates] + [(stats, stats, 0.0)] * 2
    block_s, block_c, warps = _vector_launch(c, n_rows)
    V.estimate_kernel[(1,)](
        partials, n_rows, c, stats, stats if weight is None else weight,
        stats if bias is None else bias, stats if ref_mu is None else ref_mu,
        stats if ref_var is None else ref_var, ups[0][0], ups[0][1], ups[1][0], ups[1][1],
        ups[0][2], ups[1][2], float(eps), ESTIMATORS[name].min_channels, EST=code,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_REF=ref_mu is not None,
        NUM_UPD=len(updates),
        F64=sdt == torch.float64, TINY=torch.finfo(sdt).tiny, BLOCK_S=block_s,
        BLOCK_C=block_c, num_warps=warps)

    y = torch.empty_like(x)
    _affine(x, None, y, stats[K.SLOT['inv'] * c:], cfg)
    return y, stats


def backward_impl(grad_out: Tensor, x: Tensor, weight: Optional[Tensor], stats: Tensor,
                  name: str, eps: float, group, has_ref: bool, need_gx: bool, need_gw: bool,
                  need_gb: bool, bias_dtype: torch.dtype):
    """(grad_x, grad_weight, grad_bias), None where not needed; grad_out in x's layout."""
    cfg = reduce_config(x.shape, layout(x), group is not None, x.device)
    c, sdt = cfg.C, stats.dtype
    copy = group is not None and need_gx  # one copy of the sums to all-reduce
    size = cfg.splits * 2 * c
    partials = torch.empty((2 if copy else 1) * size, dtype=sdt, device=x.device)
    local, total = partials[:size], partials[size:] if copy else partials
    K.grad_sums_kernel[(cfg.programs, cfg.splits)](
        grad_out, x, stats, local, total, cfg.N, c, cfg.HW, cfg.R, cfg.num_tiles,
        cfg.n_hw_tiles, cfg.splits, CL=cfg.cl, INT64=_int64(x), COPY=copy, FOR_LOOP=FOR_LOOP,
        BLOCK_A=cfg.block_a, BLOCK_B=cfg.block_b, num_warps=4)
    if copy:
        comm.all_reduce(total, group)

    coef = torch.empty(4 * c, dtype=sdt, device=x.device) if need_gx else stats
    gw = torch.empty_like(weight) if need_gw else None
    gb = torch.empty(c, dtype=bias_dtype, device=x.device) if need_gb else None
    code = estimator_code(name, c)
    block_s, block_c, warps = _vector_launch(c, cfg.splits)
    V.vjp_kernel[(1,)](
        local, total, cfg.splits, c, stats, stats if weight is None else weight, coef,
        stats if gw is None else gw, stats if gb is None else gb, float(eps),
        ESTIMATORS[name].min_channels, EST=code,
        HAS_W=weight is not None, HAS_REF=has_ref, SAME=not copy, WRITE_GW=need_gw,
        WRITE_GB=need_gb, NEED_GX=need_gx, F64=sdt == torch.float64,
        TINY=torch.finfo(sdt).tiny, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=warps)

    gx = None
    if need_gx:
        gx = torch.empty_like(x)
        _affine(x, grad_out, gx, coef, cfg)
    return gx, gw, gb


class FastShrunkBatchNormFunction(torch.autograd.Function):
    """Eager form: the same contract as functional.ShrunkBatchNormFunction; returns
    (y, stats), stats non-differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias, name, eps, group, updates, ref_mu, ref_var,
                sync_mode='reduce'):
        with _on_device(x):
            y, stats = forward_impl(x, weight, bias, name, eps, group, updates, ref_mu,
                                    ref_var, sync_mode)
        # The kernel wrote the running buffers: tell autograd, as an in-place op would.
        torch.autograd.graph.increment_version([b for m, v, _ in updates for b in (m, v)])
        ctx.save_for_backward(x, weight, stats)
        ctx.info = (name, eps, group, ref_mu is not None,
                    None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(stats)
        return y, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _grad_stats):
        x, weight, stats = ctx.saved_tensors
        name, eps, group, has_ref, bias_dtype = ctx.info
        need = ctx.needs_input_grad
        with _on_device(x):
            gx, gw, gb = backward_impl(
                _like_x(grad_y, x), x, weight, stats, name, eps, group, has_ref, need[0],
                weight is not None and need[1], bias_dtype is not None and need[2],
                bias_dtype or stats.dtype)
        return gx, gw, gb, None, None, None, None, None, None, None


def _like_x(g: Tensor, x: Tensor) -> Tensor:
    """grad_out in x's layout (autograd may hand over other strides, even expanded ones)."""
    cl = layout(x)
    return g if layout(g) == cl else to_layout(g, cl)


# torch.compile: the passes as opaque custom ops (no tracing into the launch code).
@torch.library.custom_op('robustbn::shrunk_bn_forward', mutates_args=())
def _forward_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], estimator: str,
                eps: float, ref_mu: Optional[Tensor],
                ref_var: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    with _on_device(x):
        return forward_impl(x, weight, bias, estimator, eps, None, (), ref_mu, ref_var)


@_forward_op.register_fake
def _(x, weight, bias, estimator, eps, ref_mu, ref_var):
    return torch.empty_like(x), x.new_empty(K.NUM_SLOTS * x.size(1) + 1,
                                            dtype=stat_dtype(x.dtype))


@torch.library.custom_op('robustbn::shrunk_bn_backward', mutates_args=())
def _backward_op(grad_out: Tensor, x: Tensor, weight: Optional[Tensor], stats: Tensor,
                 estimator: str, eps: float, has_ref: bool, need_gx: bool, need_gw: bool,
                 need_gb: bool, bias_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    with _on_device(x):
        gx, gw, gb = backward_impl(grad_out, x, weight, stats, estimator, eps, None, has_ref,
                                   need_gx, need_gw, need_gb, bias_dtype)
    empty = x.new_empty(0)
    return (empty if gx is None else gx, empty if gw is None else gw,
            empty if gb is None else gb)


@_backward_op.register_fake
def _(grad_out, x, weight, stats, estimator, eps, has_ref, need_gx, need_gw, need_gb,
      bias_dtype):
    return (torch.empty_like(x) if need_gx else x.new_empty(0),
            torch.empty_like(weight) if need_gw else x.new_empty(0),
            x.new_empty(x.size(1), dtype=bias_dtype) if need_gb else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, estimator, eps, ref_mu, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.info = (estimator, eps, ref_mu is not None, None if bias is None else bias.dtype)


def _backward(ctx, grad_y, _grad_stats):
    x, weight, stats = ctx.saved_tensors
    estimator, eps, has_ref, bias_dtype = ctx.info
    need = ctx.needs_input_grad
    need_gw = weight is not None and need[1]
    need_gb = bias_dtype is not None and need[2]
    gx, gw, gb = _backward_op(_like_x(grad_y, x), x, weight, stats, estimator, eps, has_ref,
                              need[0], need_gw, need_gb, bias_dtype or stats.dtype)
    return (gx if need[0] else None, gw if need_gw else None, gb if need_gb else None,
            None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _slot(stats: Tensor, name: str, c: int) -> Tensor:
    k = K.SLOT[name]
    return stats[k * c:(k + 1) * c]


@torch.compiler.disable
def _synced_eager(x, weight, bias, name, eps, group, updates, ref_mu, ref_var, sync_mode):
    return FastShrunkBatchNormFunction.apply(x, weight, bias, name, eps, group, updates,
                                             ref_mu, ref_var, sync_mode)


def shrunk_batch_norm_fast(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                           name: str, eps: float, group, updates, ref_stats,
                           record: Optional[list], nonfinite: Optional[Tensor],
                           sync_mode: str = 'reduce') -> Tensor:
    """The fast path of ``functional.shrunk_batch_norm`` (same arguments)."""
    if layout(x) is None:
        x = x.contiguous()
    ref_mu, ref_var = (None, None) if ref_stats is None else ref_stats
    updates = tuple(updates)
    in_kernel = True  # whether the kernels updated the running buffers
    if not torch.compiler.is_compiling():
        y, stats = FastShrunkBatchNormFunction.apply(x, weight, bias, name, eps, group,
                                                     updates, ref_mu, ref_var, sync_mode)
    elif group is not None:
        y, stats = _synced_eager(x, weight, bias, name, eps, group, updates, ref_mu, ref_var,
                                 sync_mode)
    else:
        y, stats = _forward_op(x, weight, bias, name, eps, ref_mu, ref_var)
        stats = stats.detach()
        in_kernel = False  # the custom op mutates nothing: the same rule, here
    if updates:
        c = x.size(1)
        mu, var_unbiased = _slot(stats, 'mu', c), _slot(stats, 'var_unbiased', c)
        if not in_kernel:
            update_running(updates, mu, var_unbiased, stats[K.NUM_SLOTS * c], nonfinite)
        else:
            count_nonfinite(nonfinite, mu, var_unbiased)
    if record is not None:  # on request only: a few small kernels, no host sync
        record.append(shrinkage_factors(*(_slot(stats, k, x.size(1))
                                          for k in ('m', 'v', 'mu', 'var'))))
    return y
