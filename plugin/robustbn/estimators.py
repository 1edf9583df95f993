"""Shrinkage estimators of per-channel batch statistics.

Every estimator is a pure, differentiable function on C-vectors::

    mean_used, var_used = estimator(mean, var, count)

``mean`` and ``var`` are the per-channel batch mean and *biased* batch variance over
``count`` values per channel (``count`` may be a Python number or a 0-dim tensor, so a
count gathered across processes never needs a host sync). The result is what the layer
normalizes with.

Each estimator is declared once in ``ESTIMATORS`` (an :class:`EstimatorSpec`): its
function, its closed-form vector-Jacobian product (hand-derived, checked against autograd
in tests; the CUDA fast path's kernels implement the same formulas), the channel count
below which it leaves the batch statistics unchanged, and its fast-path code. Users add
their own with :func:`register_estimator`; their gradient comes from autograd on the
C-vectors.

Guards shared by all estimators: no 0/0 when a squared norm is zero, log-domain
geometric means (a product of C variances over/underflows in float32), and too few
channels for shrinkage to make sense returns the inputs unchanged.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

Estimator = Callable[[Tensor, Tensor, object], Tuple[Tensor, Tensor]]
EstimatorVJP = Callable[[Tensor, Tensor, object, Tensor, Tensor], Tuple[Tensor, Tensor]]


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, with 0 where den == 0 (and a finite gradient there)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _log(v: Tensor) -> Tensor:
    # A zero variance (constant channel) would give log 0 = -inf and a NaN gradient.
    return torch.log(v.clamp_min(torch.finfo(v.dtype).tiny))


def geometric_mean(v: Tensor) -> Tensor:
    """exp(mean(log v)): the geometric mean without the overflow of prod(v) ** (1/C)."""
    return torch.exp(_log(v).mean())


def paper_mean(m: Tensor) -> Tensor:
    """Mean estimator of the 2025 JS-BN paper's released code.

    s2 = (1/C) sum_k (m_k - mean(m))^2,  a = 1 - (C-2) C/(C+1) s2 / ||m||^2,  m_JS = a m.
    Since s2 <= ||m||^2 / C, a >= 3/(C+1) > 0. ||m|| = 0 gives a = 1 (m_JS = m = 0).
    """
    c = m.numel()
    s2 = (m - m.mean()).square().mean()
    a = 1 - (c - 2) * c / (c + 1) * _safe_ratio(s2, m.square().sum())
    return a * m


def paper_var(v: Tensor, n) -> Tensor:
    """Variance estimator of the 2025 JS-BN paper's released code.

    v_JS = N/(N+1) v + M G,  M = 4(C-1) N/(N+1) / ((N-1) C + 2),  G = exp(mean(log v)).
    """
    c = v.numel()
    r = n / (n + 1)
    mult = 4 * (c - 1) * r / ((n - 1) * c + 2)
    return r * v + mult * geometric_mean(v)


def wacv_shrink(u: Tensor) -> Tensor:
    """James-Stein toward 0 as in JSNorm (WACV 2024), used for both means and variances.

    s2 = (1/C) sum_k (u_k - mean(u))^2,  a = 1 - (C-2) s2 / ||u||^2,  u_JS = a u  (a >= 2/C).
    """
    c = u.numel()
    s2 = (u - u.mean()).square().mean()
    return (1 - (c - 2) * _safe_ratio(s2, u.square().sum())) * u


def efron_morris(u: Tensor, noise_var) -> Tensor:
    """Positive-part James-Stein toward the grand mean (Efron-Morris).

    u_JS = mean(u) + max(0, 1 - (C-3) noise_var / ||u - mean(u)||^2) (u - mean(u)).
    """
    c = u.numel()
    ubar = u.mean()
    d = u - ubar
    s = d.square().sum()
    # s == 0 means u is already constant: any factor gives u back; use 1.
    shrink = torch.where(s > 0, (c - 3) * noise_var / torch.where(s > 0, s, torch.ones_like(s)),
                         torch.zeros_like(s))
    return ubar + (1 - shrink).clamp_min(0) * d


def none(m: Tensor, v: Tensor, n) -> Tuple[Tensor, Tensor]:
    """No shrinkage: plain batch statistics (exactly BatchNorm)."""
    return m, v


def paper(m: Tensor, v: Tensor, n) -> Tuple[Tensor, Tensor]:
    """2025 JS-BN paper: ``paper_mean`` for the means, ``paper_var`` for the variances."""
    return paper_mean(m), paper_var(v, n)


def paper_mean_only(m: Tensor, v: Tensor, n) -> Tuple[Tensor, Tensor]:
    """2025 JS-BN paper's mean estimator with the plain batch variance."""
    return paper_mean(m), v


