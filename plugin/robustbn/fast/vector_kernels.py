"""Single-program Triton kernels on the C-vectors: merge the partials, run the estimator,
update the running statistics and prepare the affine maps (forward); merge the gradient
sums and apply the estimator's vector-Jacobian product (backward).

The estimator formulas mirror ``robustbn.estimators`` (guards included) and the VJPs the
closed forms there (each ``EstimatorSpec.vjp``). EST codes: each built-in estimator's
``fast_code``; 'none' is also every estimator below its minimum channel count.

Scalars computed from C in the kernel (not passed as float arguments) are exact in float64.
"""
import triton
import triton.language as tl

from ..estimators import ESTIMATORS
from .kernels import (
    SLOT_A,
    SLOT_B,
    SLOT_COUNT,
    SLOT_INV,
    SLOT_M,
    SLOT_MO,
    SLOT_MU,
    SLOT_V,
    SLOT_VAR,
    SLOT_VAR_UNBIASED,
    chan_merge,
    welford_combine,
)

# The codes are declared with the estimators (robustbn.estimators.ESTIMATORS).
EST_NONE = tl.constexpr(ESTIMATORS['none'].fast_code)
EST_PAPER = tl.constexpr(ESTIMATORS['paper'].fast_code)
EST_PAPER_MEAN = tl.constexpr(ESTIMATORS['paper_mean'].fast_code)
EST_WACV = tl.constexpr(ESTIMATORS['wacv'].fast_code)
EST_CLASSIC = tl.constexpr(ESTIMATORS['classic'].fast_code)


@triton.jit
def _rsqrt(x, F64: tl.constexpr):
    # Correctly rounded: these few values set the scale of the whole output.
    if F64:
        return 1.0 / tl.sqrt(x)
    else:
        return tl.div_rn(1.0, tl.sqrt_rn(x))


@triton.jit
def _vsum(u, ok):
    return tl.sum(tl.where(ok, u, 0.0), 0)


@triton.jit
def _shrink_factor(u, ok, cf, k):
    """a = 1 - k s2 / ||u||^2 (1 when ||u|| = 0), with the pieces its VJP needs."""
    d = tl.where(ok, u - _vsum(u, ok) / cf, 0.0)
    s2 = tl.sum(d * d, 0) / cf
    q = _vsum(u * u, ok)
    q1 = tl.where(q > 0, q, 1.0)
    a = 1.0 - k * tl.where(q > 0, s2 / q1, 0.0)
    return a, d, s2, q, q1


@triton.jit
def _shrink_vjp(u, g, ok, cf, k):
    a, d, s2, q, q1 = _shrink_factor(u, ok, cf, k)
    da = tl.where(q > 0, -k * (2.0 * d / (cf * q1) - 2.0 * s2 * u / (q1 * q1)), 0.0)
    return a * g + _vsum(g * u, ok) * da


@triton.jit
def _log(v, tiny):
    return tl.log(tl.maximum(v, tiny))


@triton.jit
def _log_vjp(v, grad, tiny):
    live = v >= tiny  # clamp_min's gradient mask
    return tl.where(live, grad / tl.where(live, v, 1.0), 0.0)


@triton.jit
def _paper_var_consts(n, cf):
    r = n / (n + 1.0)
    return r, tl.maximum(4.0 * (cf - 1.0) * r / ((n - 1.0) * cf + 2.0), 0.0)


@triton.jit
def _efron_morris(u, ok, nv, cf, k):
    """mean(u) + max(0, 1 - k nv / s) (u - mean(u)), s = ||u - mean(u)||^2 (factor 1 at s = 0)."""
    ubar = _vsum(u, ok) / cf
    d = tl.where(ok, u - ubar, 0.0)
    s = tl.sum(d * d, 0)
    s1 = tl.where(s > 0, s, 1.0)
    shrink = tl.where(s > 0, k * nv / s1, 0.0)
    f = tl.maximum(1.0 - shrink, 0.0)
    live = (s > 0) & (1.0 - shrink >= 0)
    return ubar + f * d, d, s1, f, live


