"""The lean path (robustbn.lean, the default for CPU tensors) against the reference path
(per-layer scalars on the device, the test oracle): the same outputs, gradients, running
statistics and non-finite counts; the calls it hands to the reference; its op counts."""
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, AtenOps, load_tool
from test_fast_path import VJP_CASES, _vjp_inputs
from torch._subclasses.fake_tensor import FakeTensorMode

import robustbn
from robustbn import lean
from robustbn.functional import batch_moments, shrunk_batch_norm

ESTIMATORS = sorted(robustbn.ESTIMATORS)
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=3e-5, atol=3e-6)}


def _input(shape, dtype=torch.float64, seed=0):
    """Channels with different means and scales (the estimators have something to do)."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    scale = (torch.rand(c, generator=g, dtype=dtype) * 3 + 0.1).view(view)
    shift = torch.randn(c, generator=g, dtype=dtype).view(view)
    return torch.randn(shape, generator=g, dtype=dtype) * scale + shift


def _run(x, est, on, affine=True, ref=False, seed=1):
    """[y, input/weight/bias gradients, running mean, running var, non-finite count] of one
    training call on the lean (on) or reference path."""
    c, dt = x.size(1), x.dtype
    g = torch.Generator().manual_seed(seed)
    x = x.clone().requires_grad_()
    w = (torch.rand(c, generator=g, dtype=dt) + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, generator=g, dtype=dt).requires_grad_() if affine else None
    rm = torch.randn(c, generator=g, dtype=dt)
    rv = torch.rand(c, generator=g, dtype=dt) + 0.5
    ref_stats = (torch.randn(c, generator=g, dtype=dt),
                 torch.rand(c, generator=g, dtype=dt) + 0.5) if ref else None
    grad = torch.randn(x.shape, generator=g, dtype=dt)
    counter = torch.zeros((), dtype=torch.long)
    with lean.lean_path(on):
        y = shrunk_batch_norm(x, w, b, rm, rv, robustbn.ESTIMATORS[est], 1e-5, 0.1,
                              ref_stats=ref_stats, nonfinite=counter)
        grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], grad)
    return [y, *grads, rm, rv, counter]


def _takes_lean(x, est) -> bool:
    n, m, v = batch_moments(x)
    return lean.forward(robustbn.ESTIMATORS[est], m, v, n) is not None


def _assert_same(x, est, scaled_atol=None, **kw):
    """Lean and reference path agree (``scaled_atol``: each result to that fraction of its
    largest entry, for float32 sums of many values rounded differently)."""
    got, want = _run(x, est, True, **kw), _run(x, est, False, **kw)
    for a, b in zip(got, want):
        tol = TOL.get(x.dtype, {}) if scaled_atol is None else \
            dict(rtol=3e-5, atol=scaled_atol * b.abs().max().item())
        torch.testing.assert_close(a, b, equal_nan=True, **tol)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('shape', [(8, 5), (4, 6, 3, 5), (3, 7, 2, 2, 2), (2, 144, 3, 4)])
@pytest.mark.parametrize('est', ESTIMATORS)
def test_matches_the_reference(est, shape, dtype):
    x = _input(shape, dtype)
    assert _takes_lean(x, est)
    _assert_same(x, est)


# float32 inputs whose moments are computed in vectorized passes (robustbn.functional):
# 2^16 values and more, planes of 256 and more; a 3D input; one with 5 samples of 3 channels
PASSES_SHAPES = [(2, 4, 64, 128), (3, 5, 7000), (5, 3, 64, 72)]


@pytest.mark.parametrize('chunk', [None, 1, 2], ids=['whole', 'samples', 'channel-blocks'])
@pytest.mark.parametrize('shift', [0.0, 1e3])
@pytest.mark.parametrize('shape', PASSES_SHAPES)
def test_moments_by_passes_match_the_kernel(shape, shift, chunk, monkeypatch):
    """Mean and variance as batch_norm_update_stats's (float64-accumulated) ones, also for
    a mean 1000 standard deviations wide of zero (centred, no cancellation) and in chunks:
    one sample each, or blocks of 2 channels of one sample (the last one shorter)."""
    from robustbn import functional as F
    plane = shape[2] * (shape[3:] or [1])[0]
    if chunk is not None:
        monkeypatch.setattr(F, '_PASSES_CHUNK', plane * (shape[1] if chunk == 1 else 2))
    x = _input(shape, torch.float32) + shift
    assert F._passes_apply(x)
    parts = F._chunks(x, shape[1])
    assert len(parts) == {None: 1, 1: shape[0], 2: shape[0] * ((shape[1] + 1) // 2)}[chunk]
    n, mean, var = F.local_moments(x)
    want_mean, want_var = torch.batch_norm_update_stats(x, None, None, 0.0)
    v64, m64 = torch.var_mean(x.double(), [0] + list(range(2, x.dim())), correction=0)
    assert n == x.numel() // shape[1]
    torch.testing.assert_close(mean, want_mean, rtol=1e-6, atol=1e-6 * shift)
    torch.testing.assert_close(var, want_var, rtol=2e-6, atol=0)
    torch.testing.assert_close(var.double(), v64, rtol=2e-6, atol=0)


def test_moments_by_passes_only_where_they_are_faster():
    from robustbn.functional import _passes_apply, moment_passes
    x = torch.randn(2, 4, 64, 128)
    assert _passes_apply(x)
    with moment_passes(False):  # the switch (benchmark_train --with-kernel-moments)
        assert not _passes_apply(x)
    assert _passes_apply(x)
    assert not _passes_apply(x.double())  # the kernel accumulates float64 anyway
    assert not _passes_apply(x.to(memory_format=torch.channels_last))  # vectorized kernel
    assert not _passes_apply(torch.randn(8, 64, 8, 16))  # planes below 256 values
    assert not _passes_apply(torch.randn(1, 1, 256, 257))  # planes above 2^16 values
    assert _passes_apply(torch.randn(1, 1, 256, 256))
    assert not _passes_apply(torch.randn(2, 4, 64, 64))  # below 2^16 values
    assert not _passes_apply(torch.randn(4096, 16))  # (N, C): no planes
    with lean.lean_path(False):  # the reference: the kernel
        assert not _passes_apply(x)


def test_benchmark_moments_cpu_smoke(capsys):
    rows = load_tool('benchmark_moments').main(
        ['--shapes', '2,4,64,128', '64,3', '--repeats', '1', '--min-seconds', '0.001'])
    assert [r['default'] for r in rows] == ['passes', 'kernel']
    assert all(r['kernel_ms'] > 0 and r['passes_ms'] > 0 for r in rows)
    assert all(r['kernel_err'] < 1e-5 and r['passes_err'] < 1e-5 for r in rows)
    assert '| 2,4,64,128 |' in capsys.readouterr().out


@pytest.mark.parametrize('tool,shapes,message', [
    ('benchmark_moments', ['2,x,8'], 'shapes are N,C,... (or hrnet/resnet/small)'),
    ('benchmark_moments', ['16'], 'shapes are N,C,... with C >= 1'),
    ('benchmark_norm', ['2,8,8'], 'shapes are N,C,H,W with C >= 1'),
    ('benchmark_norm', ['big'], 'shapes are N,C,H,W (or hrnet/resnet)'),
    ('benchmark_native', ['2,2,8,8'], 'shapes are N,C,H,W with C >= 3')])
def test_benchmark_shapes_are_checked(tool, shapes, message, capsys):
    with pytest.raises(SystemExit):
        load_tool(tool).parse_args(['--shapes', *shapes])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize('shape', PASSES_SHAPES[:2])
@pytest.mark.parametrize('est', ['none', 'paper', 'classic'])
def test_matches_the_reference_with_moments_by_passes(est, shape):
    """Both paths are float32 sums over 10^4 values, rounded differently: each result to
    1e-5 of its largest entry (both are that close to the float64 result)."""
    x = _input(shape, torch.float32)
    for ref in (False, True):
        _assert_same(x, est, scaled_atol=1e-5, ref=ref)


def test_none_is_batchnorm_with_moments_by_passes():
    x = _input((2, 4, 64, 128), torch.float32).requires_grad_()
    bn, layer = torch.nn.BatchNorm2d(4), robustbn.JSBN2d(4, estimator='none')
    grad = torch.randn(x.shape)
    got = [layer(x), *torch.autograd.grad(layer(x), (x, layer.weight), grad)]
    want = [bn(x), *torch.autograd.grad(bn(x), (x, bn.weight), grad)]
    for a, b in zip(got + [layer.running_mean, layer.running_var],
                    want + [bn.running_mean, bn.running_var]):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize('est', ESTIMATORS)
def test_matches_the_reference_without_affine_and_with_reference_statistics(est):
    x = _input((4, 6, 3, 5))
    _assert_same(x, est, affine=False)
    _assert_same(x, est, ref=True)  # GpreBN


@pytest.mark.parametrize('est', ESTIMATORS)
def test_bfloat16_input_matches_the_reference(est):
    # float32 statistics; the input gradient's two passes round to bfloat16 in between
    x = _input((4, 6, 3, 5), torch.float32).bfloat16()
    got, want = _run(x, est, True), _run(x, est, False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def _with(case, dtype=torch.float64):
    x = _input((4, 6, 3, 5), dtype)
    if case == 'nan_channel':
        x[:, 1] = float('nan')
    elif case == 'inf_value':
        x[0, 2, 0, 0] = float('inf')
    elif case == 'zero_variance':
        x[:, 3] = 0.25
    elif case == 'subnormal_variance':  # v ~ 1e-320: below float64's smallest normal number
        x[:, 3] = 0.25 + 1e-160 * torch.randn(4, 3, 5, dtype=dtype)
    elif case == 'overflowing_variance':  # float32 v ~ 1e38: N/(N-1) v would overflow
        x[:, 4] *= 1.2e19
    return x


# Which estimators take the lean path in each case (the others fall back).
FALLBACK_CASES = {
    'nan_channel': (), 'inf_value': (), 'overflowing_variance': (),
    'zero_variance': ('none', 'paper_mean', 'wacv'),  # no log of the variances
    'subnormal_variance': ('none', 'paper_mean', 'wacv'),
}


@pytest.mark.parametrize('case', sorted(FALLBACK_CASES))
@pytest.mark.parametrize('est', ESTIMATORS)
def test_hands_back_to_the_reference_where_only_it_answers(est, case):
    x = _with(case, torch.float32 if case == 'overflowing_variance' else torch.float64)
    assert _takes_lean(x, est) == (est in FALLBACK_CASES[case])
    _assert_same(x, est)


@pytest.mark.parametrize('case', VJP_CASES)
@pytest.mark.parametrize('c', [1, 2, 3, 4, 5, 16])
@pytest.mark.parametrize('est', ESTIMATORS)
def test_c_vector_math_equals_the_estimators_and_their_vjps(est, c, case):
    """The per-layer math alone, at the estimators' edge cases (zero or constant means and
    variances, a count of 2 where 'classic' clamps, fewer channels than the estimator needs)."""
    m, v, n, d_mu, d_var = _vjp_inputs(case, c)
    if case == 'count_two':
        n = 2.0
    spec = robustbn.ESTIMATORS[est]
    out = lean.forward(spec, m, v, n)
    if case == 'zero_variance' and est in ('paper', 'classic') and spec.shrinks(c):
        assert out is None  # the reference clamps log 0
        return
    assert out is not None
    mu, var, state = out
    want_mu, want_var = spec(m, v, n)
    torch.testing.assert_close(mu, want_mu, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(var, want_var, rtol=1e-12, atol=1e-14)
    # dL/dmean_used = -P, dL/dvar_used = -Q/2 -> k = 2 dL/dv / N, c = dL/dm / N
    k, cvec = lean.backward(state, m, v, n, -d_mu, -2 * d_var)
    dm, dv = spec.backward(m, v, n, d_mu, d_var)
    n = float(n)
    torch.testing.assert_close(k, 2 * dv / n, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cvec, dm / n, rtol=1e-10, atol=1e-12)


# The budget for the default path: 'paper' <= 12 forward and <= 20 backward,
# every built-in estimator within twice that.
OP_BUDGET = {'paper': (12, 20)}


@pytest.mark.parametrize('est', ESTIMATORS)
def test_op_counts_stay_within_budget(est):
    """ATen ops of one training call with running statistics (as a layer makes it)."""
    x = _input((2, 18, 4, 8), torch.float32).requires_grad_()
    w, b = torch.rand(18, requires_grad=True), torch.rand(18, requires_grad=True)
    rm, rv, counter = torch.zeros(18), torch.ones(18), torch.zeros((), dtype=torch.long)
    grad = torch.randn(x.shape)
    with AtenOps() as fwd:
        y = shrunk_batch_norm(x, w, b, rm, rv, robustbn.ESTIMATORS[est], 1e-5, 0.1,
                              nonfinite=counter)
    with AtenOps() as bwd:
        torch.autograd.grad(y, (x, w, b), grad)
    max_fwd, max_bwd = OP_BUDGET.get(est, (24, 40))
    assert fwd.count <= max_fwd and bwd.count <= max_bwd, (fwd.count, bwd.count)


def test_applies_to_plain_cpu_tensors_only():
    m = torch.zeros(3)
    assert lean.applies(m)
    assert not lean.applies(torch.zeros(3, device='meta'))
    with FakeTensorMode() as mode:
        assert not lean.applies(mode.from_tensor(m))
    with lean.lean_path(False):
        assert not lean.applies(m)
    assert lean.applies(m)


def test_fake_tensors_take_the_reference_path():
    """Shape propagation (FakeTensorMode, as torch.compile and FLOP counters use) cannot
    read scalars: the layer runs there on the reference path."""
    layer = robustbn.JSBN2d(4)
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = layer(torch.randn(2, 4, 3, 3))
    assert y.shape == (2, 4, 3, 3)


def test_environment_variable_turns_it_off():
    code = 'import robustbn.lean as l; print(l.get_lean())'
    for value, want in (('0', 'False'), ('off', 'False'), ('1', 'True')):
        env = dict(os.environ, ROBUSTBN_LEAN=value)
        out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True,
                             text=True, check=True, cwd=ROOT).stdout
        assert out.strip().splitlines()[-1] == want


def test_second_order_gradient_raises():
    x = _input((4, 5, 2, 2)).requires_grad_()
    y = robustbn.JSBN2d(5).double()(x)
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match='once_differentiable'):
        g.sum().backward()


@pytest.mark.parametrize('est', ESTIMATORS)
def test_sums_of_squares_the_reference_underflows_go_to_it(est):
    """Channel means of 1e-22 (float32): their squares are subnormal, so the reference's
    norms lose them (a zero norm switches its guards); the lean path hands such calls over
    and takes them again at ordinary scales."""
    g = torch.Generator().manual_seed(3)
    m = 1e-22 * torch.randn(8, generator=g)
    v = torch.rand(8, generator=g) + 0.5
    spec = robustbn.ESTIMATORS[est]
    assert (lean.forward(spec, m, v, 20.0) is None) == (est != 'none')
    assert lean.forward(spec, m * 1e20, v, 20.0) is not None
