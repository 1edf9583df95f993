"""Triton kernels over the full tensor: per-channel partial moments (forward), partial
gradient sums (backward) and the per-channel affine map (output and input gradient).

Two layouts, read in place: NCHW (contiguous (N, C, *spatial), HW = prod(spatial)) and CL
(channels last: R = N * HW rows of C contiguous values; (N, C) input too). Tiles are 2D:
NCHW (BLOCK_A images x BLOCK_B positions of one channel), CL (BLOCK_A rows x BLOCK_B
channels). Program (p, s) of a reduction kernel takes channel (block) p and tiles s, s + S,
s + 2S, ...; its result is row s of an (S, ...) partials buffer that one single-program
kernel merges. Statistics are accumulated in the partials' dtype (float32, or float64).

The tile loops are ``for`` loops when compiled (FOR_LOOP) and ``while`` loops in Triton's
interpreter (used to test these on CPU), which cannot take a runtime bound in ``range``;
both run the same step function. Sizes that only bound loops and masks are not
specialized on (one compiled variant for all batch sizes); C and HW are, since their
divisibility decides vectorized loads.
"""
import triton
import triton.language as tl

# Slots of the forward's statistics buffer (C values each; the count follows at 9C):
# batch mean and biased variance; the estimator's mean and variance; 1/sqrt(var_out + eps)
# of the statistics normalized with; the output's affine map y = A (x - MO) + B (A =
# weight * INV, MO the mean normalized with, B the bias or 0); the estimator's variance
# times N/(N-1), what running_var averages.
SLOT = dict(m=0, v=1, mu=2, var=3, inv=4, a=5, mo=6, b=7, var_unbiased=8)
NUM_SLOTS = len(SLOT)
SLOT_M = tl.constexpr(SLOT['m'])
SLOT_V = tl.constexpr(SLOT['v'])
SLOT_MU = tl.constexpr(SLOT['mu'])
SLOT_VAR = tl.constexpr(SLOT['var'])
SLOT_INV = tl.constexpr(SLOT['inv'])
SLOT_A = tl.constexpr(SLOT['a'])
SLOT_MO = tl.constexpr(SLOT['mo'])
SLOT_B = tl.constexpr(SLOT['b'])
SLOT_VAR_UNBIASED = tl.constexpr(SLOT['var_unbiased'])
SLOT_COUNT = tl.constexpr(NUM_SLOTS)


@triton.jit
def welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.'s exact merge of (mean, M2, count) pairs; empty parts are neutral."""
    n = n_a + n_b
    w = tl.where(n > 0, n_b / tl.where(n > 0, n, 1.0), 0.0)
    d = mean_b - mean_a
    return mean_a + d * w, m2_a + m2_b + d * d * n_a * w, n


@triton.jit
def chan_merge(mean, m2, cnt, AXIS: tl.constexpr):
    """(mean, M2, count) of parts (mean, M2, count) along AXIS: the merged mean, then the
    parts' M2 plus their count-weighted squared deviations from it (exact, Chan et al.)."""
    n = tl.sum(cnt, AXIS)
    mu = tl.sum(cnt * mean, AXIS) / tl.maximum(n, 1.0)
    d = mean - tl.expand_dims(mu, AXIS)
    return mu, tl.sum(m2 + cnt * d * d, AXIS), n


@triton.jit
def _index(i, INT64: tl.constexpr):
    # int32 offsets (fewer registers) unless the tensor has 2^31 elements or more
    if INT64:
        return i.to(tl.int64)
    else:
        return i


