"""JSBN layers: gradients, equivalence with BatchNorm, running statistics, numerics, errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import robustbn
from robustbn import JSBN1d, JSBN2d, JSBN3d, SyncJSBN

ESTIMATORS = sorted(robustbn.ESTIMATORS)
SHAPES = {1: (6, 5), 2: (4, 5, 3, 3), 3: (3, 5, 2, 2, 2)}
JS = {1: JSBN1d, 2: JSBN2d, 3: JSBN3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _input(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    spread = torch.linspace(-2, 3, c, dtype=dtype).view([1, c] + [1] * (len(shape) - 2))
    scale = torch.linspace(0.5, 2, c, dtype=dtype).view_as(spread)
    return torch.randn(shape, generator=g, dtype=dtype) * scale + spread


@pytest.mark.parametrize('estimator', ESTIMATORS)
@pytest.mark.parametrize('shape', [(4, 5, 3, 3), (7, 6), (3, 4, 2, 2, 2)])
def test_gradcheck_function(estimator, shape, scalar_path):
    x = _input(shape).requires_grad_()
    c = shape[1]
    w = torch.linspace(0.5, 1.5, c, dtype=torch.float64).requires_grad_()
    b = torch.linspace(-0.3, 0.2, c, dtype=torch.float64).requires_grad_()
    est = robustbn.get_estimator(estimator)

    def f(x, w, b):
        return robustbn.shrunk_batch_norm(x, w, b, None, None, est, 1e-5)
    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize('estimator', ESTIMATORS)
def test_gradcheck_without_affine(estimator, scalar_path):
    x = _input((5, 4, 2, 3)).requires_grad_()
    est = robustbn.get_estimator(estimator)
    assert torch.autograd.gradcheck(
        lambda x: robustbn.shrunk_batch_norm(x, None, None, None, None, est), (x,))


def _train_eval_pair(dim, momentum, track, steps=3):
    bn = BN[dim](5, momentum=momentum, track_running_stats=track).double()
    js = JS[dim](5, momentum=momentum, track_running_stats=track, estimator='none').double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    js.load_state_dict(bn.state_dict())
    for step in range(steps):
        x = _input(SHAPES[dim], seed=step)
        g = torch.randn_like(x)
        outs = []
        for layer in (bn, js):
            xi = x.clone().requires_grad_()
            y = layer(xi)
            (y * g).sum().backward()
            outs.append((y.detach(), xi.grad))
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    return bn, js


@pytest.mark.parametrize('dim', [1, 2, 3])
@pytest.mark.parametrize('momentum', [0.1, None])
@pytest.mark.parametrize('track', [True, False])
def test_none_estimator_is_batchnorm(dim, momentum, track):
    bn, js = _train_eval_pair(dim, momentum, track)
    torch.testing.assert_close(bn.weight.grad, js.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bn.bias.grad, js.bias.grad, rtol=1e-10, atol=1e-12)
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(js.state_dict()[k], v, rtol=1e-12, atol=1e-14, msg=k)
    bn.eval(), js.eval()
    x = _input(SHAPES[dim], seed=9)
    torch.testing.assert_close(bn(x), js(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('estimator', ['paper', 'wacv', 'classic', 'paper_mean'])
def test_running_stats_are_ema_of_used_estimates(estimator):
    torch.manual_seed(0)
    layer = JSBN2d(5, momentum=0.3, estimator=estimator).double()
    est = robustbn.get_estimator(estimator)
    rm, rv = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    for step in range(3):
        x = _input((4, 5, 3, 3), seed=step)
        n = x.numel() // 5
        m = x.mean((0, 2, 3))
        v = x.var((0, 2, 3), unbiased=False)
        mu, var = est(m, v, float(n))
        y = layer(x)
        torch.testing.assert_close(
            y, F.batch_norm(x, mu, var, layer.weight.double(), layer.bias.double(), False, 0, 1e-5))
        rm = 0.7 * rm + 0.3 * mu
        rv = 0.7 * rv + 0.3 * var * n / (n - 1)
    torch.testing.assert_close(layer.running_mean, rm)
    torch.testing.assert_close(layer.running_var, rv)
    assert layer.num_batches_tracked.item() == 3


def test_shrinkage_is_active_and_changes_output():
    x = _input((4, 5, 3, 3))
    y_bn = JSBN2d(5, estimator='none').double()(x)
    y_js = JSBN2d(5).double()(x)
    assert (y_bn - y_js).abs().max() > 1e-2


@pytest.mark.parametrize('estimator', ESTIMATORS)
def test_affine_parameters_train(estimator):
    layer = JSBN2d(5, estimator=estimator)
    x = _input((4, 5, 3, 3), dtype=torch.float32)
    y = layer(x)
    (y * torch.randn_like(y)).sum().backward()
    assert layer.weight.grad.abs().sum() > 0 and layer.bias.grad.abs().sum() > 0
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = copy.deepcopy(layer.state_dict())
    opt.step()
    assert not torch.equal(before['weight'], layer.weight) and \
        not torch.equal(before['bias'], layer.bias)


def test_eval_running_is_deterministic_and_batch_is_transductive():
    layer = JSBN2d(5).double()
    for s in range(3):
        layer(_input((4, 5, 3, 3), seed=s))
    layer.eval()
    state = copy.deepcopy(layer.state_dict())
    a, b = _input((4, 5, 3, 3), seed=10), _input((4, 5, 3, 3), seed=11)
    pair = torch.cat([a[:1], b[1:]])
    # running: an image's output does not depend on the rest of the batch
    torch.testing.assert_close(layer(a)[:1], layer(pair)[:1])
    torch.testing.assert_close(
        layer(a), F.batch_norm(a, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                               False, 0.0, layer.eps))
    layer.eval_stats = 'batch'
    assert (layer(a)[:1] - layer(pair)[:1]).abs().max() > 1e-3
    for k, v in state.items():  # eval never updates running stats
        assert torch.equal(layer.state_dict()[k], v), k


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        JSBN2d(3)(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        SyncJSBN(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match='expected 4D input'):
        JSBN2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match='expected 2D or 3D input'):
        JSBN1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match='expected 5D input'):
        JSBN3d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match='at least 2D'):
        SyncJSBN(3)(torch.randn(3))
    with pytest.raises(ValueError, match='expected 3 channels'):
        JSBN2d(3)(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match='eval_stats'):
        JSBN2d(3, eval_stats='test')
    layer = JSBN2d(3)
    state = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError):
        layer(torch.randn(1, 3, 1, 1))
    for k, v in state.items():  # a refused batch changes nothing
        assert torch.equal(layer.state_dict()[k], v), k
    # eval with running stats accepts a single value per channel, like BatchNorm
    layer.eval()
    assert layer(torch.randn(1, 3, 1, 1)).shape == (1, 3, 1, 1)


def test_is_batchnorm_for_openmmlab_and_loads_bn_checkpoints():
    for cls in (JSBN1d, JSBN2d, JSBN3d, SyncJSBN):
        layer = cls(8)
        assert isinstance(layer, _BatchNorm) and not isinstance(layer, nn.SyncBatchNorm)
        assert cls._abbr_ == 'bn'
        layer.load_state_dict(nn.BatchNorm2d(8).state_dict(), strict=True)
    # mmengine's MODELS registry: tests/openmmlab/test_registry.py


# ---------------------------------------------------------------- numerics and dtypes

@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('estimator', ESTIMATORS)
def test_low_precision_uses_float32_statistics(dtype, estimator):
    layer = JSBN2d(8, estimator=estimator)
    ref = copy.deepcopy(layer)
    x = (_input((4, 8, 5, 5), dtype=torch.float32) * 3 + 5).to(dtype)
    xr = x.float().requires_grad_()
    x = x.requires_grad_()
    y = layer(x)
    assert y.dtype == dtype
    g = torch.randn(y.shape).to(dtype)
    (y.float() * g.float()).sum().backward()
    yr = ref(xr)
    (yr * g.float()).sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert x.grad.dtype == dtype and layer.weight.grad.dtype == torch.float32
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(y.float(), yr, **tol)
    # statistics are exactly the float32 ones: running buffers agree to float32 precision
    torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-6, atol=1e-6)


def test_autocast_conv_bn_stays_finite():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), JSBN2d(16), nn.ReLU(), nn.Conv2d(16, 4, 3),
                          SyncJSBN(4))
    x = torch.randn(2, 3, 12, 12) * 50
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    y.float().square().mean().backward()
    for p in model.parameters():
        assert torch.isfinite(p.grad).all()
    assert model[1].running_var.dtype == torch.float32
    assert torch.isfinite(model[1].running_var).all()


@pytest.mark.parametrize('estimator', ESTIMATORS)
def test_large_mean_small_std_float32_matches_float64(estimator):
    torch.manual_seed(0)
    x64 = 1e3 + 0.1 * torch.randn(16, 8, 6, 6, dtype=torch.float64)
    x64 = x64 + torch.linspace(0, 1, 8, dtype=torch.float64).view(1, 8, 1, 1)
    x32 = x64.float()
    x64 = x32.double()  # the same values
    l32, l64 = JSBN2d(8, estimator=estimator), JSBN2d(8, estimator=estimator).double()
    y32, y64 = l32(x32), l64(x64)
    torch.testing.assert_close(l32.running_mean.double(), l64.running_mean, rtol=1e-3, atol=0)
    torch.testing.assert_close(l32.running_var.double(), l64.running_var, rtol=1e-3, atol=0)
    if estimator == 'none':
        bn32, bn64 = nn.BatchNorm2d(8), nn.BatchNorm2d(8).double()
        err_bn = (bn32(x32).double() - bn64(x64)).abs().max()
        err_js = (y32.double() - y64).abs().max()
        assert err_js <= max(err_bn * 1.5, 1e-5), (err_js, err_bn)
    else:
        assert (y32.double() - y64).abs().max() < 1e-3


def test_overflow_case_of_released_code_stays_finite():
    # C=512 with variances near 2: prod(v) ** (1/C) is inf in float32.
    x = torch.randn(4, 512, 4, 4) * 2 ** 0.5
    layer = JSBN2d(512)
    y = layer(x)
    assert torch.isfinite(y).all() and torch.isfinite(layer.running_var).all()


# ---------------------------------------------------------------- conversion

def _bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6, momentum=0.01)),
                          nn.Flatten(), nn.LazyLinear(4), nn.BatchNorm1d(4, eps=1e-3))
    model(torch.randn(4, 3, 8, 8))  # populate running stats and the lazy layer
    model[3][1].weight.requires_grad_(False)
    return model


def test_convert_and_revert_keep_weights_buffers_and_flags():
    model = _bn_model()
    ref_state = copy.deepcopy(model.state_dict())
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    ref_out = model(x)
    robustbn.convert_norm(model, 'JSBN', estimator='classic')
    assert [type(m) for m in (model[1], model[3][1], model[6])] == [JSBN2d, JSBN2d, JSBN1d]
    assert model[1].estimator == 'classic' and model[3][1].momentum == 0.01 and model[6].eps == 1e-3
    assert not model[3][1].weight.requires_grad and model[1].weight.requires_grad
    assert not model[1].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    torch.testing.assert_close(model(x), ref_out)  # eval uses running stats: same function
    robustbn.convert_norm(model, 'SyncJSBN')
    assert all(type(m) is SyncJSBN for m in (model[1], model[3][1], model[6]))
    robustbn.revert_norm(model)
    assert type(model[1]) is robustbn.BatchNormXd
    assert set(model.state_dict()) == set(ref_state)
    model2 = robustbn.revert_norm(robustbn.convert_norm(_bn_model(), 'JSBN'))
    assert [type(m) for m in (model2[1], model2[6])] == [nn.BatchNorm2d, nn.BatchNorm1d]


def test_convert_syncbatchnorm_and_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4))
    robustbn.convert_norm(model, 'SyncJSBN')
    assert type(model[1]) is SyncJSBN
    with pytest.raises(ValueError, match='input rank'):
        robustbn.convert_norm(nn.Sequential(nn.SyncBatchNorm(4)), 'JSBN')
    with pytest.raises(ValueError, match='unknown norm'):
        robustbn.convert_norm(nn.Sequential(nn.BatchNorm2d(4)), 'JSBN4d')
    with pytest.raises(ValueError, match='unknown estimator'):
        robustbn.convert_norm(nn.Sequential(nn.BatchNorm2d(4)), 'JSBN', estimator='x')
    single = robustbn.convert_norm(nn.BatchNorm2d(4), 'JSBN2d')
    assert type(single) is JSBN2d


def test_torchvision_resnet_converts_with_identical_state_dict():
    torchvision = pytest.importorskip('torchvision')
    model = torchvision.models.resnet18(num_classes=10)
    keys = {k: v.shape for k, v in model.state_dict().items()}
    robustbn.convert_norm(model, 'SyncJSBN')
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.bn1.weight.grad is not None