def wacv(m: Tensor, v: Tensor, n) -> Tuple[Tensor, Tensor]:
    """JSNorm (WACV 2024): ``wacv_shrink`` on the means and on the variances."""
    return wacv_shrink(m), wacv_shrink(v)


def classic(m: Tensor, v: Tensor, n) -> Tuple[Tensor, Tensor]:
    """Textbook positive-part James-Stein (Efron-Morris) with noise variances.

    means:     ``efron_morris(m, tau2)`` with tau2 = mean_k(v_k) / N (variance of a mean);
    variances: ``exp(efron_morris(log v, 2 / (N-1)))`` (variance of a log sample variance).
    """
    m_js = efron_morris(m, v.mean() / n)
    v_js = torch.exp(efron_morris(_log(v), 2 / (n - 1)))
    return m_js, v_js


# Closed-form vector-Jacobian products: (dL/dm, dL/dv) from (dL/dmean_used, dL/dvar_used),
# equal to autograd through the functions above, guards included (where a guard selects a
# constant, the gradient through it is zero; clamp_min passes the gradient where v >= tiny).

def _log_vjp(v: Tensor, grad_log: Tensor) -> Tensor:
    """VJP of ``_log``: 1/v where v >= tiny (the clamp's gradient), 0 below."""
    ok = v >= torch.finfo(v.dtype).tiny
    return torch.where(ok, grad_log / torch.where(ok, v, torch.ones_like(v)), torch.zeros_like(v))


def shrink_to_zero_vjp(u: Tensor, g: Tensor, k) -> Tensor:
    """VJP of a u with a = 1 - k s2/||u||^2 (``paper_mean``: k = (C-2)C/(C+1); ``wacv_shrink``:
    k = C-2), s2 = mean((u - mean(u))^2); a = 1 and no gradient through it when ||u|| = 0."""
    c = u.numel()
    d = u - u.mean()
    s2 = d.square().mean()
    q = u.square().sum()
    ok = q > 0
    q1 = torch.where(ok, q, torch.ones_like(q))
    a = 1 - k * torch.where(ok, s2 / q1, torch.zeros_like(q))
    # da/du = -k (2 d / (C q) - 2 s2 u / q^2)
    gu = (g * u).sum()
    da = torch.where(ok, -k * (2 * d / (c * q1) - 2 * s2 * u / q1.square()), torch.zeros_like(u))
    return a * g + gu * da


def paper_var_vjp(v: Tensor, n, h: Tensor) -> Tensor:
    """VJP of ``paper_var``: r h + M sum(h) G / (C v) (the geometric mean's gradient)."""
    c = v.numel()
    r = n / (n + 1)
    mult = 4 * (c - 1) * r / ((n - 1) * c + 2)
    return r * h + _log_vjp(v, mult * h.sum() * geometric_mean(v) / c)


def efron_morris_vjp(u: Tensor, noise_var, g: Tensor):
    """VJP of ``efron_morris``: (dL/du, dL/dnoise_var).

    With d = u - mean(u), s = ||d||^2, shrink = (C-3) noise_var / s, f = max(0, 1 - shrink):
    dL/du = mean(g) + f (g - mean(g)) + 2 [1 - shrink >= 0] (C-3) noise_var (g.d) d / s^2,
    dL/dnoise_var = -[1 - shrink >= 0] (C-3) (g.d) / s; both shrink terms vanish when s = 0.
    """
    c = u.numel()
    d = u - u.mean()
    s = d.square().sum()
    ok = s > 0
    s1 = torch.where(ok, s, torch.ones_like(s))
    shrink = torch.where(ok, (c - 3) * noise_var / s1, torch.zeros_like(s))
    f = (1 - shrink).clamp_min(0)
    live = ok & (1 - shrink >= 0)  # clamp_min passes the gradient at exactly 0
    gd = (g * d).sum()
    gbar = g.mean()
    du = gbar + f * (g - gbar) + torch.where(live, 2 * (c - 3) * noise_var * gd / s1.square(),
                                             torch.zeros_like(s)) * d
    dnv = torch.where(live, -(c - 3) * gd / s1, torch.zeros_like(s))
    return du, dnv


