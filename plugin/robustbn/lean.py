"""The built-in estimators with their per-layer scalars on the host: the default for CPU tensors.

On the reference path (:mod:`robustbn.estimators`) every per-layer scalar of an estimator
(a norm, a count, a shrinkage factor, a mask) is a 0-dim device tensor, so nothing waits
on a GPU; each costs an ATen op, about 75 forward and 110 backward per layer for
``'paper'``. For a CPU tensor, reading a scalar is a memory load, not a device wait: here
the few reductions an estimator needs are read with ``.item()``, the rest of the
per-layer math is Python float math, and a layer dispatches about 12 ops forward and 17
backward (``tests/core/test_lean.py`` bounds the counts).

The formulas are those of ``estimators.py`` and its closed-form VJPs, rearranged so that
each C-vector result is one or two ops on (m, v) with scalar coefficients. A call takes
this path only where that gives the reference's answer: a CPU tensor of plain
``torch.Tensor`` type outside ``torch.compile``/``torch.jit`` tracing, a built-in
estimator, at least 2 values per channel, every channel's statistics finite (the
non-finite rule needs the reference's masks), no variance below the smallest normal
number where a log is taken (the reference clamps it there), and running statistics that
cannot overflow. Otherwise :func:`forward` returns None and the caller takes the reference.

The backward works on P = w' S_g and Q = w' invstd S_gx (w' the effective weight, S the
per-channel gradient sums; see ``functional.py``): dL/dmean_used = -P and dL/dvar_used =
-Q/2. It returns (k, c) with dL/dx = w' g + k (x - m) + c, i.e. k = 2 dL/dv / N and
c = dL/dm / N of the batch statistics (m, v).

Switch: ``ROBUSTBN_LEAN=0`` in the environment or :func:`set_lean` (False: every call takes
the reference, e.g. to compare the two).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import estimators as E

_enabled = os.environ.get('ROBUSTBN_LEAN', '1').strip().lower() not in ('0', 'off', 'false')


def get_lean() -> bool:
    return _enabled


def set_lean(enabled: bool) -> None:
    """Whether CPU calls with a built-in estimator take this path (default True)."""
    global _enabled
    _enabled = bool(enabled)


@contextlib.contextmanager
def lean_path(enabled: bool):
    """Run a block with :func:`set_lean` ``(enabled)``."""
    old = _enabled
    set_lean(enabled)
    try:
        yield
    finally:
        set_lean(old)


def applies(t: Tensor) -> bool:
    """Whether scalars of ``t``'s device may be read on the host here."""
    return (_enabled and t.device.type == 'cpu' and type(t) is Tensor
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


class Lean(NamedTuple):
    """What the backward needs: the estimator's ``backward(state, m, v, n, P, Q)``, its
    scalars and tensors."""
    backward: Callable
    state: tuple


def _items(*ts: Tensor):
    return [t.item() for t in ts]


def _finite(*xs: float) -> bool:
    return all(math.isfinite(x) for x in xs)


def _underflows(sum_sq: float, dtype: torch.dtype) -> bool:
    """Whether a sum of squares is so small that the reference, squaring in ``dtype``,
    loses it to subnormal numbers (and may see 0 where this sees a positive sum)."""
    info = torch.finfo(dtype)
    return 0 < sum_sq < info.tiny / info.eps


def _normal_max(v: Tensor):
    """max(v) where every variance is finite and at least the smallest normal number (the
    reference takes their logs unclamped then), else None."""
    vmin, vmax = _items(*torch.aminmax(v))
    return vmax if vmin >= torch.finfo(v.dtype).tiny and math.isfinite(vmax) else None


# ---------------------------------------------------------------- the two building blocks
def _to_zero(u: Tensor, kc: float, c: int):
    """a, alpha, beta of u_used = a u with a = 1 - kc s2 / ||u||^2 (``paper_mean``,
    ``wacv_shrink``), whose Jacobian term is da/du = alpha u + beta; None if not finite."""
    s2, ubar = _items(*torch.var_mean(u, correction=0))
    q = c * (s2 + ubar * ubar)  # ||u||^2
    if not _finite(s2, ubar) or _underflows(q, u.dtype):
        return None
    if q <= 0:  # u = 0: a = 1, no gradient through a (the reference's guard)
        return 1.0, 0.0, 0.0, ubar
    return (1 - kc * s2 / q, -2 * kc / (c * q) + 2 * kc * s2 / (q * q), 2 * kc * ubar / (c * q),
            ubar)


def _to_mean(s2: float, noise: float, kc: float, c: int, dtype: torch.dtype):
    """(f, A, B) of Efron-Morris u_used = ubar + f (u - ubar), f = max(0, 1 - kc noise / s),
    s = ||u - ubar||^2 = c s2. Its VJP (``estimators.efron_morris_vjp``) is
    du = f g + (1 - f) mean(g) + A (g.d) d and dnoise = -B (g.d), d = u - ubar; None
    where the reference's s underflows."""
    s = c * s2
    if _underflows(s, dtype):
        return None
    shrink = kc * noise / s if s > 0 else 0.0
    if not (s > 0 and 1 - shrink >= 0):  # the shrink terms vanish (the reference's guards)
        return max(0.0, 1 - shrink), 0.0, 0.0
    return 1 - shrink, 2 * kc * noise / (s * s), kc / s


# ------------------------------------------------------------------------ the estimators
def _none_forward(m, v, n, c):
    sm, sv = _items(m.sum(), v.sum())  # finite: every channel (v >= 0 bounds each by sv)
    if not _finite(sm, sv):
        return None
    return m, v, sv, Lean(_none_backward, ())


def _none_backward(state, m, v, n, P, Q):
    return Q * (-1 / n), P * (-1 / n)


def _mean_to_zero(m, kc, c):
    st = _to_zero(m, kc, c)
    return None if st is None else (m * st[0], st)


def _mean_to_zero_c(st, m, n, P):
    """c = dL/dm / N of a mean shrunk toward zero; dL/dmean_used = -P."""
    a, alpha, beta, _ = st
    gu = -torch.dot(P, m).item()
    return torch.mul(P, -a / n).add_(m, alpha=gu * alpha / n).add_(gu * beta / n)


def _paper_forward(m, v, n, c):
    mean = _mean_to_zero(m, (c - 2) * c / (c + 1), c)
    vmax = _normal_max(v)
    if mean is None or vmax is None:
        return None
    log_sum = torch.log(v).sum().item()
    if not math.isfinite(log_sum):
        return None
    r = n / (n + 1)
    mult = max(0.0, 4 * (c - 1) * r / ((n - 1) * c + 2))
    shift = mult * math.exp(log_sum / c)  # M times the geometric mean
    var = torch.mul(v, r).add_(shift)
    return mean[0], var, r * vmax + shift, Lean(_paper_backward, (mean[1], r, shift / c))


def _paper_backward(state, m, v, n, P, Q):
    st, r, shift_c = state
    # dL/dv = r h + M G sum(h) / (C v) with h = -Q/2
    gamma = -shift_c * Q.sum().item() / n
    k = torch.reciprocal(v).mul_(gamma).add_(Q, alpha=-r / n)
    return k, _mean_to_zero_c(st, m, n, P)


def _paper_mean_forward(m, v, n, c):
    mean = _mean_to_zero(m, (c - 2) * c / (c + 1), c)
    sv = v.sum().item()
    if mean is None or not math.isfinite(sv):
        return None
    return mean[0], v, sv, Lean(_paper_mean_backward, (mean[1],))


def _paper_mean_backward(state, m, v, n, P, Q):
    return Q * (-1 / n), _mean_to_zero_c(state[0], m, n, P)


def _wacv_forward(m, v, n, c):
    mean = _mean_to_zero(m, max(c - 2, 0), c)
    var = _mean_to_zero(v, max(c - 2, 0), c)
    if mean is None or var is None:
        return None
    return mean[0], var[0], c * var[1][3], Lean(_wacv_backward, (mean[1], var[1]))


def _wacv_backward(state, m, v, n, P, Q):
    st_m, (a, alpha, beta, _) = state
    hv = -0.5 * torch.dot(Q, v).item()  # sum h v
    k = torch.mul(Q, -a / n).add_(v, alpha=2 * hv * alpha / n).add_(2 * hv * beta / n)
    return k, _mean_to_zero_c(st_m, m, n, P)


def _classic_forward(m, v, n, c):
    s2, mbar = _items(*torch.var_mean(m, correction=0))
    sv = v.sum().item()
    vmax = _normal_max(v)
    if not _finite(s2, mbar, sv) or vmax is None:
        return None
    kc = max(c - 3, 0)
    means = _to_mean(s2, sv / (c * n), kc, c, m.dtype)  # noise: tau2, the variance of a mean
    lv = torch.log(v)
    s2_l, lbar = _items(*torch.var_mean(lv, correction=0))
    # noise: the variance of a log sample variance
    variances = _to_mean(s2_l, 2 / (n - 1), kc, c, v.dtype) if _finite(s2_l, lbar) else None
    if means is None or variances is None:
        return None
    (f, a, b), (f_l, a_l, _) = means, variances
    mu = torch.mul(m, f).add_((1 - f) * mbar)
    var = torch.mul(lv, f_l).add_((1 - f_l) * lbar).exp_()
    # exp of a convex combination of log v is at most max v (the factor: exp's rounding)
    state = (mbar, f, a, b, lv, var, lbar, f_l, a_l)
    return mu, var, vmax * (1 + 1e-5), Lean(_classic_backward, state)


def _classic_backward(state, m, v, n, P, Q):
    mbar, f, a, b, lv, var, lbar, f_l, a_l = state
    c = m.numel()
    # means, g = -P: du = f g + (1 - f) mean(g) + kappa d, d = m - mbar
    sum_p, dot_pm = _items(P.sum(), torch.dot(P, m))
    gd = mbar * sum_p - dot_pm  # g . d
    kappa, gbar = a * gd, -sum_p / c
    c_vec = (torch.mul(P, -f / n).add_(m, alpha=kappa / n)
             .add_(((1 - f) * gbar - kappa * mbar) / n))
    d_tau2 = -b * gd  # tau2 = mean(v) / N: every dL/dv_k gets d_tau2 / (C N)
    # variances, var = exp(u_used(log v)): g_l = h var = -R/2 with R = Q var
    R = Q * var
    sum_r, dot_rl = _items(R.sum(), torch.dot(R, lv))
    kappa_l = a_l * -0.5 * (dot_rl - lbar * sum_r)
    gbar_l = -0.5 * sum_r / c
    # k = 2 dL/dv / N, dL/dv = du_l / v + d_tau2 / (C N)
    k = (torch.mul(R, -f_l / n).add_(lv, alpha=2 * kappa_l / n)
         .add_(2 * ((1 - f_l) * gbar_l - kappa_l * lbar) / n).div_(v)
         .add_(2 * d_tau2 / (c * n * n)))
    return k, c_vec


# fn of the built-in spec -> its forward here
_FORWARD: Dict[Callable, Callable] = {
    E.none: _none_forward, E.paper: _paper_forward, E.paper_mean_only: _paper_mean_forward,
    E.wacv: _wacv_forward, E.classic: _classic_forward}


def forward(spec: E.EstimatorSpec, m: Tensor, v: Tensor,
            n) -> Optional[Tuple[Tensor, Tensor, Lean]]:
    """(mean_used, var_used, what the backward needs) of a built-in estimator, or None
    where the reference must answer (see the module docstring). ``n`` may be a 0-dim
    (CPU) tensor; running statistics (var_used N/(N-1)) stay finite when this answers."""
    fwd = _FORWARD.get(spec.fn)
    if fwd is None:
        return None
    n = float(n)
    c = m.numel()
    if n < 2 or c == 0:
        return None
    if not spec.shrinks(c):
        fwd = _none_forward
    out = fwd(m, v, n, c)
    if out is None:
        return None
    mu, var, var_bound, lean = out
    # var_bound >= max(var_used): the running update's N/(N-1) <= 2 must not overflow
    if not 2 * var_bound < torch.finfo(v.dtype).max:
        return None
    return mu, var, lean


def backward(lean: Lean, m: Tensor, v: Tensor, n, P: Tensor, Q: Tensor):
    """(k, c) with dL/dx = w' g + k (x - m) + c (module docstring)."""
    return lean.backward(lean.state, m, v, float(n), P, Q)


def update_running(updates, mu: Tensor, var: Tensor, n) -> None:
    """The reference's EMA updates when every channel is finite (no masks, no counting)."""
    n = float(n)
    var_unbiased = var * (n / (n - 1))
    for mean_buf, var_buf, factor in updates:
        mean_buf.lerp_(mu.to(mean_buf.dtype), factor)
        var_buf.lerp_(var_unbiased.to(var_buf.dtype), factor)
