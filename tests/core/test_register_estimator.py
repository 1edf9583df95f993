"""User estimators: robustbn.register_estimator, used by every layer family, differentiated
by autograd (or a declared VJP), and always on the reference path, whatever the fast-path
mode."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import robustbn
from robustbn import ESTIMATORS, fast


def half_mean(m, v, n):
    return 0.5 * m, v * (1 + 1 / n)


@pytest.fixture
def registered():
    names = []

    def register(name, fn=half_mean, **kwargs):
        spec = robustbn.register_estimator(name, fn, **kwargs)
        names.append(name)
        return spec
    yield register
    for name in names:
        del ESTIMATORS[name]


def _reference(x, fn, eps=1e-5):
    """Batch norm with fn's statistics, through plain autograd on the whole tensor."""
    dims = [0, 2, 3]
    n = x.numel() // x.size(1)
    m, v = x.mean(dims), x.var(dims, unbiased=False)
    mu, var = fn(m, v, float(n)) if x.size(1) >= 3 else (m, v)
    return (x - mu.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + eps)


def test_layers_use_a_registered_estimator_with_an_exact_gradient(registered):
    registered('half_mean', min_channels=3)
    layer = robustbn.JSBN2d(5, affine=False, estimator='half_mean').double()
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(layer(x), _reference(x, half_mean))
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))
    layer = robustbn.JSBN2d(5, estimator='half_mean').double()
    w, b = layer.weight, layer.bias
    assert torch.autograd.gradcheck(
        lambda t, w_, b_: robustbn.shrunk_batch_norm(t, w_, b_, None, None,
                                                     ESTIMATORS['half_mean']), (x, w, b))
    # the running statistics are the EMA of the statistics used
    layer(x)
    m = x.detach().mean([0, 2, 3])
    torch.testing.assert_close(layer.running_mean, 0.1 * 0.5 * m)
    # GpreBN's batch statistics and the synced layer (no group: local) take it too
    assert robustbn.GpreBN2d(5, batch_estimator='half_mean').train()(x).shape == x.shape
    torch.testing.assert_close(robustbn.SyncJSBN(5, affine=False,
                                                 estimator='half_mean').double()(x),
                               _reference(x, half_mean))


def test_min_channels_and_declared_vjp(registered):
    calls = []

    def vjp(m, v, n, d_mu, d_var):
        calls.append(1)
        return 0.5 * d_mu, d_var * (1 + 1 / n)

    registered('half_vjp', half_mean, vjp=vjp, min_channels=4)
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    narrow = robustbn.JSBN2d(3, affine=False, estimator='half_vjp').double()
    torch.testing.assert_close(narrow(x), F.batch_norm(x, None, None, training=True))
    wide = robustbn.JSBN2d(6, affine=False, estimator='half_vjp').double()
    x6 = torch.randn(4, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: wide(t), (x6,))
    assert calls  # the declared VJP was used


@pytest.mark.parametrize('mode', ['auto', 'on', 'off'])
def test_user_estimators_take_the_reference_path_in_every_mode(registered, monkeypatch, mode):
    registered('half_mean')
    monkeypatch.setattr(fast, 'INTERPRETING', True)  # 'on' would accept CPU tensors

    def boom(*args, **kwargs):
        raise AssertionError('the fast path ran')
    monkeypatch.setattr(fast, 'shrunk_batch_norm_fast', boom)
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    layer = robustbn.JSBN2d(5, affine=False, estimator='half_mean').double()
    with fast.fast_path(mode):
        assert fast.fast_path_estimator(x, ESTIMATORS['half_mean'], 1) is None
        y = layer(x)
        y.square().sum().backward()
    torch.testing.assert_close(y, _reference(x, half_mean))


SCRIPT = '''
import torch, robustbn
robustbn.register_estimator('half_mean', lambda m, v, n: (0.5 * m, v))
x = torch.randn(4, 5, 3, 3)
for est in ('half_mean', 'paper'):
    x_ = x.clone().requires_grad_()
    robustbn.JSBN2d(5, estimator=est)(x_).square().sum().backward()
    assert torch.isfinite(x_.grad).all()
print('ok')
'''


@pytest.mark.skipif(not fast.TRITON_AVAILABLE, reason='needs triton')
def test_user_estimator_next_to_the_kernels_in_triton_interpreter():
    """The case that raised KeyError when estimators were looked up by name in the kernels'
    table: fast path forced on (Triton's interpreter on CPU), a user estimator next to a
    built-in one that the kernels run."""
    env = dict(os.environ, ROBUSTBN_FAST='on', TRITON_INTERPRET='1')
    out = subprocess.run([sys.executable, '-c', SCRIPT], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith('ok'), out.stderr[-3000:]


def test_bad_registrations_are_clear_errors(registered):
    with pytest.raises(TypeError, match='register_estimator'):
        ESTIMATORS['mine'] = half_mean
    with pytest.raises(ValueError, match='already registered'):
        robustbn.register_estimator('paper', half_mean)
    with pytest.raises(ValueError, match='already registered'):
        robustbn.register_estimator('sample', half_mean)  # GpreBN's name for 'none'
    with pytest.raises(ValueError, match='non-empty string'):
        robustbn.register_estimator('', half_mean)
    with pytest.raises(TypeError, match='callables'):
        robustbn.register_estimator('mine', 3)
    with pytest.raises(ValueError, match='min_channels'):
        robustbn.register_estimator('mine', half_mean, min_channels=-1)
    assert 'mine' not in ESTIMATORS
    with pytest.raises(ValueError, match='unknown estimator.*valid: classic'):
        robustbn.JSBN2d(4, estimator='mine')
    registered('mine')
    assert robustbn.JSBN2d(4, estimator='mine').estimator == 'mine'
