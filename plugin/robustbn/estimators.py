"""Shrinkage estimators of per-channel batch statistics.

Every estimator is a pure, differentiable function on C-vectors::

    mean_used, var_used = estimator(mean, var, count)

``mean`` and ``var`` are the per-channel batch mean and *biased* batch variance over
``count`` values per channel (``count`` may be a Python number or a 0-dim tensor, so a
count gathered across processes never needs a host sync). The result is what the layer
normalizes with.

Each estimator is declared once in ``ESTIMATORS`` (an :class:`EstimatorSpec`): its
function, its closed-form vector-Jacobian product (hand-derived, checked against autograd
in tests; the CUDA fast path's kernels and the CPU default, ``robustbn.lean``, implement
the same formulas), the channel count below which it leaves the batch statistics
unchanged, and its fast-path code. Users add their own with :func:`register_estimator`;
their gradient comes from autograd on the C-vectors.

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


def finite_channels(m: Tensor, v: Tensor) -> Tensor:
    """The channels where both C-vectors are finite (a bool C-vector): m * 0 + v * 0 is 0
    there and NaN elsewhere; 3 ops where isfinite & isfinite takes 9."""
    return torch.mul(m, 0).add_(v, alpha=0) == 0


def _channel_set(u: Tensor, mask: Optional[Tensor]):
    """(u0, c, ubar, d) of the channels in ``mask`` (None: all): u with the others
    zeroed, their count (a 0-dim tensor, >= 1 so that means stay finite), mean, and the
    deviations from it (zero outside the set). Cross-channel sums over u0 and d take the
    set's channels only, so a non-finite channel outside it cannot reach the others."""
    if mask is None:
        c = torch.tensor(float(u.numel()), dtype=u.dtype, device=u.device)
        ubar = u.sum() / c
        return u, c, ubar, u - ubar
    u0 = torch.where(mask, u, 0.0)
    c = _count(mask, u.dtype)
    ubar = u0.sum() / c
    return u0, c, ubar, torch.where(mask, u0 - ubar, 0.0)


