"""GpreBN / SyncGpreBN: value, gradients, test-time statistics, sync equivalence."""
import copy
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import free_port, gloo_group
from torch import nn

import robustbn
from robustbn import GpreBN1d, GpreBN2d, GpreBN3d, SyncGpreBN

ESTIMATORS = ['sample', 'paper', 'classic']


def _layer(cls=GpreBN2d, c=5, seed=0, **kw):
    torch.manual_seed(seed)
    layer = cls(c, **kw).double()
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        layer.reset_target()
        layer.target_mean.add_(torch.linspace(-0.2, 0.3, c, dtype=torch.float64))
        layer.target_var.mul_(torch.linspace(0.8, 1.3, c, dtype=torch.float64))
        layer.target_initialized.fill_(True)  # an average in progress: the EMA continues
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    return layer


def _x(shape=(4, 5, 3, 3), seed=1):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    spread = torch.linspace(-1, 2, c, dtype=torch.float64).view([1, c] + [1] * (len(shape) - 2))
    return torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + spread


@pytest.mark.parametrize('estimator', ESTIMATORS)
def test_gradcheck(estimator, scalar_path):
    """float64 check of the Function's gradients. Weight and bias: plain gradcheck (the
    value is exact in them). Input: the stop-gradients make the gradient differ from the
    value's on purpose, so compare the Jacobian our backward gives with central finite
    differences of the surrogate w ((x - mu_c(x)) / sigma_c(x) * sigma_c(x0) + mu_c(x0) - mu)
    / sigma + b, whose sg terms are frozen at the point x0 of evaluation."""
    layer = _layer(c=4, theta=0.6, batch_estimator=estimator)
    mu, var = layer.dataset_stats()
    est = robustbn.get_estimator('none' if estimator == 'sample' else estimator)
    x0 = _x((3, 4, 2, 2))
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    eps = 1e-5

    def f(x, w, b):
        return robustbn.shrunk_batch_norm(x, w, b, None, None, est, eps, ref_stats=(mu, var))
    assert torch.autograd.gradcheck(lambda w, b: f(x0, w, b), (w, b))

    def batch_stats(x):
        m, v = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        mc, vc = est(m, v, float(x.numel() // x.size(1)))
        return mc.view(1, -1, 1, 1), (vc + eps).sqrt().view(1, -1, 1, 1)
    mc0, sc0 = batch_stats(x0)
    c = lambda t: t.detach().view(1, -1, 1, 1)  # noqa: E731

    def surrogate(x):
        mc, sc = batch_stats(x)
        return c(w) * ((x - mc) / sc * sc0 + mc0 - c(mu)) / (c(var) + eps).sqrt() + c(b)
    torch.testing.assert_close(surrogate(x0), f(x0, w, b).detach())
    analytic = torch.autograd.functional.jacobian(lambda x: f(x, w.detach(), b.detach()), x0)
    numeric = torch.zeros_like(analytic)
    h = 1e-6
    for i in range(x0.numel()):
        d = torch.zeros_like(x0).view(-1)
        d[i] = h
        d = d.view_as(x0)
        numeric.view(x0.numel(), x0.numel())[:, i] = \
            ((surrogate(x0 + d) - surrogate(x0 - d)) / (2 * h)).view(-1)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('theta', [0.0, 0.4, 1.0])
def test_value_is_bn_with_mixed_stats_and_gradient_is_scaled_batch_bn(theta):
    layer = _layer(theta=theta, target_momentum=0.2)
    mu, var = layer.dataset_stats()
    torch.testing.assert_close(mu, theta * layer.target_mean + (1 - theta) * layer.running_mean)
    x = _x().requires_grad_()
    g = torch.randn(x.shape, dtype=torch.float64)
    y = layer(x)
    y.backward(g)
    w, b = layer.weight.detach(), layer.bias.detach()
    torch.testing.assert_close(y, F.batch_norm(x.detach(), mu, var, w, b, False, 0.0, layer.eps))
    # input gradient: batch-statistics BN gradient times sigma_batch / sigma
    xb = x.detach().clone().requires_grad_()
    F.batch_norm(xb, None, None, w, b, True, 0.0, layer.eps).backward(g)
    sigma_c = (xb.detach().var((0, 2, 3), unbiased=False) + layer.eps).sqrt()
    sigma = (var + layer.eps).sqrt()
    torch.testing.assert_close(x.grad, xb.grad * (sigma_c / sigma).view(1, -1, 1, 1))
    # weight/bias: the gradients of the value
    xhat = (x.detach() - mu.view(1, -1, 1, 1)) / sigma.view(1, -1, 1, 1)
    torch.testing.assert_close(layer.weight.grad, (g * xhat).sum((0, 2, 3)))
    torch.testing.assert_close(layer.bias.grad, g.sum((0, 2, 3)))


def test_target_ema_updates_after_normalizing_and_source_stays():
    layer = _layer(theta=1.0, target_momentum=0.25)
    before = copy.deepcopy(layer.state_dict())
    x = _x()
    y = layer(x)
    # normalized with the target EMA from before this batch
    torch.testing.assert_close(y, F.batch_norm(x, before['target_mean'], before['target_var'],
                                               layer.weight, layer.bias, False, 0.0, layer.eps))
    n = x.numel() // 5
    m, v = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(layer.target_mean, 0.75 * before['target_mean'] + 0.25 * m)
    torch.testing.assert_close(layer.target_var,
                               0.75 * before['target_var'] + 0.25 * v * n / (n - 1))
    for k in ('running_mean', 'running_var', 'num_batches_tracked', 'weight', 'bias'):
        assert torch.equal(layer.state_dict()[k], before[k]), k
    # eval: plain BN with the mixed statistics, nothing updated
    layer.eval()
    state = copy.deepcopy(layer.state_dict())
    mu, var = layer.dataset_stats()
    torch.testing.assert_close(layer(x), F.batch_norm(x, mu, var, layer.weight, layer.bias,
                                                      False, 0.0, layer.eps))
    for k, val in state.items():
        assert torch.equal(layer.state_dict()[k], val), k


def test_update_source_stats_is_batch_renormalization():
    layer = _layer(theta=0.0, update_source_stats=True, momentum=0.1)
    src = layer.running_mean.clone(), layer.running_var.clone()
    x = _x()
    y = layer(x)
    torch.testing.assert_close(y, F.batch_norm(x, src[0], src[1], layer.weight, layer.bias,
                                               False, 0.0, layer.eps))
    n = x.numel() // 5
    torch.testing.assert_close(layer.running_mean, 0.9 * src[0] + 0.1 * x.mean((0, 2, 3)))
    torch.testing.assert_close(layer.running_var, 0.9 * src[1] + 0.1 * x.var((0, 2, 3)) * 1.0)
    assert layer.num_batches_tracked.item() == 1
    assert n > 1


def test_js_batch_estimator_changes_gradient_and_ema_not_value():
    plain, shrunk = _layer(theta=0.5), _layer(theta=0.5, batch_estimator='paper')
    x = _x()
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [plain(xs[0]), shrunk(xs[1])]
    torch.testing.assert_close(ys[0], ys[1])
    g = torch.randn(x.shape, dtype=torch.float64)
    for y in ys:
        y.backward(g)
    assert (xs[0].grad - xs[1].grad).abs().max() > 1e-6
    assert (plain.target_mean - shrunk.target_mean).abs().max() > 1e-6


def test_bn_checkpoints_load_and_conversion_keeps_source():
    bn = nn.BatchNorm2d(5)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    layer = GpreBN2d(5)
    layer.load_state_dict(bn.state_dict(), strict=True)
    torch.testing.assert_close(layer.target_mean, bn.running_mean)
    torch.testing.assert_close(layer.target_var, bn.running_var)
    assert set(layer.state_dict()) == set(bn.state_dict()) | {'target_mean', 'target_var',
                                                              'target_initialized'}
    assert not layer.target_initialized
    layer2 = GpreBN2d(5)
    layer2.load_state_dict(layer.state_dict(), strict=True)
    model = robustbn.convert_norm(nn.Sequential(nn.Conv2d(3, 5, 1), bn).eval(), 'GpreBN',
                                  theta=0.5)
    assert type(model[1]) is GpreBN2d and model[1].theta == 0.5
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(model(x), F.batch_norm(model[0](x), bn.running_mean,
                                                      bn.running_var, bn.weight, bn.bias, False,
                                                      0.0, bn.eps))
    assert type(robustbn.revert_norm(model)[1]) is nn.BatchNorm2d
    # mmengine's MODELS registry: tests/openmmlab/test_registry.py


def test_bad_input_and_config():
    with pytest.raises(ValueError, match='track_running_stats'):
        GpreBN2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match='theta'):
        GpreBN2d(3, theta=1.5)
    with pytest.raises(ValueError, match='unknown estimator'):
        GpreBN2d(3, batch_estimator='mean')
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        GpreBN2d(3)(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match='expected 5D'):
        GpreBN3d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match='expected 3 channels'):
        GpreBN1d(3)(torch.randn(2, 4))
    assert GpreBN2d(3).eval()(torch.randn(1, 3, 1, 1)).shape == (1, 3, 1, 1)