@triton.jit
def _efron_morris_vjp(u, g, ok, nv, cf, k):
    """(dL/du, dL/dnv), see ``estimators.efron_morris_vjp``."""
    _, d, s1, f, live = _efron_morris(u, ok, nv, cf, k)
    gd = _vsum(g * d, ok)
    gbar = _vsum(g, ok) / cf
    du = gbar + f * (g - gbar) + tl.where(live, 2.0 * k * nv * gd / (s1 * s1), 0.0) * d
    dnv = tl.where(live, -k * gd / s1, 0.0)
    return du, dnv


@triton.jit
def _shrink_constant(cf, EST: tl.constexpr):
    """k of the estimator: (C-2)C/(C+1) for paper's means, C-2 for wacv, C-3 for classic
    (C: the finite channels; never negative)."""
    if EST == EST_WACV:
        return tl.maximum(cf - 2.0, 0.0)
    elif EST == EST_CLASSIC:
        return tl.maximum(cf - 3.0, 0.0)
    else:
        return tl.maximum((cf - 2.0) * cf / (cf + 1.0), 0.0)


@triton.jit
def _finite(u):
    return (u - u) == 0  # False for inf and NaN


@triton.jit
def _channel_set(m, v, ok, min_channels, dt):
    """(fin, keep, cf): the channels with finite statistics, those that take the estimate
    (enough finite channels), and the count of finite ones (>= 1), as
    ``estimators.EstimatorSpec`` and ``_channel_set`` there."""
    fin = ok & _finite(m) & _finite(v)
    nfin = tl.sum(fin.to(dt), 0)
    # (a C-vector comparison: Triton's interpreter cannot AND a scalar with a vector)
    enough = (tl.zeros_like(m) + nfin) >= min_channels
    return fin, fin & enough, tl.maximum(nfin, 1.0)


