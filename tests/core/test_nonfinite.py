"""Empty batches and non-finite statistics (reference path; the last test runs the same
checks on the fast path in Triton's interpreter).

- An empty training batch behaves as in BatchNorm: empty output, zero parameter
  gradients, running statistics untouched, the batch counted.
- A channel whose batch statistics are not finite stays alone: the other channels'
  outputs, gradients and running statistics equal those of the same layer without that
  channel, its running statistics keep their old values, and the layer counts the batch.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port, gloo_group
from torch import nn

import robustbn

ESTIMATORS = sorted(robustbn.ESTIMATORS)
FAST = robustbn.fast.get_fast_path() == 'on'
# The kernels' EMA factor is rounded to float32 by Triton's interpreter (see
# fast_path_cases.py); outputs and gradients are float64 either way.
BUF = dict(rtol=1e-7, atol=1e-7) if FAST else dict(rtol=1e-10, atol=1e-12)
OUT = dict(rtol=1e-9, atol=1e-10)


def _layer(cls, c, **kw):
    layer = cls(c, **kw).double()
    gen = torch.Generator().manual_seed(c)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.rand(c, generator=gen, dtype=torch.float64) - 0.5)
        layer.running_mean.copy_(torch.rand(c, generator=gen, dtype=torch.float64))
        layer.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
    return layer


@pytest.mark.parametrize('estimator', ESTIMATORS)
@pytest.mark.parametrize('cls,shape', [(robustbn.JSBN1d, (0, 6)), (robustbn.JSBN2d, (0, 6, 3, 3)),
                                       (robustbn.JSBN2d, (2, 6, 0, 0)),
                                       (robustbn.JSBN3d, (0, 6, 2, 2, 2)),
                                       (robustbn.SyncJSBN, (0, 6, 3))])
def test_empty_batch_behaves_as_batchnorm(cls, shape, estimator):
    layer, bn = _layer(cls, 6, estimator=estimator), _layer(nn.BatchNorm1d, 6)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(layer.weight.grad, torch.zeros(6, dtype=torch.float64))
    assert torch.equal(layer.bias.grad, torch.zeros(6, dtype=torch.float64))
    for key in ('running_mean', 'running_var'):
        assert torch.equal(layer.state_dict()[key], before[key])
    assert layer.num_batches_tracked == 1 and layer.nonfinite_batches == 0
    bn(torch.zeros(0, 6, dtype=torch.float64))  # torch counts the empty batch too
    assert bn.num_batches_tracked == layer.num_batches_tracked
    # eval without running statistics uses the (empty) batch
    nostats = cls(6, estimator=estimator, track_running_stats=False).double().eval()
    assert nostats(x).shape == x.shape


def test_one_value_per_channel_still_raises():
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        robustbn.JSBN1d(4)(torch.randn(1, 4))


def test_gprebn_empty_batch():
    layer = _layer(robustbn.GpreBN2d, 6, update_source_stats=True).train()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.zeros(0, 6, 2, 2, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros(6, dtype=torch.float64))
    for key in ('running_mean', 'running_var', 'target_mean', 'target_var'):
        assert torch.equal(layer.state_dict()[key], before[key]), key


def _poisoned(kind):
    """A (4, 8, 3, 3) batch whose channel 0 has non-finite statistics."""
    x = torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64) + torch.linspace(-1, 2, 8).view(1, 8, 1, 1)
    if kind == 'nan':
        x[0, 0, 0, 0] = float('nan')
    elif kind == 'inf':
        x[1, 0, 2, 1] = float('inf')
    else:  # finite values whose variance overflows
        x[:, 0] = torch.tensor([1e300, -1e300], dtype=torch.float64).repeat(18)[:36].view(4, 3, 3)
    return x


def _rest(layer, c=7):
    """The same layer without channel 0."""
    other = type(layer)(c, **{k: getattr(layer, k) for k in _kwargs(layer)}).double()
    with torch.no_grad():
        for name, t in layer.state_dict().items():
            src = t[1:] if t.dim() == 1 else t
            other.state_dict()[name].copy_(src)
    return other


def _kwargs(layer):
    if isinstance(layer, robustbn.GpreBatchNorm):
        return ('theta', 'target_momentum', 'batch_estimator', 'target_init', 'target_average')
    return ('estimator',)


@pytest.mark.parametrize('kind', ['nan', 'inf', 'overflow'])
@pytest.mark.parametrize('estimator', ESTIMATORS)
def test_nonfinite_channel_stays_alone(estimator, kind):
    layer = _layer(robustbn.JSBN2d, 8, estimator=estimator)
    rest = _rest(layer)
    old0 = (layer.running_mean[0].clone(), layer.running_var[0].clone())
    x = _poisoned(kind).requires_grad_()
    xr = x.detach()[:, 1:].clone().requires_grad_()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y, yr = layer(x), rest(xr)
    torch.testing.assert_close(y[:, 1:], yr, **OUT)
    bn = nn.BatchNorm2d(1).double()  # channel 0 as BatchNorm has it (NaN where BN has NaN)
    with torch.no_grad():
        bn.weight.fill_(layer.weight[0].item())
        bn.bias.fill_(layer.bias[0].item())
    torch.testing.assert_close(y[:, :1], bn(x.detach()[:, :1]), equal_nan=True, **OUT)
    (y * g).nansum().backward()
    (yr * g[:, 1:]).sum().backward()
    torch.testing.assert_close(x.grad[:, 1:], xr.grad, **OUT)
    torch.testing.assert_close(layer.weight.grad[1:], rest.weight.grad, **OUT)
    torch.testing.assert_close(layer.bias.grad[1:], rest.bias.grad, **OUT)
    torch.testing.assert_close(layer.running_mean[1:], rest.running_mean, **BUF)
    torch.testing.assert_close(layer.running_var[1:], rest.running_var, **BUF)
    assert layer.running_mean[0] == old0[0] and layer.running_var[0] == old0[1]
    assert layer.nonfinite_batches == 1 and rest.nonfinite_batches == 0
    for _ in range(3):  # clean batches afterwards: the layer is whole again
        layer(torch.randn(4, 8, 3, 3, dtype=torch.float64))
    assert layer.nonfinite_batches == 1
    assert torch.isfinite(layer.eval()(torch.randn(4, 8, 3, 3, dtype=torch.float64))).all()


@pytest.mark.parametrize('started', [True, False], ids=['average_started', 'first_batch'])
@pytest.mark.parametrize('batch_estimator', ['sample', 'paper', 'classic'])
def test_gprebn_keeps_nonfinite_channels_out_of_its_averages(batch_estimator, started):
    """A non-finite channel keeps its test-time average (an average in progress) or starts
    it at the source statistics (target_init='first_batch', the first batch); the other
    channels are as without it; the batch is counted once."""
    layer = _layer(robustbn.GpreBN2d, 8, theta=0.7, target_momentum=0.3,
                   batch_estimator=batch_estimator, update_source_stats=True).train()
    layer.target_initialized.fill_(started)
    rest = _rest(layer)
    rest.update_source_stats = True
    source = layer.running_mean[0].clone(), layer.running_var[0].clone()
    old = [t[0].clone() for t in (layer.target_mean, layer.target_var, layer.running_mean)]
    if not started:
        old[:2] = source
    x = _poisoned('nan')
    y, yr = layer(x), rest(x[:, 1:])
    torch.testing.assert_close(y[:, 1:], yr, **OUT)
    for a, b in ((layer.target_mean, rest.target_mean), (layer.target_var, rest.target_var),
                 (layer.running_mean, rest.running_mean)):
        torch.testing.assert_close(a[1:], b, **BUF)
    new = [t[0] for t in (layer.target_mean, layer.target_var, layer.running_mean)]
    assert all(a == b for a, b in zip(old, new)) and layer.nonfinite_batches == 1


def _all_empty_worker(rank, world, port, out):
    torch.set_num_threads(1)
    with gloo_group(rank, world, port):
        layer = _layer(robustbn.SyncJSBN, 6)
        before = layer.running_mean.clone(), layer.running_var.clone()
        y = layer(torch.zeros(0, 6, 3, dtype=torch.float64))
        assert y.shape == (0, 6, 3)
        assert torch.equal(layer.running_mean, before[0])
        assert torch.equal(layer.running_var, before[1])
        assert layer.num_batches_tracked == 1
        open(os.path.join(out, f'{rank}.ok'), 'w').close()


def test_sync_all_ranks_empty_updates_nothing(tmp_path):
    mp.spawn(_all_empty_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['0.ok', '1.ok']


@pytest.mark.skipif(not robustbn.fast.TRITON_AVAILABLE, reason='needs triton')
def test_fast_path_follows_the_same_rules_in_triton_interpreter():
    env = dict(os.environ, ROBUSTBN_FAST='on', TRITON_INTERPRET='1')
    out = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                          __file__, '-k', 'not triton_interpreter and not sync_all_ranks'],
                         capture_output=True, text=True, env=env, timeout=1500,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