@triton.jit
def _tile(t, pid_c, N, C, HW, R, n_hw_tiles, CL: tl.constexpr, INT64: tl.constexpr,
          BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """Element offsets and mask of tile t of channel (block) pid_c."""
    a = tl.arange(0, BLOCK_A)[:, None]
    b = tl.arange(0, BLOCK_B)[None, :]
    if CL:
        rows = t * BLOCK_A + a
        cols = pid_c * BLOCK_B + b
        mask = (rows < R) & (cols < C)
        offs = _index(rows, INT64) * C + cols
    else:
        n = (t // n_hw_tiles) * BLOCK_A + a
        hw = (t % n_hw_tiles) * BLOCK_B + b
        mask = (n < N) & (hw < HW)
        offs = (_index(n, INT64) * C + pid_c) * HW + hw
    return offs, mask


@triton.jit
def _moments_step(X, t, pid_c, N, C, HW, R, n_hw_tiles, mean, m2, cnt, CL: tl.constexpr,
                  INT64: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """Welford update of the per-lane (mean, M2, count) with tile t."""
    offs, mask = _tile(t, pid_c, N, C, HW, R, n_hw_tiles, CL, INT64, BLOCK_A, BLOCK_B)
    x = tl.load(X + offs, mask=mask, other=0.0).to(mean.dtype)
    cnt += mask.to(mean.dtype)
    d = x - mean
    mean += tl.where(mask, d / tl.maximum(cnt, 1.0), 0.0)
    m2 += tl.where(mask, d * (x - mean), 0.0)
    return mean, m2, cnt


@triton.jit(do_not_specialize=['N', 'R', 'num_tiles', 'n_hw_tiles', 'S'])
def moments_kernel(X, P, N, C, HW, R, num_tiles, n_hw_tiles, S, CL: tl.constexpr,
                   INT64: tl.constexpr, FOR_LOOP: tl.constexpr, BLOCK_A: tl.constexpr,
                   BLOCK_B: tl.constexpr):
    """Row s of P (S, 1 + 2C) = [count, mean (C), M2 (C)] over program s's tiles.

    Welford per lane (no E[x^2] - E[x]^2 cancellation), lanes merged with Chan's formula.
    """
    pid_c = tl.program_id(0)
    s = tl.program_id(1)
    dt = P.dtype.element_ty
    mean = tl.zeros([BLOCK_A, BLOCK_B], dt)
    m2 = tl.zeros([BLOCK_A, BLOCK_B], dt)
    cnt = tl.zeros([BLOCK_A, BLOCK_B], dt)
    if FOR_LOOP:
        for t in range(s, num_tiles, S):
            mean, m2, cnt = _moments_step(X, t, pid_c, N, C, HW, R, n_hw_tiles, mean, m2, cnt,
                                          CL, INT64, BLOCK_A, BLOCK_B)
    else:
        t = s
        while t < num_tiles:
            mean, m2, cnt = _moments_step(X, t, pid_c, N, C, HW, R, n_hw_tiles, mean, m2, cnt,
                                          CL, INT64, BLOCK_A, BLOCK_B)
            t += S
    row = P + s * (1 + 2 * C)
    if CL:
        mean, m2, cnt = chan_merge(mean, m2, cnt, 0)
        cols = pid_c * BLOCK_B + tl.arange(0, BLOCK_B)
        ok = cols < C
        tl.store(row + 1 + cols, mean, mask=ok)
        tl.store(row + 1 + C + cols, m2, mask=ok)
        tl.store(row + cols * 0, cnt, mask=cols == 0)  # every channel has the same count
    else:
        mean, m2, cnt = chan_merge(mean, m2, cnt, 1)
        mean, m2, cnt = chan_merge(mean, m2, cnt, 0)
        tl.store(row + 1 + pid_c, mean)
        tl.store(row + 1 + C + pid_c, m2)
        if pid_c == 0:
            tl.store(row, cnt)


@triton.jit
def _sums_step(G, X, t, pid_c, N, C, HW, R, n_hw_tiles, mu, acc_g, acc_gx, CL: tl.constexpr,
               INT64: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    offs, mask = _tile(t, pid_c, N, C, HW, R, n_hw_tiles, CL, INT64, BLOCK_A, BLOCK_B)
    g = tl.load(G + offs, mask=mask, other=0.0).to(acc_g.dtype)
    x = tl.load(X + offs, mask=mask, other=0.0).to(acc_g.dtype)
    return acc_g + g, acc_gx + g * (x - mu)  # g = 0 where masked


@triton.jit(do_not_specialize=['N', 'R', 'num_tiles', 'n_hw_tiles', 'S'])
def grad_sums_kernel(G, X, STATS, P, P_COPY, N, C, HW, R, num_tiles, n_hw_tiles, S,
                     CL: tl.constexpr, INT64: tl.constexpr, COPY: tl.constexpr,
                     FOR_LOOP: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """Row s of P (S, 2C) = [sum g, sum g (x - MO) INV] over program s's tiles (MO, INV from
    the forward's STATS); the same row in P_COPY when COPY (one copy gets all-reduced)."""
    pid_c = tl.program_id(0)
    s = tl.program_id(1)
    dt = P.dtype.element_ty
    if CL:
        cols = pid_c * BLOCK_B + tl.arange(0, BLOCK_B)
        ok = cols < C
        mu = tl.load(STATS + SLOT_MO * C + cols, mask=ok, other=0.0)[None, :]
    else:
        mu = tl.load(STATS + SLOT_MO * C + pid_c)
    acc_g = tl.zeros([BLOCK_A, BLOCK_B], dt)
    acc_gx = tl.zeros([BLOCK_A, BLOCK_B], dt)
    if FOR_LOOP:
        for t in range(s, num_tiles, S):
            acc_g, acc_gx = _sums_step(G, X, t, pid_c, N, C, HW, R, n_hw_tiles, mu, acc_g,
                                       acc_gx, CL, INT64, BLOCK_A, BLOCK_B)
    else:
        t = s
        while t < num_tiles:
            acc_g, acc_gx = _sums_step(G, X, t, pid_c, N, C, HW, R, n_hw_tiles, mu, acc_g,
                                       acc_gx, CL, INT64, BLOCK_A, BLOCK_B)
            t += S
    row = s * (2 * C)
    if CL:
        inv = tl.load(STATS + SLOT_INV * C + cols, mask=ok, other=0.0)
        sg = tl.sum(acc_g, 0)
        sgx = tl.sum(acc_gx, 0) * inv
        tl.store(P + row + cols, sg, mask=ok)
        tl.store(P + row + C + cols, sgx, mask=ok)
        if COPY:
            tl.store(P_COPY + row + cols, sg, mask=ok)
            tl.store(P_COPY + row + C + cols, sgx, mask=ok)
    else:
        inv = tl.load(STATS + SLOT_INV * C + pid_c)
        sg = tl.sum(tl.sum(acc_g, 1), 0)
        sgx = tl.sum(tl.sum(acc_gx, 1), 0) * inv
        tl.store(P + row + pid_c, sg)
        tl.store(P + row + C + pid_c, sgx)
        if COPY:
            tl.store(P_COPY + row + pid_c, sg)
            tl.store(P_COPY + row + C + pid_c, sgx)


@triton.jit(do_not_specialize=['NC', 'R'])
def channel_affine_kernel(X, G, Y, COEF, NC, C, HW, R, HAS_G: tl.constexpr, CL: tl.constexpr,
                          INT64: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """Y = A[c] (X - M[c]) + B[c] (+ G W[c] with HAS_G), COEF = [W | A | M | B] (C each),
    computed in COEF's dtype and stored in Y's. NCHW tiles: BLOCK_A (image, channel) planes
    x BLOCK_B positions (NC = N * C planes); CL tiles: BLOCK_A rows x BLOCK_B channels."""
    dt = COEF.dtype.element_ty
    a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)[:, None]
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)[None, :]
    if CL:
        c = b
        cok = b < C
        mask = (a < R) & cok
        offs = _index(a, INT64) * C + b
    else:
        c = a % C
        cok = c >= 0
        mask = (a < NC) & (b < HW)
        offs = _index(a, INT64) * HW + b
    ca = tl.load(COEF + C + c, mask=cok, other=0.0)
    cm = tl.load(COEF + 2 * C + c, mask=cok, other=0.0)
    cb = tl.load(COEF + 3 * C + c, mask=cok, other=0.0)
    x = tl.load(X + offs, mask=mask, other=0.0).to(dt)
    y = ca * (x - cm) + cb
    if HAS_G:
        cw = tl.load(COEF + c, mask=cok, other=0.0)
        y += tl.load(G + offs, mask=mask, other=0.0).to(dt) * cw
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