def none_vjp(m: Tensor, v: Tensor, n, d_mu: Tensor, d_var: Tensor) -> Tuple[Tensor, Tensor]:
    return d_mu, d_var


def paper_vjp(m: Tensor, v: Tensor, n, d_mu: Tensor, d_var: Tensor) -> Tuple[Tensor, Tensor]:
    c = m.numel()
    return shrink_to_zero_vjp(m, d_mu, (c - 2) * c / (c + 1)), paper_var_vjp(v, n, d_var)


def paper_mean_only_vjp(m: Tensor, v: Tensor, n, d_mu: Tensor, d_var: Tensor):
    c = m.numel()
    return shrink_to_zero_vjp(m, d_mu, (c - 2) * c / (c + 1)), d_var


def wacv_vjp(m: Tensor, v: Tensor, n, d_mu: Tensor, d_var: Tensor) -> Tuple[Tensor, Tensor]:
    c = m.numel()
    return shrink_to_zero_vjp(m, d_mu, c - 2), shrink_to_zero_vjp(v, d_var, c - 2)


def classic_vjp(m: Tensor, v: Tensor, n, d_mu: Tensor, d_var: Tensor) -> Tuple[Tensor, Tensor]:
    """The means depend on v through tau2 = mean(v)/N; the variances go through log."""
    c = m.numel()
    dm, d_tau2 = efron_morris_vjp(m, v.mean() / n, d_mu)
    lv = _log(v)
    var = torch.exp(efron_morris(lv, 2 / (n - 1)))
    d_lv, _ = efron_morris_vjp(lv, 2 / (n - 1), d_var * var)
    return dm, d_tau2 / (c * n) + _log_vjp(v, d_lv)


class EstimatorSpec:
    """One estimator, declared once: its function, what the layers need to know about it.

    Args:
        name: the name layers and configs use (``estimator='paper'``).
        fn: ``fn(mean, var, count) -> (mean_used, var_used)`` on C-vectors (see above).
        vjp: closed-form vector-Jacobian product ``vjp(mean, var, count, d_mean_used,
            d_var_used) -> (d_mean, d_var)``, or None: autograd through ``fn``.
        min_channels: below this many channels the batch statistics are used unchanged
            (shrinkage across channels needs enough of them).
        fast_code: the branch of the CUDA kernels (``robustbn.fast``) that implements
            ``fn`` and ``vjp``, or None: always the reference path.

    Calling a spec applies the channel guard, then ``fn``.
    """

    __slots__ = ('name', 'fn', 'vjp', 'min_channels', 'fast_code')

    def __init__(self, name: str, fn: Estimator, vjp: Optional[EstimatorVJP] = None,
                 min_channels: int = 0, fast_code: Optional[int] = None) -> None:
        self.name, self.fn, self.vjp = name, fn, vjp
        self.min_channels, self.fast_code = min_channels, fast_code

    def shrinks(self, channels: int) -> bool:
        return channels >= self.min_channels

    def __call__(self, m: Tensor, v: Tensor, n) -> Tuple[Tensor, Tensor]:
        return self.fn(m, v, n) if self.shrinks(m.numel()) else (m, v)

    def backward(self, m: Tensor, v: Tensor, n, d_mu: Tensor, d_var: Tensor):
        """(dL/dm, dL/dv) from (dL/dmean_used, dL/dvar_used): the closed form if declared,
        else autograd through ``fn``."""
        if not self.shrinks(m.numel()):
            return d_mu, d_var
        if self.vjp is not None:
            return self.vjp(m, v, n, d_mu, d_var)
        return autograd_vjp(self.fn, m, v, n, d_mu, d_var)

    def __repr__(self) -> str:
        return f'EstimatorSpec({self.name!r})'


def autograd_vjp(fn: Estimator, m: Tensor, v: Tensor, n, d_mu: Tensor, d_var: Tensor):
    """The VJP of any estimator function by autograd on the C-vectors."""
    with torch.enable_grad():
        m_ = m.detach().requires_grad_()
        v_ = v.detach().requires_grad_()
        mu, var = fn(m_, v_, n)
        dm, dv = torch.autograd.grad((mu, var), (m_, v_), (d_mu, d_var), allow_unused=True)
    return (torch.zeros_like(m) if dm is None else dm), (torch.zeros_like(v) if dv is None else dv)


