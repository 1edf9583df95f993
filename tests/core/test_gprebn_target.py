"""GpreBN's test-time statistics: target_init ('first_batch' / 'source'), target_average
('var' / 'std'), reset, checkpoints, and SyncGpreBN's first batch across processes."""
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import free_port, gloo_group
from torch import nn

import robustbn
from robustbn import GpreBN2d, SyncGpreBN

C = 5


def _layer(cls=GpreBN2d, seed=0, **kw):
    """A float64 layer with non-trivial source statistics and affine parameters (its
    test-time average not started)."""
    torch.manual_seed(seed)
    layer = cls(C, **kw).double()
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
        layer.reset_target()
    return layer


def _x(n=4, seed=1, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    spread = torch.linspace(-1, 2, C, dtype=torch.float64).view(1, C, 1, 1)
    return torch.randn((n, C, 3, 3), generator=g, dtype=torch.float64) * 1.5 + spread + shift


def _moments(x):
    return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False), x.numel() // C


def _bn(layer, x, mean=None, var=None):
    """Batch norm with the layer's affine parameters: with the batch's own statistics
    (training mode) when mean/var are None, else with the given ones."""
    return F.batch_norm(x, mean, var, layer.weight, layer.bias, mean is None, 0.0, layer.eps)


def test_first_batch_is_batch_norm_then_the_average_continues():
    layer = _layer(target_momentum=0.2)
    source = layer.running_mean.clone(), layer.running_var.clone()
    assert layer.target_init == 'first_batch' and not layer.target_initialized
    x1 = _x(seed=1, shift=3.0).requires_grad_()
    ref = x1.detach().clone().requires_grad_()
    y1 = layer(x1)
    # value and gradient: batch norm with this batch's own statistics
    torch.testing.assert_close(y1, _bn(layer, ref))
    g = torch.randn(x1.shape, dtype=torch.float64)
    y1.backward(g)
    _bn(layer, ref).backward(g)
    torch.testing.assert_close(x1.grad, ref.grad)
    m1, v1, n = _moments(x1.detach())
    torch.testing.assert_close(layer.target_mean, m1)  # the average is this batch (biased var)
    torch.testing.assert_close(layer.target_var, v1)
    assert layer.target_initialized
    torch.testing.assert_close(layer.running_mean, source[0])  # source statistics kept
    torch.testing.assert_close(layer.running_var, source[1])

    # second batch: normalized with the average as the first batch set it, then one EMA step
    x2 = _x(seed=2, shift=2.0)
    torch.testing.assert_close(layer(x2), _bn(layer, x2, m1, v1))
    m2, v2, _ = _moments(x2)
    avg = 0.8 * m1 + 0.2 * m2, 0.8 * v1 + 0.2 * v2 * n / (n - 1)
    torch.testing.assert_close(layer.target_mean, avg[0])
    torch.testing.assert_close(layer.target_var, avg[1])
    x3 = _x(seed=3)
    torch.testing.assert_close(layer(x3), _bn(layer, x3, *avg))
    # eval mode: the average as it is now
    mean, var = layer.target_mean.clone(), layer.target_var.clone()
    torch.testing.assert_close(layer.eval()(x3), _bn(layer, x3, mean, var))


def test_reset_restores_the_uninitialized_state():
    layer = _layer()
    for seed in (1, 2):
        layer(_x(seed=seed, shift=1.0))
    layer.reset_target()
    assert not layer.target_initialized
    torch.testing.assert_close(layer.target_mean, layer.running_mean)
    torch.testing.assert_close(layer.target_var, layer.running_var)
    x = _x(seed=5, shift=-2.0)
    torch.testing.assert_close(layer.eval()(x), _bn(layer, x, layer.running_mean,
                                                    layer.running_var))
    torch.testing.assert_close(layer.train()(x), _bn(layer, x))  # a first batch again


def test_theta_mixes_the_first_batch_with_the_source():
    layer = _layer(theta=0.3)
    x = _x(shift=2.0)
    m, v, _ = _moments(x)
    mean = 0.3 * m + 0.7 * layer.running_mean
    var = 0.3 * v + 0.7 * layer.running_var
    torch.testing.assert_close(layer(x), _bn(layer, x, mean, var))


def test_first_batch_with_shrunk_statistics():
    layer = _layer(batch_estimator='classic')
    x = _x(n=2)
    m, v, n = _moments(x)
    mu, var = robustbn.get_estimator('classic')(m, v, float(n))
    assert (mu - m).abs().max() > 1e-6  # the estimator shrinks here
    torch.testing.assert_close(layer(x), _bn(layer, x, mu, var))
    torch.testing.assert_close(layer.target_mean, mu)
    torch.testing.assert_close(layer.target_var, var)


def test_source_init_is_the_source_model_until_the_average_moves():
    layer = _layer(target_init='source', target_momentum=0.1)
    src = layer.running_mean.clone(), layer.running_var.clone()
    x = _x(shift=2.0)
    torch.testing.assert_close(layer(x), _bn(layer, x, *src))
    m, v, n = _moments(x)
    torch.testing.assert_close(layer.target_mean, 0.9 * src[0] + 0.1 * m)
    torch.testing.assert_close(layer.target_var, 0.9 * src[1] + 0.1 * v * n / (n - 1))
    assert layer.target_initialized


