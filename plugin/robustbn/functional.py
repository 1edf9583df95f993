"""One autograd Function for batch norm with shrunk statistics, local or synchronized.

Forward: per-channel count, mean and sum of squared deviations (M2) of the local batch
(centred moments: E[x^2] - E[x]^2 cancels catastrophically in float32 for inputs with a
large mean); with a process group, one collective merges them across ranks exactly
(:mod:`robustbn.comm`: by default an ``all_reduce`` of float64 sums whose size does not
depend on the world size). The estimator maps the global (mean, var, count) to the statistics used.

Backward (closed form, no autograd graph over the full tensor): with xhat the normalized
input and g the output gradient, the loss depends on the used statistics only through the
per-channel sums S_g = sum g and S_gx = sum g * xhat:

    dL/dmu  = -w invstd S_g,        dL/dvar = -w invstd^2 S_gx / 2.

Those sums are all-reduced (one collective), the estimator's vector-Jacobian product on
the C-vectors gives dL/dm and dL/dv of the batch statistics, and

    dL/dx = g w invstd + dL/dm / N + 2 dL/dv (x - m) / N.

Statistics are computed in float32 (float64 for float64 input) whatever the input dtype,
so fp16/bf16 inputs under autocast are normalized with full-precision statistics.

This module is the reference implementation (plain torch, any device). On CUDA,
``shrunk_batch_norm`` dispatches the built-in estimators to the Triton fast path in
``robustbn.fast`` (same results up to rounding; the switch is described there); on CPU
the Function computes their per-layer scalars on the host (``robustbn.lean``).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import comm, fast, lean
from .estimators import Estimator, EstimatorSpec, finite_channels, shrinkage_factors


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """A C-vector shaped to broadcast against x (N, C, ...)."""
    return v.view([1, -1] + [1] * (x.dim() - 2))


# 1 + eps == 1 in float32 and float64: a variance of 1 normalizes by exactly 1.
_UNIT_EPS = 1e-30
_ONES = {}


def _cpu_full(c: int, value: float, dtype: torch.dtype) -> Tensor:
    """A read-only CPU C-vector filled with ``value``, from a small cache (one op less per
    use; only where :func:`lean.applies`, i.e. not while tracing)."""
    key = (c, value, dtype)
    if key not in _ONES:
        if len(_ONES) > 256:  # many input sizes (the per-size N^2 vectors): start over
            _ONES.clear()
        _ONES[key] = torch.full((c,), value, dtype=dtype)
    return _ONES[key]


def _ones(m: Tensor) -> Tensor:
    """A C-vector of ones like m (on CPU from a cache: one op less per backward)."""
    return _cpu_full(m.numel(), 1.0, m.dtype) if lean.applies(m) else torch.ones_like(m)


# float32 CPU input: batch_norm_update_stats accumulates in scalar float64 there (about
# 1 ns per value on one core); three vectorized passes are 1.7-2.7x faster from 2^16
# values and planes (H x W) of 256 values on, as long as x - mean stays in cache between
# two of them (chunks of at most 2^20 values: whole samples, or blocks of channels of one
# sample). Planes below 256 values keep the kernel (the passes' per-plane overhead
# dominates), and so do planes above 2^16: the passes sum each plane in float32, whose
# relative error grows with it (2e-6 at 2^17 values, 2e-5 at 2^20; below 1e-6 here).
# Measured by tools/benchmark_moments.py (docs/benchmarks.md); moment_passes(False) turns
# them off.
_PASSES_MIN, _PASSES_PLANES, _PASSES_CHUNK = 1 << 16, (256, 1 << 16), 1 << 20
_passes_on = True


@contextlib.contextmanager
def moment_passes(enabled: bool):
    """Run a block with the float32 CPU moments by passes on (the default) or off
    (BatchNorm's statistics kernel everywhere, e.g. to compare the two)."""
    global _passes_on
    old, _passes_on = _passes_on, bool(enabled)
    try:
        yield
    finally:
        _passes_on = old


def _passes_apply(x: Tensor) -> bool:
    if not (_passes_on and x.dtype == torch.float32 and x.dim() > 2 and x.numel() >= _PASSES_MIN
            and lean.applies(x) and x.is_contiguous()):
        return False
    plane = x.numel() // (x.size(0) * x.size(1))
    return _PASSES_PLANES[0] <= plane <= _PASSES_PLANES[1]


def _chunks(x: Tensor, c: int):
    """(part of x, its channels as a slice or None for all) of at most _PASSES_CHUNK values
    each: contiguous runs of whole samples, else blocks of channels of one sample."""
    sample = x.numel() // x.size(0)
    if sample <= _PASSES_CHUNK:
        per = _PASSES_CHUNK // sample
        return [(x, None)] if per >= x.size(0) else [(p, None) for p in torch.split(x, per)]
    per = max(1, _PASSES_CHUNK // (sample // c))
    return [(x[i:i + 1, j:j + per], slice(j, min(j + per, c)))
            for i in range(x.size(0)) for j in range(0, c, per)]


def _moments_by_passes(x: Tensor, c: int, n: int):
    """(mean, biased variance) of contiguous float32 CPU x in vectorized passes: the mean
    (cascade sum), then per chunk (:func:`_chunks`) d = x - mean (BatchNorm's inference
    kernel with unit scale: exactly x - mean, so centred like the kernel's two-pass result)
    and sum(d * d) / N (the weight-gradient sum of BatchNorm's backward kernel with input
    d, output gradient d, mean 0 and invstd 1/N), summed over the chunks."""
    mean = x.mean([0] + list(range(2, x.dim())))
    dt = x.dtype
    ones, zeros, n2 = _cpu_full(c, 1.0, dt), _cpu_full(c, 0.0, dt), _cpu_full(c, n * n, dt)
    chunks = _chunks(x, c)
    var = None if len(chunks) == 1 else torch.zeros_like(mean)
    for part, ch in chunks:
        m, o, z, q = (mean, ones, zeros, n2) if ch is None else \
            (mean[ch], ones[ch], zeros[ch], n2[ch])
        d = torch.batch_norm(part, None, None, m, o, False, 0.0, _UNIT_EPS, False)
        s = torch.ops.aten.native_batch_norm_backward(
            d, d, None, z, q, None, None, False, 0.0, [False, True, False])[1]
        if var is None:
            var = s
        else:
            (var if ch is None else var[ch]).add_(s)
    return mean, var


def local_moments(x: Tensor):
    """(count, mean, biased variance) of each channel of x in the statistics dtype; count is
    an int. BatchNorm's own statistics kernel (on CPU several times faster than
    ``var_mean`` over (N, H, W); centred, so no E[x^2] - E[x]^2 cancellation), or for
    float32 CPU input of some size the same centred moments in faster passes."""
    c = x.size(1)
    n = x.numel() // c if c else 0
    sdt = stat_dtype(x.dtype)
    if n == 0:
        zeros = torch.zeros(c, dtype=sdt, device=x.device)
        return 0, zeros, zeros.clone()
    if _passes_apply(x):
        mean, var = _moments_by_passes(x, c, n)
    elif x.dtype == sdt:
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    else:  # float32 running buffers select the kernel's float32 statistics (momentum 0)
        scratch = torch.empty(2, c, dtype=sdt, device=x.device)
        mean, var = torch.batch_norm_update_stats(x, scratch[0], scratch[1], 0.0)
    return n, mean, var


def merge_moments(counts: Tensor, means: Tensor, m2s: Tensor):
    """Exact merge of per-rank (count (W,), mean (W, C), M2 (W, C)) into (N, mean, var)."""
    n = counts.sum()
    w = counts / n.clamp_min(1)
    mean = (w[:, None] * means).sum(0)
    m2 = (m2s + counts[:, None] * (means - mean).square()).sum(0)
    return n, mean, m2 / n.clamp_min(1)


def batch_moments(x: Tensor, group=None, sync_mode: str = 'reduce'):
    """(count, mean, biased variance) per channel of x, or of the concatenation of all
    ranks' x with a process ``group`` (one collective, see :mod:`robustbn.comm`);
    statistics dtype. The count is a float without a group, a 0-dim tensor (no host sync)
    with one."""
    n_local, mean, var = local_moments(x)
    if group is None:
        return float(n_local), mean, var
    c = mean.numel()
    row = torch.cat([mean.new_full((1,), float(n_local)), mean, var * n_local])
    rows = comm.sync_moment_rows(row[None], group, sync_mode)
    if rows.size(0) > 1:
        return merge_moments(rows[:, 0], rows[:, 1:c + 1], rows[:, c + 1:])
    n = rows[0, 0]
    return n, rows[0, 1:c + 1], rows[0, c + 1:] / n.clamp_min(1)


# device type -> whether it has autocast; filled outside torch.compile, which cannot trace
# is_autocast_available (a model compiled with fullgraph=True would fail on it)
_AUTOCAST = {dev: torch.amp.is_autocast_available(dev) for dev in ('cpu', 'cuda')}


def _autocast_on(x: Tensor) -> bool:
    dev = x.device.type
    if dev not in _AUTOCAST:
        _AUTOCAST[dev] = torch.amp.is_autocast_available(dev)
    return _AUTOCAST[dev] and torch.is_autocast_enabled(dev)


def _as(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def normalize(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
              bias: Optional[Tensor], eps: float) -> Tensor:
    """weight * (x - mean) / sqrt(var + eps) + bias in batch norm's fused inference kernel.

    Affine parameters in low precision next to float32 statistics (DeepSpeed's bf16/fp16
    modes cast parameters, not buffers) are brought to the statistics' dtype: the kernels
    take all-equal dtypes or low-precision input with everything else float32.
    """
    return F.batch_norm(x, mean, var, _as(weight, mean.dtype), _as(bias, mean.dtype),
                        False, 0.0, eps)


class ShrunkBatchNormFunction(torch.autograd.Function):
    """Batch norm whose batch statistics (mu_c, var_c) = estimator(m, v, N).

    Without ``ref_stats``: y = weight * (x - mu_c) / sqrt(var_c + eps) + bias (JS-BN).

    With ``ref_stats=(mu, var)`` (GpreBN): the value is batch norm with those statistics,
    y = weight * (x - mu) / sigma + bias, while the input gradient keeps the batch-statistics
    form, i.e. it is the gradient of
    weight * ((x - mu_c) / sigma_c * sg(sigma_c) + sg(mu_c) - mu) / sigma + bias:
    batch norm's gradient with the effective weight weight * sigma_c / sigma. The weight
    gradient is sum(g * (x - mu) / sigma) either way, and (mu, var) get no gradient.

    ``updates``: (mean_buffer, var_buffer, factor) triples updated in place, after the
    output is computed, as an EMA of (mu_c, var_c * N/(N-1)) (see :func:`update_running`).
    ``group`` is None for local statistics or the process group to synchronize over;
    ``record`` a list to append the estimator's ``shrinkage_factors`` to; ``nonfinite`` a
    counter of the batches whose statistics were not finite in some channel.

    Non-finite statistics stay in their channel: the estimator leaves such a channel's
    batch statistics as they are and keeps it out of the other channels' estimates, and
    no running statistic is updated with a non-finite value (that channel keeps its old
    one).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                estimator: EstimatorSpec, eps: float, group, updates, ref_stats,
                record: Optional[list], nonfinite: Optional[Tensor],
                sync_mode: str = 'reduce') -> Tensor:
        args = (ctx, x, weight, bias, estimator, eps, group, updates, ref_stats, record,
                nonfinite, sync_mode)
        if _autocast_on(x):  # statistics are float32/float64 by construction
            with torch.autocast(x.device.type, enabled=False):
                return ShrunkBatchNormFunction._forward(*args)
        return ShrunkBatchNormFunction._forward(*args)

    @staticmethod
    def _forward(ctx, x, weight, bias, estimator, eps, group, updates, ref_stats, record,
                 nonfinite, sync_mode) -> Tensor:
        n, m, v = batch_moments(x, group, sync_mode)
        with torch.no_grad():
            host = lean.forward(estimator, m, v, n) if lean.applies(m) else None
            if host is None:
                mu, var = estimator(m, v, n, finite_channels(m, v))
            else:
                mu, var, host = host
            if record is not None:  # on request only: a few small kernels, no host sync
                record.append(shrinkage_factors(m, v, mu, var))
        if ref_stats is None:
            out_mu, out_var = mu, var
        else:
            # A copy, made by an op torch.compile's partitioner never recomputes: it would
            # otherwise recompute ref_stats in the backward from the buffers they were read
            # from (GpreBN's averages), after this forward has updated them, and give wrong
            # gradients (torch 2.11; pytorch/pytorch PR 197039).
            out_mu, out_var = torch.cat([ref_stats[0], ref_stats[1]]).to(mu.dtype).chunk(2)

        # Output pass: batch norm's own fused inference kernel with the statistics used.
        y = normalize(x, out_mu, out_var, weight, bias, eps)

        if updates and host is not None:
            lean.update_running(updates, mu, var, n)
        elif updates:
            # A global count of 1 is only possible across ranks (checked locally otherwise).
            bessel = n / (n - 1) if group is None else n / (n - 1).clamp_min(1)
            update_running(updates, mu, var * bessel, n, nonfinite)

        ctx.save_for_backward(x, weight, m, v, mu, var, out_mu, out_var)
        ctx.n, ctx.estimator, ctx.group, ctx.eps = n, estimator, group, eps
        ctx.host = host
        ctx.has_ref = ref_stats is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if torch.is_grad_enabled():  # create_graph: a second backward must raise
            return _backward_once(ctx, grad_out)
        return _backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor):
        x, weight, m, v, mu, var, out_mu, out_var = ctx.saved_tensors
        n, group = ctx.n, ctx.group
        invstd = (var + ctx.eps).rsqrt_()
        out_invstd = (out_var + ctx.eps).rsqrt_() if ctx.has_ref else invstd
        # Low-precision input: the same pass also forms g w' (w' = weight * out_invstd) in
        # x's dtype; a broadcasting addcmul of float32 w' into it is 2-3x slower on CPU.
        low = x.dtype != mu.dtype and ctx.needs_input_grad[0]
        g_w = None
        if x.numel():
            # One fused pass for S_g = sum g and S_gx = sum g * (x - out_mu) * out_invstd:
            # the inference-mode BN backward's bias and weight gradients.
            g_w, sum_gx, sum_g = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, _as(weight, mu.dtype) if low else None, out_mu, out_var, None,
                None, False, ctx.eps, [low, True, True])
        else:
            sum_g, sum_gx = torch.zeros_like(mu), torch.zeros_like(mu)
        need = ctx.needs_input_grad
        grad_weight = sum_gx.to(weight.dtype) if weight is not None and need[1] else None
        grad_bias = sum_g.to(ctx.bias_dtype) if ctx.bias_dtype is not None and need[2] else None

        grad_x = None
        if ctx.needs_input_grad[0]:
            if ctx.has_ref:  # S_gz with z = (x - mu_c) * invstd_c, from the same sums
                sum_gx = (sum_gx / out_invstd + (out_mu - mu) * sum_g) * invstd
            if group is not None:
                sums = torch.cat([sum_g, sum_gx])
                comm.all_reduce(sums, group)
                sum_g, sum_gx = sums.chunk(2)
            # weight * out_invstd: the batch-BN gradient with effective weight w sigma_c/sigma
            w = out_invstd if weight is None else out_invstd * weight.to(out_invstd.dtype)
            # dL/dmu_used = -P, dL/dvar_used = -Q / 2
            p = w * sum_g
            q = torch.mul(w, invstd).mul_(sum_gx)
            if ctx.host is not None:
                k, c = lean.backward(ctx.host, m, v, n, p, q)
            else:
                dm, dv = ctx.estimator.backward(m, v, n, -p, -0.5 * q)
                k, c = 2 * dv / n, dm / n
            # dx = g w + k (x - m) + c: k (x - m) + c in batch norm's inference kernel
            # (mean m, variance 1, weight k, bias c), then one addcmul (or add of g w).
            grad_x = F.batch_norm(x, m, _ones(m), k, c, False, 0.0, _UNIT_EPS)
            # (``low``, not ``g_w is not None``: traced by torch.compile, the kernel's
            # unrequested output is a placeholder tensor, undefined when the graph runs)
            grad_x = grad_x.add_(g_w) if low and g_w is not None else \
                grad_x.addcmul_(grad_out, _bcast(w, x))
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None, None


# The plain backward for the usual call (grad mode off); with create_graph the wrapped one,
# whose outputs make a second backward raise instead of silently being wrong.
_backward = ShrunkBatchNormFunction._backward
_backward_once = torch.autograd.function.once_differentiable(_backward)


def update_running(updates, mu: Tensor, var_unbiased: Tensor, n,
                   nonfinite: Optional[Tensor] = None) -> None:
    """EMA updates ``buf += factor * (stat - buf)`` of each (mean, var, factor) in
    ``updates``, in place, per channel only where both statistics are finite (elsewhere the
    old value stays and ``nonfinite`` counts the batch), and not at all when the (global)
    batch was empty (``n`` == 0)."""
    if not isinstance(n, Tensor) and n == 0:
        return
    ok = count_nonfinite(nonfinite, mu, var_unbiased)
    if isinstance(n, Tensor):  # a global count: no host sync
        ok = ok & (n > 0)
    for mean_buf, var_buf, factor in updates:
        # lerp(old, old, f) is exactly old
        mean_buf.lerp_(torch.where(ok, mu.to(mean_buf.dtype), mean_buf), factor)
        var_buf.lerp_(torch.where(ok, var_unbiased.to(var_buf.dtype), var_buf), factor)


def count_nonfinite(nonfinite: Optional[Tensor], mu: Tensor, var_unbiased: Tensor) -> Tensor:
    """The channels whose statistics are finite; counts the batch in ``nonfinite`` (if
    given) when one is not."""
    ok = finite_channels(mu, var_unbiased)
    if nonfinite is not None:
        nonfinite.add_((~ok).any())
    return ok


def as_estimator(estimator) -> EstimatorSpec:
    """A registered estimator as it is; any other callable ``fn(mean, var, count)`` as an
    undeclared one (autograd VJP, reference path)."""
    if isinstance(estimator, EstimatorSpec):
        return estimator
    if not callable(estimator):
        raise TypeError(f'estimator must be an EstimatorSpec or a callable, got {estimator!r}')
    return EstimatorSpec(getattr(estimator, '__name__', 'callable'), estimator)


def shrunk_batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      estimator: Estimator, eps: float = 1e-5, avg_factor: float = 0.0,
                      group=None, record: Optional[list] = None, ref_stats=None,
                      extra_updates=(), nonfinite: Optional[Tensor] = None,
                      sync_mode: str = 'reduce') -> Tensor:
    """Functional form of :class:`ShrunkBatchNormFunction` (always batch statistics).

    ``running_mean``/``running_var`` (or None) get an EMA update with ``avg_factor``;
    ``extra_updates`` more (mean, var, factor) triples; ``ref_stats`` makes it GpreBN;
    ``nonfinite`` (a 0-dim integer tensor) counts the batches whose statistics were not
    finite in some channel; ``sync_mode`` how the forward synchronizes the statistics with
    a ``group`` (``'reduce'`` or ``'gather'``, see :mod:`robustbn.comm`). ``estimator``: a
    registered one (``get_estimator``) or any callable ``fn(mean, var, count)``. Built-in
    estimators on CUDA take the fast path (``robustbn.fast``).
    """
    updates = tuple(extra_updates)
    if running_mean is not None and avg_factor > 0:
        updates = ((running_mean, running_var, avg_factor),) + updates
    estimator = as_estimator(estimator)
    # An empty local batch (BatchNorm: empty output, no statistics) takes the reference
    # path; an empty rank of a synchronized layer stays on its peers' path (collectives).
    local_empty = group is None and x.numel() == 0
    name = None if local_empty else fast.fast_path_estimator(x, estimator, len(updates))
    if name is not None:  # a built-in estimator the kernels implement
        return fast.shrunk_batch_norm_fast(x, weight, bias, name, eps, group, updates,
                                           ref_stats, record, nonfinite, sync_mode)
    return ShrunkBatchNormFunction.apply(x, weight, bias, estimator, eps, group, updates,
                                         ref_stats, record, nonfinite, sync_mode)