@triton.jit
def _merge_rows(P, n_rows, C, c, ok, WITH_COUNT: tl.constexpr, BLOCK_S: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """Rows of P: with WITH_COUNT (1 + 2C)-rows [count, mean, M2] merged exactly, giving
    (mean, M2, count); else 2C-rows [a, b] summed, giving (sum a, sum b, 0)."""
    dt = P.dtype.element_ty
    acc_a = tl.zeros([BLOCK_C], dt)
    acc_b = tl.zeros([BLOCK_C], dt)
    acc_n = tl.zeros([BLOCK_C], dt)
    stride = 2 * C + WITH_COUNT
    r0 = 0
    while r0 < n_rows:
        r = r0 + tl.arange(0, BLOCK_S)[:, None]
        m = (r < n_rows) & ok[None, :]
        base = P + r.to(tl.int64) * stride + WITH_COUNT + c[None, :]
        ta = tl.load(base, mask=m, other=0.0)
        tb = tl.load(base + C, mask=m, other=0.0)
        if WITH_COUNT:
            tn = tl.load(P + r.to(tl.int64) * stride + c[None, :] * 0, mask=m, other=0.0)
            ta, tb, tn = chan_merge(ta, tb, tn, 0)
            acc_a, acc_b, acc_n = welford_combine(acc_a, acc_b, acc_n, ta, tb, tn)
        else:
            acc_a += tl.sum(ta, 0)
            acc_b += tl.sum(tb, 0)
        r0 += BLOCK_S
    return acc_a, acc_b, acc_n


@triton.jit
def _ema(BUF, c, ok, new, f):
    """BUF += f (new - BUF) as torch.lerp computes it, in BUF's dtype."""
    old = tl.load(BUF + c, mask=ok, other=0.0).to(new.dtype)
    out = tl.where(f < 0.5, old + f * (new - old), new - (new - old) * (1.0 - f))
    tl.store(BUF + c, out.to(BUF.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=['n_rows'])
def estimate_kernel(P, n_rows, C, STATS, W, B, REF_MU, REF_VAR, U1M, U1V, U2M, U2V,
                    f1: tl.float64, f2: tl.float64, eps: tl.float64, min_channels,
                    EST: tl.constexpr,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_REF: tl.constexpr,
                    NUM_UPD: tl.constexpr, F64: tl.constexpr, TINY: tl.constexpr,
                    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Forward on the C-vectors: (m, v, n) from the moments' partials P (n_rows rows, all
    ranks' after a gather), (mu, var) = estimator(m, v, n), the affine map of the output
    and the unbiased variance into STATS, and NUM_UPD (<= 2) EMA updates of running
    buffers (U1M, U1V) with factor f1 and (U2M, U2V) with f2. Non-finite channels keep
    their batch statistics, stay out of the cross-channel sums, and are not updated; an
    empty global batch updates nothing."""
    dt = STATS.dtype.element_ty
    c = tl.arange(0, BLOCK_C)
    ok = c < C
    tiny = tl.full([BLOCK_C], TINY, dt)
    mean, m2, cnt = _merge_rows(P, n_rows, C, c, ok, 1, BLOCK_S, BLOCK_C)
    n = tl.max(cnt, 0)  # the same in every lane
    m = tl.where(ok, mean, 0.0)
    v = tl.where(ok, m2 / tl.maximum(cnt, 1.0), 0.0)
    fin, keep, cf = _channel_set(m, v, ok, min_channels, dt)
    k = _shrink_constant(cf, EST)

    mu = m
    var = v
    if EST == EST_PAPER or EST == EST_PAPER_MEAN:
        a, _, _, _, _ = _shrink_factor(m, fin, cf, k)
        mu = a * m
    if EST == EST_PAPER:
        r, mult = _paper_var_consts(n, cf)
        var = r * v + mult * tl.exp(_vsum(_log(v, tiny), fin) / cf)
    if EST == EST_WACV:
        a, _, _, _, _ = _shrink_factor(m, fin, cf, k)
        mu = a * m
        b, _, _, _, _ = _shrink_factor(v, fin, cf, k)
        var = b * v
    if EST == EST_CLASSIC:
        mu, _, _, _, _ = _efron_morris(m, fin, _vsum(v, fin) / cf / n, cf, k)
        lv, _, _, _, _ = _efron_morris(_log(v, tiny), fin, 2.0 / (n - 1.0), cf, k)
        var = tl.exp(lv)
    mu = tl.where(keep, mu, m)
    var = tl.where(keep, var, v)

    eps_ = tl.cast(eps, dt)
    if HAS_REF:
        out_mu = tl.load(REF_MU + c, mask=ok, other=0.0).to(dt)
        inv = _rsqrt(tl.load(REF_VAR + c, mask=ok, other=1.0).to(dt) + eps_, F64)
    else:
        out_mu = mu
        inv = _rsqrt(var + eps_, F64)
    scale = inv
    if HAS_W:
        scale = inv * tl.load(W + c, mask=ok, other=0.0).to(dt)
    shift = tl.zeros([BLOCK_C], dt)
    if HAS_B:
        shift = tl.load(B + c, mask=ok, other=0.0).to(dt)
    # A global count of 1 is only possible across ranks (checked locally otherwise).
    var_unbiased = var * (n / tl.maximum(n - 1.0, 1.0))

    tl.store(STATS + SLOT_M * C + c, m, mask=ok)
    tl.store(STATS + SLOT_V * C + c, v, mask=ok)
    tl.store(STATS + SLOT_MU * C + c, mu, mask=ok)
    tl.store(STATS + SLOT_VAR * C + c, var, mask=ok)
    tl.store(STATS + SLOT_INV * C + c, inv, mask=ok)
    tl.store(STATS + SLOT_A * C + c, scale, mask=ok)
    tl.store(STATS + SLOT_MO * C + c, out_mu, mask=ok)
    tl.store(STATS + SLOT_B * C + c, shift, mask=ok)
    tl.store(STATS + SLOT_VAR_UNBIASED * C + c, var_unbiased, mask=ok)
    tl.store(STATS + SLOT_COUNT * C + c * 0, cnt, mask=c == 0)
    upd = ok & _finite(mu) & _finite(var_unbiased) & ((tl.zeros_like(mu) + n) > 0)
    if NUM_UPD >= 1:
        _ema(U1M, c, upd, mu, tl.cast(f1, dt))
        _ema(U1V, c, upd, var_unbiased, tl.cast(f1, dt))
    if NUM_UPD >= 2:
        _ema(U2M, c, upd, mu, tl.cast(f2, dt))
        _ema(U2V, c, upd, var_unbiased, tl.cast(f2, dt))


@triton.jit(do_not_specialize=['n_rows'])
def vjp_kernel(P_LOCAL, P_TOTAL, n_rows, C, STATS, W, COEF, GW, GB, eps: tl.float64,
               min_channels, EST: tl.constexpr, HAS_W: tl.constexpr,
               HAS_REF: tl.constexpr, SAME: tl.constexpr, WRITE_GW: tl.constexpr,
               WRITE_GB: tl.constexpr, NEED_GX: tl.constexpr, F64: tl.constexpr,
               TINY: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Backward on the C-vectors. From the gradient sums' partials (local ones for the
    weight and bias gradients, P_TOTAL all-reduced across ranks, or the same with SAME):
    COEF = [W | A | M | B] of grad_x = g W + A (x - M) + B."""
    dt = STATS.dtype.element_ty
    c = tl.arange(0, BLOCK_C)
    ok = c < C
    sg, sgx, _ = _merge_rows(P_LOCAL, n_rows, C, c, ok, 0, BLOCK_S, BLOCK_C)
    if WRITE_GW:
        tl.store(GW + c, sgx.to(GW.dtype.element_ty), mask=ok)
    if WRITE_GB:
        tl.store(GB + c, sg.to(GB.dtype.element_ty), mask=ok)
    if NEED_GX:
        if not SAME:
            sg, sgx, _ = _merge_rows(P_TOTAL, n_rows, C, c, ok, 0, BLOCK_S, BLOCK_C)
        tiny = tl.full([BLOCK_C], TINY, dt)
        m = tl.load(STATS + SLOT_M * C + c, mask=ok, other=0.0)
        v = tl.load(STATS + SLOT_V * C + c, mask=ok, other=0.0)
        fin, keep, cf = _channel_set(m, v, ok, min_channels, dt)
        k = _shrink_constant(cf, EST)
        var = tl.load(STATS + SLOT_VAR * C + c, mask=ok, other=0.0)
        out_inv = tl.load(STATS + SLOT_INV * C + c, mask=ok, other=1.0)
        n = tl.max(tl.load(STATS + SLOT_COUNT * C + c * 0), 0)
        inv = out_inv
        if HAS_REF:
            # S_gz with z = (x - mu_c) invstd_c, from the sums taken with the reference stats
            inv = _rsqrt(var + tl.cast(eps, dt), F64)
            mu = tl.load(STATS + SLOT_MU * C + c, mask=ok, other=0.0)
            out_mu = tl.load(STATS + SLOT_MO * C + c, mask=ok, other=0.0)
            sgx = (sgx / out_inv + (out_mu - mu) * sg) * inv
        w = out_inv
        if HAS_W:
            w = out_inv * tl.load(W + c, mask=ok, other=0.0).to(dt)
        d_mu_all = -w * sg
        d_var_all = -0.5 * w * inv * sgx
        # Channels that keep their batch statistics pass their gradients through and do
        # not enter the cross-channel sums.
        d_mu = tl.where(keep, d_mu_all, 0.0)
        d_var = tl.where(keep, d_var_all, 0.0)
        dm = d_mu
        dv = d_var
        if EST == EST_PAPER or EST == EST_PAPER_MEAN:
            dm = _shrink_vjp(m, d_mu, fin, cf, k)
        if EST == EST_PAPER:
            r, mult = _paper_var_consts(n, cf)
            geo = tl.exp(_vsum(_log(v, tiny), fin) / cf)
            dv = r * d_var + _log_vjp(v, mult * _vsum(d_var, fin) * geo / cf, tiny)
        if EST == EST_WACV:
            dm = _shrink_vjp(m, d_mu, fin, cf, k)
            dv = _shrink_vjp(v, d_var, fin, cf, k)
        if EST == EST_CLASSIC:
            dm, d_tau2 = _efron_morris_vjp(m, d_mu, fin, _vsum(v, fin) / cf / n, cf, k)
            d_lv, _ = _efron_morris_vjp(_log(v, tiny), d_var * var, fin, 2.0 / (n - 1.0),
                                        cf, k)
            dv = d_tau2 / (cf * n) + _log_vjp(v, d_lv, tiny)
        dm = tl.where(keep, dm, d_mu_all)
        dv = tl.where(keep, dv, d_var_all)
        tl.store(COEF + c, w, mask=ok)
        tl.store(COEF + C + c, 2.0 * dv / n, mask=ok)
        tl.store(COEF + 2 * C + c, m, mask=ok)
        tl.store(COEF + 3 * C + c, dm / n, mask=ok)
