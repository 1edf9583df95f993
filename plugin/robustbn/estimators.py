"""Shrinkage estimators of per-channel batch statistics.

Every estimator is a pure, differentiable function on C-vectors::

    mean_used, var_used = estimator(mean, var, count)

``mean`` and ``var`` are the per-channel batch mean and *biased* batch variance over
``count`` values per channel (``count`` may be a Python number or a 0-dim tensor, so a
count gathered across processes never needs a host sync). The result is what the layer
normalizes with. The layers' backward differentiates these functions with autograd on the
C-vectors only, so any estimator added here gets an exact gradient for free. The
built-in ones also have hand-derived vector-Jacobian products (``ESTIMATOR_VJPS``, the
closed forms the CUDA fast path's kernel implements), checked against autograd in tests.

Guards shared by all estimators: no 0/0 when a squared norm is zero, log-domain
geometric means (a product of C variances over/underflows in float32), and too few
channels for shrinkage to make sense returns the inputs unchanged.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import Tensor

Estimator = Callable[[Tensor, Tensor, object], Tuple[Tensor, Tensor]]


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
    """2025 JS-BN paper: ``paper_mean`` for the means, ``paper_var`` for the variances.
    C < 3 returns the batch statistics."""
    if m.numel() < 3:
        return m, v
    return paper_mean(m), paper_var(v, n)


def paper_mean_only(m: Tensor, v: Tensor, n) -> Tuple[Tensor, Tensor]:
    """2025 JS-BN paper's mean estimator with the plain batch variance. C < 3: unchanged."""
    if m.numel() < 3:
        return m, v
    return paper_mean(m), v


def wacv(m: Tensor, v: Tensor, n) -> Tuple[Tensor, Tensor]:
    """JSNorm (WACV 2024): ``wacv_shrink`` on the means and on the variances. C < 3: unchanged."""
    if m.numel() < 3:
        return m, v
    return wacv_shrink(m), wacv_shrink(v)


def classic(m: Tensor, v: Tensor, n) -> Tuple[Tensor, Tensor]:
    """Textbook positive-part James-Stein (Efron-Morris) with noise variances.

    means:     ``efron_morris(m, tau2)`` with tau2 = mean_k(v_k) / N (variance of a mean);
    variances: ``exp(efron_morris(log v, 2 / (N-1)))`` (variance of a log sample variance).
    C < 4: unchanged (no risk improvement below 4 channels).
    """
    if m.numel() < 4:
        return m, v
    m_js = efron_morris(m, v.mean() / n)
    v_js = torch.exp(efron_morris(_log(v), 2 / (n - 1)))
    return m_js, v_js


ESTIMATORS: Dict[str, Estimator] = {
    'paper': paper,
    'paper_mean': paper_mean_only,
    'wacv': wacv,
    'classic': classic,
    'none': none,
}


def get_estimator(name: str) -> Estimator:
    """The estimator called ``name``; a ValueError lists the valid names otherwise."""
    try:
        return ESTIMATORS[name]
    except (KeyError, TypeError):
        raise ValueError(f'unknown estimator {name!r}; valid: {", ".join(sorted(ESTIMATORS))}') from None


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
    if c < 3:
        return d_mu, d_var
    return shrink_to_zero_vjp(m, d_mu, (c - 2) * c / (c + 1)), paper_var_vjp(v, n, d_var)


def paper_mean_only_vjp(m: Tensor, v: Tensor, n, d_mu: Tensor, d_var: Tensor):
    c = m.numel()
    if c < 3:
        return d_mu, d_var
    return shrink_to_zero_vjp(m, d_mu, (c - 2) * c / (c + 1)), d_var


def wacv_vjp(m: Tensor, v: Tensor, n, d_mu: Tensor, d_var: Tensor) -> Tuple[Tensor, Tensor]:
    c = m.numel()
    if c < 3:
        return d_mu, d_var
    return shrink_to_zero_vjp(m, d_mu, c - 2), shrink_to_zero_vjp(v, d_var, c - 2)


def classic_vjp(m: Tensor, v: Tensor, n, d_mu: Tensor, d_var: Tensor) -> Tuple[Tensor, Tensor]:
    """The means depend on v through tau2 = mean(v)/N; the variances go through log."""
    c = m.numel()
    if c < 4:
        return d_mu, d_var
    dm, d_tau2 = efron_morris_vjp(m, v.mean() / n, d_mu)
    lv = _log(v)
    var = torch.exp(efron_morris(lv, 2 / (n - 1)))
    d_lv, _ = efron_morris_vjp(lv, 2 / (n - 1), d_var * var)
    return dm, d_tau2 / (c * n) + _log_vjp(v, d_lv)


ESTIMATOR_VJPS: Dict[str, Callable] = {
    'paper': paper_vjp,
    'paper_mean': paper_mean_only_vjp,
    'wacv': wacv_vjp,
    'classic': classic_vjp,
    'none': none_vjp,
}


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
    return torch.stack([_spread_ratio(mu, m), _spread_ratio(lvar, lv), torch.exp((lvar - lv).mean())])
