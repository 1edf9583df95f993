"""CUDA equivalences (skipped without a GPU): run with `pytest -m gpu` on a GPU machine."""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

import robustbn
from robustbn import JSBN2d, SyncJSBN

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]

ESTIMATORS = sorted(robustbn.ESTIMATORS)


def _x(dtype=torch.float32, shape=(8, 16, 12, 12)):
    g = torch.Generator().manual_seed(0)
    spread = torch.linspace(-2, 3, shape[1]).view(1, -1, 1, 1)
    return (torch.randn(shape, generator=g) + spread).to(dtype)


def _step(layer, x, g):
    x = x.clone().requires_grad_()
    y = layer(x)
    (y.float() * g).sum().backward()
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad, layer.running_mean, \
        layer.running_var


def _run(layer, x, g):
    return [t.float().cpu() for t in _step(layer, x, g)]


def test_none_estimator_equals_cudnn_batchnorm():
    x = _x().cuda()
    g = torch.randn(x.shape, device='cuda')
    bn, js = nn.BatchNorm2d(16).cuda(), JSBN2d(16, estimator='none').cuda()
    for a, b in zip(_run(bn, x, g), _run(js, x, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('estimator', ESTIMATORS)
@pytest.mark.parametrize('channels_last', [False, True])
def test_cuda_matches_cpu_float64(estimator, channels_last):
    x = _x()
    g = torch.randn(x.shape)
    cpu = JSBN2d(16, estimator=estimator).double()
    ref = _run(cpu, x.double(), g.double())
    gpu = JSBN2d(16, estimator=estimator).cuda()
    xc = x.cuda()
    if channels_last:
        xc = xc.to(memory_format=torch.channels_last)
    out = _run(gpu, xc, g.cuda())
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('estimator', ESTIMATORS)
def test_cuda_low_precision_finite_and_close(dtype, estimator):
    x = (_x() * 3 + 5).cuda()
    g = torch.randn(x.shape, device='cuda')
    layer = JSBN2d(16, estimator=estimator).cuda()
    ref = copy.deepcopy(layer)
    y, gx, gw, gb, rm, rv = _run(layer, x.to(dtype), g)
    y32, *_ , rm32, rv32 = _run(ref, x.to(dtype).float(), g)
    assert torch.isfinite(y).all() and torch.isfinite(gx).all()
    torch.testing.assert_close(y, y32, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(rm, rm32, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rv, rv32, rtol=1e-5, atol=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_one_process_nccl_syncjsbn_equals_jsbn():
    assert not dist.is_initialized()
    dist.init_process_group('nccl', init_method=f'tcp://127.0.0.1:{_free_port()}', rank=0,
                            world_size=1)
    try:
        x = _x().cuda()
        g = torch.randn(x.shape, device='cuda')
        sync, local = SyncJSBN(16).cuda(), JSBN2d(16).cuda()
        torch.cuda.set_sync_debug_mode('error')  # no device-to-host copy in forward/backward
        try:
            out_sync = _step(sync, x, g)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        for a, b in zip([t.cpu() for t in out_sync], _run(local, x, g)):
            torch.testing.assert_close(a, b)
    finally:
        dist.destroy_process_group()
        os.environ.pop('MASTER_PORT', None)