class _Registry(dict):
    """name -> EstimatorSpec; entries are added with :func:`register_estimator` only, so
    each one carries its declaration (a bare function would lack it)."""

    def __setitem__(self, name, value):
        raise TypeError(f'add estimators with robustbn.register_estimator({name!r}, fn), '
                        'not by assigning to ESTIMATORS')


ESTIMATORS: Dict[str, EstimatorSpec] = _Registry()


def register_estimator(name: str, fn: Estimator, *, vjp: Optional[EstimatorVJP] = None,
                       min_channels: int = 0) -> EstimatorSpec:
    """Make ``fn`` available to every layer as ``estimator=name`` (configs included).

    ``fn(mean, var, count) -> (mean_used, var_used)`` must be differentiable with torch
    ops: the layers' backward uses ``vjp`` if given, else autograd through ``fn``. User
    estimators always run on the reference path (the CUDA kernels implement the built-in
    ones only), whatever the fast-path mode. Returns the registered spec.

    Example::

        >>> def half_mean(m, v, n):
        ...     return 0.5 * m, v
        >>> robustbn.register_estimator('half_mean', half_mean)
        >>> layer = robustbn.JSBN2d(16, estimator='half_mean')
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f'an estimator name must be a non-empty string, got {name!r}')
    if name in ESTIMATORS or name == 'sample':
        raise ValueError(f'estimator {name!r} is already registered')
    if not callable(fn) or (vjp is not None and not callable(vjp)):
        raise TypeError(f'estimator {name!r}: fn and vjp must be callables')
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 0:
        raise ValueError(f'estimator {name!r}: min_channels must be an int >= 0, '
                         f'got {min_channels!r}')
    spec = EstimatorSpec(name, fn, vjp, min_channels)
    dict.__setitem__(ESTIMATORS, name, spec)
    return spec


def get_estimator(name: str) -> EstimatorSpec:
    """The estimator called ``name``; a ValueError lists the valid names otherwise."""
    try:
        return ESTIMATORS[name]
    except (KeyError, TypeError):
        raise ValueError(f'unknown estimator {name!r}; valid: '
                         f'{", ".join(sorted(ESTIMATORS))}') from None


# The built-in estimators. min_channels: C - 2 (resp. C - 3) must be positive for the
# shrinkage to make sense; 'classic' gives no risk improvement below 4 channels.
# fast_code: the EST branch of robustbn/fast/vector_kernels.py (0 is also every estimator
# below its minimum channel count).
for _spec in (EstimatorSpec('none', none, none_vjp, 0, 0),
              EstimatorSpec('paper', paper, paper_vjp, 3, 1),
              EstimatorSpec('paper_mean', paper_mean_only, paper_mean_only_vjp, 3, 2),
              EstimatorSpec('wacv', wacv, wacv_vjp, 3, 3),
              EstimatorSpec('classic', classic, classic_vjp, 4, 4)):
    dict.__setitem__(ESTIMATORS, _spec.name, _spec)
del _spec


def _spread_ratio(new: Tensor, old: Tensor) -> Tensor:
    """||new - mean(new)|| / ||old - mean(old)||, and 1 when old has no spread."""
    num = (new - new.mean()).norm()
    den = (old - old.mean()).norm()
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                       torch.ones_like(den))


def shrinkage_factors(m: Tensor, v: Tensor, mu: Tensor, var: Tensor) -> Tensor:
    """How much an estimator changed the batch statistics: a 3-vector (1 = unchanged).

    - mean factor: spread of the used channel means over that of the batch means,
      ||mu - mean(mu)|| / ||m - mean(m)||; exactly the factor a of 'paper'/'wacv' (which
      scale m) and of 'classic' (which scales m - mean(m)). Near 3/(C+1) the layer nearly
      stops centring.
    - variance factor: the same ratio for log variances (how much the variances are pulled
      together; exactly the factor of 'classic').
    - variance scale: geometric mean of var / v (the factor of 'wacv', the inflation of
      'paper').
    """
    lv, lvar = _log(v), _log(var)
    return torch.stack([_spread_ratio(mu, m), _spread_ratio(lvar, lv),
                        torch.exp((lvar - lv).mean())])