def test_std_average():
    layer = _layer(target_average='std', target_momentum=0.25)
    x1, x2 = _x(seed=1), _x(seed=2, shift=1.0)
    layer(x1)
    m1, v1, n = _moments(x1)
    torch.testing.assert_close(layer.target_var, v1)  # the first batch as with 'var'
    torch.testing.assert_close(layer(x2), _bn(layer, x2, m1, v1))
    m2, v2, _ = _moments(x2)
    eps = layer.eps
    sigma = 0.75 * (v1 + eps).sqrt() + 0.25 * (v2 * n / (n - 1) + eps).sqrt()
    torch.testing.assert_close(layer.target_mean, 0.75 * m1 + 0.25 * m2)
    torch.testing.assert_close(layer.target_var, sigma.square() - eps)
    # 'source' start: the standard deviation average from the source variance
    src = _layer(target_init='source', target_average='std', target_momentum=0.25)
    s0 = (src.running_var + eps).sqrt()
    src(x2)
    torch.testing.assert_close(src.target_var, (0.75 * s0 + 0.25 * (v2 * n / (n - 1) + eps)
                                                .sqrt()).square() - eps)


def test_checkpoints_resume_and_older_ones_load():
    layer = _layer()
    layer(_x(seed=1))
    layer(_x(seed=2))
    resumed = _layer(seed=3)
    resumed.load_state_dict(layer.state_dict())
    assert resumed.target_initialized
    x = _x(seed=4, shift=1.0)
    torch.testing.assert_close(resumed(x), layer(x))  # continues, no new first batch
    torch.testing.assert_close(resumed.target_mean, layer.target_mean)
    # a checkpoint saved before the flag existed: started iff the average moved
    old = {k: v for k, v in layer.state_dict().items() if k != 'target_initialized'}
    fresh = _layer(seed=5)
    fresh.load_state_dict(old)
    assert fresh.target_initialized
    unmoved = _layer(seed=6)
    state = {k: v for k, v in unmoved.state_dict().items() if k != 'target_initialized'}
    unmoved.load_state_dict(state)
    assert not unmoved.target_initialized
    # a BN checkpoint: not started
    bn = nn.BatchNorm2d(C).double()
    gp = GpreBN2d(C).double()
    gp.load_state_dict(bn.state_dict())
    assert not gp.target_initialized


def test_non_finite_channel_keeps_the_source_statistics():
    layer = _layer()
    x = _x()
    x[0, 2, 0, 0] = float('nan')
    layer(x)
    assert layer.nonfinite_batches.item() == 1
    assert layer.target_mean[2] == layer.running_mean[2]
    assert torch.isfinite(layer.target_mean).all() and torch.isfinite(layer.target_var).all()


def test_bad_options():
    with pytest.raises(ValueError, match="target_init must be one of"):
        GpreBN2d(3, target_init='first')
    with pytest.raises(ValueError, match="target_average must be one of"):
        GpreBN2d(3, target_average='sd')
    assert "target_init='first_batch'" in repr(GpreBN2d(3))


# ------------------------------------------------------------ SyncGpreBN across processes
SIZES = [3, 5]
KINDS = [dict(), dict(target_average='std', batch_estimator='classic', theta=0.7)]


def _data():
    x = [_x(n=sum(SIZES), seed=10 + s, shift=s) for s in range(3)]
    g = [torch.randn(t.shape, generator=torch.Generator().manual_seed(20 + i),
                     dtype=torch.float64) for i, t in enumerate(x)]
    return x, g


def _steps(layer, x, g, sl=slice(None)):
    out = []
    for xt, gt in zip(x, g):
        xi = xt[sl].clone().requires_grad_()
        y = layer(xi)
        (y * gt[sl]).sum().backward()
        out.append(dict(y=y.detach(), gx=xi.grad, gw=layer.weight.grad.clone(),
                        tm=layer.target_mean.clone(), tv=layer.target_var.clone()))
        layer.weight.grad = layer.bias.grad = None
    return out


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    with gloo_group(rank, world, port):
        x, g = _data()
        start = sum(SIZES[:rank])
        sl = slice(start, start + SIZES[rank])
        out = [_steps(_layer(SyncGpreBN, target_momentum=0.3, **kw), x, g, sl) for kw in KINDS]
        torch.save(out, os.path.join(out_dir, f'{rank}.pt'))


def test_sync_first_batch_equals_gprebn_on_the_concatenated_batch(tmp_path):
    world = len(SIZES)
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world)
    outs = [torch.load(tmp_path / f'{r}.pt') for r in range(world)]
    x, g = _data()
    tol = dict(rtol=1e-6, atol=1e-6)
    for k, kw in enumerate(KINDS):
        ref = _steps(_layer(GpreBN2d, target_momentum=0.3, **kw), x, g)
        if not kw:  # the first (global) batch is batch norm with its own statistics
            torch.testing.assert_close(ref[0]['y'], _bn(_layer(), x[0]))
        for step, r in enumerate(ref):
            ranks = [o[k][step] for o in outs]
            torch.testing.assert_close(torch.cat([o['y'] for o in ranks]), r['y'], **tol)
            torch.testing.assert_close(torch.cat([o['gx'] for o in ranks]), r['gx'], **tol)
            torch.testing.assert_close(sum(o['gw'] for o in ranks), r['gw'], **tol)
            for o in ranks:
                torch.testing.assert_close(o['tm'], r['tm'], **tol)
                torch.testing.assert_close(o['tv'], r['tv'], **tol)