def _count(mask: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """How many channels ``mask`` holds (>= 1), a 0-dim tensor of ``dtype``."""
    return mask.sum().to(dtype).clamp_min(1)


def geometric_mean(v: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """exp(mean(log v)) over ``mask``: without the overflow of prod(v) ** (1/C)."""
    _, c, mean_log, _ = _channel_set(_log(v), mask)
    return torch.exp(mean_log)


def _paper_k(c: Tensor) -> Tensor:
    return ((c - 2) * c / (c + 1)).clamp_min(0)


def paper_mean(m: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean estimator of the 2025 JS-BN paper's released code.

    s2 = (1/C) sum_k (m_k - mean(m))^2,  a = 1 - (C-2) C/(C+1) s2 / ||m||^2,  m_JS = a m.
    Since s2 <= ||m||^2 / C, a >= 3/(C+1) > 0. ||m|| = 0 gives a = 1 (m_JS = m = 0).
    """
    m0, c, _, d = _channel_set(m, mask)
    a = 1 - _paper_k(c) * _safe_ratio(d.square().sum() / c, m0.square().sum())
    return a * m


def _paper_var_mult(n, c: Tensor):
    r = n / (n + 1)
    return r, (4 * (c - 1) * r / ((n - 1) * c + 2)).clamp_min(0)


def paper_var(v: Tensor, n, mask: Optional[Tensor] = None) -> Tensor:
    """Variance estimator of the 2025 JS-BN paper's released code.

    v_JS = N/(N+1) v + M G,  M = 4(C-1) N/(N+1) / ((N-1) C + 2),  G = exp(mean(log v)).
    """
    c = _count(mask, v.dtype) if mask is not None else _channel_set(v, None)[1]
    r, mult = _paper_var_mult(n, c)
    return r * v + mult * geometric_mean(v, mask)


def wacv_shrink(u: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """James-Stein toward 0 as in JSNorm (WACV 2024), used for both means and variances.

    s2 = (1/C) sum_k (u_k - mean(u))^2,  a = 1 - (C-2) s2 / ||u||^2,  u_JS = a u  (a >= 2/C).
    """
    u0, c, _, d = _channel_set(u, mask)
    return (1 - (c - 2).clamp_min(0) * _safe_ratio(d.square().sum() / c, u0.square().sum())) * u


def efron_morris(u: Tensor, noise_var, mask: Optional[Tensor] = None) -> Tensor:
    """Positive-part James-Stein toward the grand mean (Efron-Morris).

    u_JS = mean(u) + max(0, 1 - (C-3) noise_var / ||u - mean(u)||^2) (u - mean(u)).
    """
    _, c, ubar, d = _channel_set(u, mask)
    s = d.square().sum()
    # s == 0 means u is already constant: any factor gives u back; use 1.
    shrink = torch.where(s > 0, (c - 3).clamp_min(0) * noise_var
                         / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    return ubar + (1 - shrink).clamp_min(0) * d


def _masked_mean(u: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    return _channel_set(u, mask)[2]


def none(m: Tensor, v: Tensor, n, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """No shrinkage: plain batch statistics (exactly BatchNorm)."""
    return m, v


def paper(m: Tensor, v: Tensor, n, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """2025 JS-BN paper: ``paper_mean`` for the means, ``paper_var`` for the variances."""
    return paper_mean(m, mask), paper_var(v, n, mask)


def paper_mean_only(m: Tensor, v: Tensor, n,
                    mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """2025 JS-BN paper's mean estimator with the plain batch variance."""
    return paper_mean(m, mask), v


def wacv(m: Tensor, v: Tensor, n, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """JSNorm (WACV 2024): ``wacv_shrink`` on the means and on the variances."""
    return wacv_shrink(m, mask), wacv_shrink(v, mask)


def classic(m: Tensor, v: Tensor, n, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Textbook positive-part James-Stein (Efron-Morris) with noise variances.

    means:     ``efron_morris(m, tau2)`` with tau2 = mean_k(v_k) / N (variance of a mean);
    variances: ``exp(efron_morris(log v, 2 / (N-1)))`` (variance of a log sample variance).
    """
    m_js = efron_morris(m, _masked_mean(v, mask) / n, mask)
    v_js = torch.exp(efron_morris(_log(v), 2 / (n - 1), mask))
    return m_js, v_js


# Closed-form vector-Jacobian products: (dL/dm, dL/dv) from (dL/dmean_used, dL/dvar_used),
# equal to autograd through the functions above, guards included (where a guard selects a
# constant, the gradient through it is zero; clamp_min passes the gradient where v >= tiny).
# Outside ``mask`` the results are not used (EstimatorSpec.backward passes those channels'
# gradients through), and the output gradients there never enter the cross-channel sums.

def _log_vjp(v: Tensor, grad_log: Tensor) -> Tensor:
    """VJP of ``_log``: 1/v where v >= tiny (the clamp's gradient), 0 below."""
    ok = v >= torch.finfo(v.dtype).tiny
    return torch.where(ok, grad_log / torch.where(ok, v, torch.ones_like(v)), torch.zeros_like(v))


def _in(g: Tensor, mask: Optional[Tensor]) -> Tensor:
    return g if mask is None else torch.where(mask, g, 0.0)


def shrink_to_zero_vjp(u: Tensor, g: Tensor, k_of_c, mask: Tensor) -> Tensor:
    """VJP of a u with a = 1 - k s2/||u||^2 (``paper_mean``: k = (C-2)C/(C+1); ``wacv_shrink``:
    k = C-2), s2 = mean((u - mean(u))^2); a = 1 and no gradient through it when ||u|| = 0."""
    u0, c, _, d = _channel_set(u, mask)
    k = k_of_c(c)
    s2 = d.square().sum() / c
    q = u0.square().sum()
    ok = q > 0
    q1 = torch.where(ok, q, torch.ones_like(q))
    a = 1 - k * torch.where(ok, s2 / q1, torch.zeros_like(q))
    # da/du = -k (2 d / (C q) - 2 s2 u / q^2)
    gu = (_in(g, mask) * u0).sum()
    da = torch.where(ok, -k * (2 * d / (c * q1) - 2 * s2 * u0 / q1.square()),
                     torch.zeros_like(u))
    return a * g + gu * da


def paper_var_vjp(v: Tensor, n, h: Tensor, mask: Tensor) -> Tensor:
    """VJP of ``paper_var``: r h + M sum(h) G / (C v) (the geometric mean's gradient)."""
    c = _count(mask, v.dtype) if mask is not None else _channel_set(v, None)[1]
    r, mult = _paper_var_mult(n, c)
    return r * h + _log_vjp(v, mult * _in(h, mask).sum() * geometric_mean(v, mask) / c)


def efron_morris_vjp(u: Tensor, noise_var, g: Tensor, mask: Tensor):
    """VJP of ``efron_morris``: (dL/du, dL/dnoise_var).

    With d = u - mean(u), s = ||d||^2, shrink = (C-3) noise_var / s, f = max(0, 1 - shrink):
    dL/du = mean(g) + f (g - mean(g)) + 2 [1 - shrink >= 0] (C-3) noise_var (g.d) d / s^2,
    dL/dnoise_var = -[1 - shrink >= 0] (C-3) (g.d) / s; both shrink terms vanish when s = 0.
    """
    _, c, _, d = _channel_set(u, mask)
    k = (c - 3).clamp_min(0)
    s = d.square().sum()
    ok = s > 0
    s1 = torch.where(ok, s, torch.ones_like(s))
    shrink = torch.where(ok, k * noise_var / s1, torch.zeros_like(s))
    f = (1 - shrink).clamp_min(0)
    live = ok & (1 - shrink >= 0)  # clamp_min passes the gradient at exactly 0
    g0 = _in(g, mask)
    gd = (g0 * d).sum()
    gbar = g0.sum() / c
    du = gbar + f * (g - gbar) + torch.where(live, 2 * k * noise_var * gd / s1.square(),
                                             torch.zeros_like(s)) * d
    dnv = torch.where(live, -k * gd / s1, torch.zeros_like(s))
    return du, dnv


def none_vjp(m: Tensor, v: Tensor, n, d_mu: Tensor, d_var: Tensor, mask: Tensor):
    return d_mu, d_var


def paper_vjp(m: Tensor, v: Tensor, n, d_mu: Tensor, d_var: Tensor, mask: Tensor):
    return (shrink_to_zero_vjp(m, d_mu, _paper_k, mask),
            paper_var_vjp(v, n, d_var, mask))


def paper_mean_only_vjp(m: Tensor, v: Tensor, n, d_mu: Tensor, d_var: Tensor, mask: Tensor):
    return shrink_to_zero_vjp(m, d_mu, _paper_k, mask), d_var


def _wacv_k(c: Tensor) -> Tensor:
    return (c - 2).clamp_min(0)


def wacv_vjp(m: Tensor, v: Tensor, n, d_mu: Tensor, d_var: Tensor, mask: Tensor):
    return shrink_to_zero_vjp(m, d_mu, _wacv_k, mask), shrink_to_zero_vjp(v, d_var, _wacv_k, mask)


def classic_vjp(m: Tensor, v: Tensor, n, d_mu: Tensor, d_var: Tensor, mask: Tensor):
    """The means depend on v through tau2 = mean(v)/N; the variances go through log."""
    c = _count(mask, v.dtype) if mask is not None else _channel_set(v, None)[1]
    dm, d_tau2 = efron_morris_vjp(m, _masked_mean(v, mask) / n, d_mu, mask)
    lv = _log(v)
    var = torch.exp(efron_morris(lv, 2 / (n - 1), mask))
    d_lv, _ = efron_morris_vjp(lv, 2 / (n - 1), d_var * var, mask)
    return dm, d_tau2 / (c * n) + _log_vjp(v, d_lv)


class EstimatorSpec:
    """One estimator, declared once: its function, what the layers need to know about it.

    Args:
        name: the name layers and configs use (``estimator='paper'``).
        fn: ``fn(mean, var, count) -> (mean_used, var_used)`` on C-vectors (see above);
            with ``masked``, ``fn(mean, var, count, mask)``.
        vjp: closed-form vector-Jacobian product ``vjp(mean, var, count, d_mean_used,
            d_var_used[, mask]) -> (d_mean, d_var)``, or None: autograd through ``fn``.
        min_channels: with fewer channels the batch statistics are used unchanged
            (shrinkage across channels needs enough of them).
        fast_code: the branch of the CUDA kernels (``robustbn.fast``) that implements
            ``fn`` and ``vjp``, or None: always the reference path.
        masked: ``fn`` (and ``vjp``) take a bool C-vector ``mask`` of the channels whose
            statistics are finite and reduce across those channels only.

    Non-finite channels: a channel whose batch mean or variance is not finite keeps its
    batch statistics (as in BatchNorm, its output is then what BatchNorm gives), and with
    ``masked`` it does not enter the other channels' estimates. Calling a spec applies
    that rule and the channel guard (counted over the finite channels), then ``fn``.
    """

    __slots__ = ('name', 'fn', 'vjp', 'min_channels', 'fast_code', 'masked')

    def __init__(self, name: str, fn: Estimator, vjp: Optional[EstimatorVJP] = None,
                 min_channels: int = 0, fast_code: Optional[int] = None,
                 masked: bool = False) -> None:
        self.name, self.fn, self.vjp = name, fn, vjp
        self.min_channels, self.fast_code, self.masked = min_channels, fast_code, masked

    def shrinks(self, channels: int) -> bool:
        return channels >= self.min_channels

    def _keep(self, mask: Tensor) -> Tensor:
        """The channels that take the estimate: finite, and enough finite channels."""
        return mask & (mask.sum() >= self.min_channels)

    def __call__(self, m: Tensor, v: Tensor, n, mask: Optional[Tensor] = None):
        if self.fn is none or not self.shrinks(m.numel()):
            return m, v
        mask = finite_channels(m, v) if mask is None else mask
        mu, var = self.fn(m, v, n, mask) if self.masked else self.fn(m, v, n)
        keep = self._keep(mask)
        return torch.where(keep, mu, m), torch.where(keep, var, v)

    def backward(self, m: Tensor, v: Tensor, n, d_mu: Tensor, d_var: Tensor,
                 mask: Optional[Tensor] = None):
        """(dL/dm, dL/dv) from (dL/dmean_used, dL/dvar_used): the closed form if declared,
        else autograd through ``fn``; identity in the channels that keep their batch
        statistics, whose output gradients do not reach the others (with ``masked``)."""
        if self.fn is none or not self.shrinks(m.numel()):
            return d_mu, d_var
        mask = finite_channels(m, v) if mask is None else mask
        keep = self._keep(mask)
        d_mu0, d_var0 = torch.where(keep, d_mu, 0.0), torch.where(keep, d_var, 0.0)
        args = (mask,) if self.masked else ()
        if self.vjp is not None:
            dm, dv = self.vjp(m, v, n, d_mu0, d_var0, *args)
        else:
            dm, dv = autograd_vjp(self.fn, m, v, n, d_mu0, d_var0, *args)
        return torch.where(keep, dm, d_mu), torch.where(keep, dv, d_var)

    def __repr__(self) -> str:
        return f'EstimatorSpec({self.name!r})'


def autograd_vjp(fn: Estimator, m: Tensor, v: Tensor, n, d_mu: Tensor, d_var: Tensor,
                 *args):
    """The VJP of any estimator function by autograd on the C-vectors."""
    with torch.enable_grad():
        m_ = m.detach().requires_grad_()
        v_ = v.detach().requires_grad_()
        mu, var = fn(m_, v_, n, *args)
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
                       min_channels: int = 0, masked: bool = False) -> EstimatorSpec:
    """Make ``fn`` available to every layer as ``estimator=name`` (configs included).

    ``fn(mean, var, count) -> (mean_used, var_used)`` must be differentiable with torch
    ops: the layers' backward uses ``vjp`` if given, else autograd through ``fn``. User
    estimators always run on the reference path (the CUDA kernels implement the built-in
    ones only), whatever the fast-path mode. Channels with non-finite statistics keep
    their batch statistics; ``fn`` sees them unless ``masked=True``, in which case it is
    called as ``fn(mean, var, count, mask)`` and should reduce over ``mask`` only (see
    :class:`EstimatorSpec`). Returns the registered spec.

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
    spec = EstimatorSpec(name, fn, vjp, min_channels, masked=bool(masked))
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
for _spec in (EstimatorSpec('none', none, none_vjp, 0, 0, masked=True),
              EstimatorSpec('paper', paper, paper_vjp, 3, 1, masked=True),
              EstimatorSpec('paper_mean', paper_mean_only, paper_mean_only_vjp, 3, 2, masked=True),
              EstimatorSpec('wacv', wacv, wacv_vjp, 3, 3, masked=True),
              EstimatorSpec('classic', classic, classic_vjp, 4, 4, masked=True)):
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