def test_autocast_stays_finite():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), GpreBN2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                          SyncGpreBN(4, batch_estimator='paper'))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = model(torch.randn(2, 3, 10, 10) * 30)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    y.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------ SyncGpreBN across processes

SIZES = {2: [3, 5], 3: [2, 0, 4]}


def _worker(rank, world, port, out_dir, estimator):
    torch.set_num_threads(1)
    with gloo_group(rank, world, port):
        sizes = SIZES[world]
        x = _x((sum(sizes), 5, 3, 3))
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        start = sum(sizes[:rank])
        sl = slice(start, start + sizes[rank])
        layer = _layer(SyncGpreBN, theta=0.6, target_momentum=0.3, batch_estimator=estimator)
        out = {}
        for step in range(2):
            xi = x[sl].clone().requires_grad_()
            y = layer(xi)
            (y * g[sl]).sum().backward()
            out[step] = dict(y=y.detach(), gx=xi.grad, gw=layer.weight.grad.clone(),
                             gb=layer.bias.grad.clone(), tm=layer.target_mean.clone(),
                             tv=layer.target_var.clone())
            layer.weight.grad = layer.bias.grad = None
        torch.save(out, os.path.join(out_dir, f'{rank}.pt'))


@pytest.mark.parametrize('world', [2, 3])
@pytest.mark.parametrize('estimator', ['sample', 'paper'])
def test_sync_gprebn_equals_gprebn_on_concatenated_batch(tmp_path, world, estimator):
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path), estimator), nprocs=world)
    sizes = SIZES[world]
    x = _x((sum(sizes), 5, 3, 3))
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref = _layer(GpreBN2d, theta=0.6, target_momentum=0.3, batch_estimator=estimator)
    outs = [torch.load(tmp_path / f'{r}.pt') for r in range(world)]
    tol = dict(rtol=1e-6, atol=1e-6)
    for step in range(2):
        xr = x.clone().requires_grad_()
        y = ref(xr)
        (y * g).sum().backward()
        torch.testing.assert_close(torch.cat([o[step]['y'] for o in outs]), y.detach(), **tol)
        torch.testing.assert_close(torch.cat([o[step]['gx'] for o in outs]), xr.grad, **tol)
        torch.testing.assert_close(sum(o[step]['gw'] for o in outs), ref.weight.grad, **tol)
        torch.testing.assert_close(sum(o[step]['gb'] for o in outs), ref.bias.grad, **tol)
        for o in outs:
            torch.testing.assert_close(o[step]['tm'], ref.target_mean, **tol)
            torch.testing.assert_close(o[step]['tv'], ref.target_var, **tol)
        ref.weight.grad = ref.bias.grad = None
