"""Each estimator against an independent numpy float64 reference of its formula, plus guards."""
import numpy as np
import pytest
import torch

import robustbn
from robustbn.estimators import geometric_mean


def ref_paper(m, v, n):
    c = len(m)
    s2 = np.mean((m - m.mean()) ** 2)
    a = 1 - (c - 2) * c / (c + 1) * s2 / np.sum(m ** 2)
    r = n / (n + 1)
    mult = 4 * (c - 1) * r / ((n - 1) * c + 2)
    g = np.prod(v) ** (1.0 / c)  # fine in float64 for these test values
    return a * m, r * v + mult * g


def ref_paper_mean(m, v, n):
    return ref_paper(m, v, n)[0], v


def ref_wacv(m, v, n):
    def js(u):
        c = len(u)
        return (1 - (c - 2) * np.var(u) / np.sum(u ** 2)) * u
    return js(m), js(v)


def ref_classic(m, v, n):
    def em(u, noise):
        c = len(u)
        d = u - u.mean()
        return u.mean() + max(0.0, 1 - (c - 3) * noise / np.sum(d ** 2)) * d
    return em(m, v.mean() / n), np.exp(em(np.log(v), 2.0 / (n - 1)))


def ref_none(m, v, n):
    return m, v


REFS = {'paper': ref_paper, 'paper_mean': ref_paper_mean, 'wacv': ref_wacv,
        'classic': ref_classic, 'none': ref_none}


def test_every_estimator_has_a_reference():
    assert set(REFS) == set(robustbn.ESTIMATORS)


@pytest.mark.parametrize('name', sorted(REFS))
@pytest.mark.parametrize('c,n,mean_scale', [(8, 50, 1.0), (64, 8, 0.1), (5, 3, 3.0),
                                             (4, 1000, 0.01)])
def test_estimator_matches_reference(name, c, n, mean_scale):
    rng = np.random.default_rng(c * n)
    m = rng.normal(0.3, mean_scale, c)
    v = rng.gamma(2.0, 0.5, c)
    got_m, got_v = robustbn.get_estimator(name)(torch.tensor(m), torch.tensor(v), float(n))
    want_m, want_v = REFS[name](m, v, float(n))
    np.testing.assert_allclose(got_m.numpy(), want_m, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got_v.numpy(), want_v, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize('name', sorted(REFS))
def test_count_as_tensor_gives_same_result(name):
    m, v = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.1
    est = robustbn.get_estimator(name)
    a = est(m, v, 20.0)
    b = est(m, v, torch.tensor(20.0, dtype=torch.float64))
    torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


def test_classic_shrinks_strongly_with_small_n_and_barely_with_large_n():
    torch.manual_seed(0)
    m = 0.01 * torch.randn(16, dtype=torch.float64)
    v = torch.ones(16, dtype=torch.float64)
    small, _ = robustbn.get_estimator('classic')(m, v, 2.0)
    large, _ = robustbn.get_estimator('classic')(m, v, 1e8)
    torch.testing.assert_close(small, m.mean().expand(16))  # positive part: fully shrunk
    torch.testing.assert_close(large, m, rtol=1e-3, atol=0)


@pytest.mark.parametrize('name', sorted(REFS))
@pytest.mark.parametrize('c', [1, 2, 3])
def test_few_channels_fall_back_without_nan(name, c):
    m = torch.randn(c, dtype=torch.float64, requires_grad=True)
    v = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_()
    mu, var = robustbn.get_estimator(name)(m, v, 10.0)
    if c < 3 or (name == 'classic' and c < 4):
        assert torch.equal(mu, m) and torch.equal(var, v)
    (mu.sum() + var.sum()).backward()
    assert torch.isfinite(m.grad).all() and torch.isfinite(v.grad).all()


@pytest.mark.parametrize('name', sorted(REFS))
def test_all_zero_means_and_constant_channels_are_finite(name):
    m = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    v = torch.zeros(8, dtype=torch.float64)
    v[::2] = 1.0
    v.requires_grad_()
    mu, var = robustbn.get_estimator(name)(m, v, 16.0)
    assert torch.equal(mu.detach(), torch.zeros(8, dtype=torch.float64))
    (mu.sum() + var.sum()).backward()
    for t in (mu, var, m.grad, v.grad):
        assert torch.isfinite(t).all()


def test_geometric_mean_does_not_overflow_where_prod_does():
    # The released code's prod(v) ** (1/C): inf for C=512 and variances of 2 in float32.
    v = torch.full((512,), 2.0, dtype=torch.float32)
    assert torch.isinf(torch.prod(v))
    torch.testing.assert_close(geometric_mean(v), torch.tensor(2.0))
    tiny = torch.full((256,), 1e-4, dtype=torch.float32)
    torch.testing.assert_close(geometric_mean(tiny), torch.tensor(1e-4))


def test_paper_mean_factor_stays_positive():
    # a >= 3/(C+1): with means centred at 0 the layer nearly stops centring (documented).
    m = torch.tensor([1.0, -1.0] * 32, dtype=torch.float64)
    mu, _ = robustbn.get_estimator('paper')(m, torch.ones(64, dtype=torch.float64), 100.0)
    factor = (mu / m)[0].item()
    assert factor == pytest.approx(3 / 65, rel=1e-9)


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(ValueError, match='classic.*none.*paper.*paper_mean.*wacv'):
        robustbn.get_estimator('stein')
    with pytest.raises(ValueError, match='unknown estimator'):
        robustbn.JSBN2d(4, estimator='Paper')


def test_shrinkage_factors_are_the_estimators_factors():
    from robustbn.estimators import shrinkage_factors
    rng = np.random.default_rng(3)
    m, v, n = rng.normal(0.2, 1.0, 12), rng.gamma(2.0, 0.5, 12), 30.0
    tm, tv = torch.tensor(m), torch.tensor(v)

    def factors(name):
        return shrinkage_factors(tm, tv, *robustbn.get_estimator(name)(tm, tv, n)).numpy()
    c = len(m)
    a_paper = 1 - (c - 2) * c / (c + 1) * np.var(m) / np.sum(m ** 2)
    a_wacv = 1 - (c - 2) * np.var(m) / np.sum(m ** 2)
    b_wacv = 1 - (c - 2) * np.var(v) / np.sum(v ** 2)
    d = m - m.mean()
    b_classic = max(0.0, 1 - (c - 3) * v.mean() / n / np.sum(d ** 2))
    lv = np.log(v) - np.log(v).mean()
    bv_classic = max(0.0, 1 - (c - 3) * 2 / (n - 1) / np.sum(lv ** 2))
    np.testing.assert_allclose(factors('none'), [1, 1, 1], rtol=1e-12)
    np.testing.assert_allclose(factors('paper')[0], a_paper, rtol=1e-12)
    np.testing.assert_allclose(factors('paper_mean'), [a_paper, 1, 1], rtol=1e-12)
    np.testing.assert_allclose(factors('wacv'), [a_wacv, 1, b_wacv], rtol=1e-12)
    np.testing.assert_allclose(factors('classic')[:2], [b_classic, bv_classic], rtol=1e-12)
    assert factors('paper')[2] > 1  # the paper's variance estimator inflates
