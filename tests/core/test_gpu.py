"""CUDA equivalences (skipped without a GPU): run with `pytest -m gpu` on a GPU machine.

Every test runs with the fast path in mode 'auto' (off by default): the layers take the
Triton kernels on CUDA (robustbn.fast). The tests below the first block compare them with
the reference path (``fast_path('off')``), count their kernels, and run them under sync
debug mode, CUDA-graph capture and torch.compile.
"""
import contextlib
import copy
import os

import pytest
import torch
import torch.distributed as dist
from helpers import free_port
from torch import nn

import robustbn
from robustbn import GpreBN2d, JSBN2d, SyncJSBN, fast, shrunk_batch_norm

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]

ESTIMATORS = sorted(robustbn.ESTIMATORS)


@pytest.fixture(autouse=True)
def _fast_path_auto():
    with fast.fast_path('auto'):
        yield


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


def test_one_process_nccl_syncjsbn_equals_jsbn():
    assert not dist.is_initialized()
    dist.init_process_group('nccl', init_method=f'tcp://127.0.0.1:{free_port()}', rank=0,
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


# ----------------------------------------------------------------------------- fast path
def _fast_calls(monkeypatch):
    """Counts forward passes of the fast path."""
    from robustbn.fast import ops
    calls = []
    impl = ops.forward_impl

    def counted(*args, **kwargs):
        calls.append(1)
        return impl(*args, **kwargs)
    monkeypatch.setattr(ops, 'forward_impl', counted)
    return calls


def _close(a, b, tol, what):
    err = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1)).item()
    assert err <= tol, f'{what}: normalized max error {err:.3g} > {tol:.1g}'


def _compare_paths(make, x, g, tol, steps=2):
    """The fast path (mode 'auto') on make() and the reference on a copy: outputs, grads,
    buffers."""
    fast_layer = make()
    ref_layer = copy.deepcopy(fast_layer)
    for step in range(steps):
        xs = x * (1 + 0.5 * step)
        got = _named_step(fast_layer, xs, g)
        with fast.fast_path('off'):
            want = _named_step(ref_layer, xs, g)
        for key in want:
            assert got[key].dtype == want[key].dtype and got[key].stride() == want[key].stride()
            buf = key not in ('y', 'x_grad') and not key.endswith('.grad')
            _close(got[key], want[key], tol['buf'] if buf else tol['out'], f'step {step} {key}')


def _named_step(layer, x, g):
    x = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    (y.float() * g).sum().backward()
    out = {'y': y.detach(), 'x_grad': x.grad}
    out.update({n + '.grad': p.grad for n, p in layer.named_parameters()})
    out.update({n: b.clone() for n, b in layer.named_buffers()})
    return out


TOL = {torch.float32: dict(out=5e-5, buf=2e-6), torch.bfloat16: dict(out=2e-2, buf=2e-6),
       torch.float16: dict(out=3e-3, buf=2e-6)}


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('estimator', ESTIMATORS)
def test_fast_path_equals_reference(monkeypatch, estimator, dtype, channels_last):
    calls = _fast_calls(monkeypatch)
    x = (_x(shape=(4, 24, 20, 28)) * 2 + 1).cuda().to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    g = torch.randn(x.shape, device='cuda')
    _compare_paths(lambda: JSBN2d(24, estimator=estimator).cuda(), x, g, TOL[dtype])
    assert len(calls) == 2  # the fast path ran (the reference ran with fast_path('off'))


@pytest.mark.parametrize('estimator', ESTIMATORS)
def test_fast_path_gprebn_and_large_tensors(monkeypatch, estimator):
    calls = _fast_calls(monkeypatch)

    def gprebn():
        layer = GpreBN2d(24, batch_estimator='sample' if estimator == 'none' else estimator,
                         theta=0.7, update_source_stats=True).cuda()
        with torch.no_grad():
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
        layer.reset_target()
        return layer
    x = _x(shape=(4, 24, 20, 28)).cuda()
    _compare_paths(gprebn, x, torch.randn(x.shape, device='cuda'), TOL[torch.float32])
    # many tiles per program and many partial rows (ResNet stem-sized)
    x = _x(shape=(16, 64, 112, 112)).cuda().to(memory_format=torch.channels_last)
    _compare_paths(lambda: JSBN2d(64, estimator=estimator).cuda(), x,
                   torch.randn(x.shape, device='cuda'), TOL[torch.float32], steps=1)
    assert len(calls) == 3


def test_fast_path_float64_forced_on():
    x = _x(torch.float64).cuda()
    g = torch.randn(x.shape, device='cuda', dtype=torch.float64)
    for est in ESTIMATORS:
        with fast.fast_path('on'):
            _compare_paths(lambda: JSBN2d(16, estimator=est).cuda().double(), x, g,
                           dict(out=1e-10, buf=1e-11))


def _kernels(fn):
    """Names of the CUDA kernels fn launches (after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize('synced', [False, True])
def test_three_kernels_forward_and_backward(synced):
    """The fast path: 3 kernels forward, 3 backward (+ one NCCL kernel each way when
    synchronized); the reference path launches many more."""
    x = _x(shape=(2, 18, 64, 128)).cuda().requires_grad_()
    w = torch.rand(18, device='cuda', requires_grad=True)
    b = torch.rand(18, device='cuda', requires_grad=True)
    rm, rv = torch.zeros(18, device='cuda'), torch.ones(18, device='cuda')
    g = torch.randn(x.shape, device='cuda')
    est = robustbn.get_estimator('paper')
    with _nccl_group() if synced else contextlib.nullcontext() as group:
        def forward():
            return shrunk_batch_norm(x, w, b, rm, rv, est, 1e-5, 0.1, group=group)

        def backward():
            torch.autograd.grad(forward(), (x, w, b), g)
        fwd = _kernels(forward)
        both = _kernels(backward)
        with fast.fast_path('off'):
            ref_fwd = _kernels(forward)
    own = [k for k in both if 'nccl' not in k.lower()]
    assert len([k for k in fwd if 'nccl' not in k.lower()]) == 3, fwd
    assert len(own) == 6, both
    assert len(both) - len(own) == (2 if synced else 0), both
    assert len(ref_fwd) > 6, ref_fwd
    print(f'\nkernels forward+backward, fast: {len(both)}; reference forward alone: '
          f'{len(ref_fwd)}')


@contextlib.contextmanager
def _nccl_group():
    assert not dist.is_initialized()
    dist.init_process_group('nccl', init_method=f'tcp://127.0.0.1:{free_port()}', rank=0,
                            world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
        os.environ.pop('MASTER_PORT', None)


@pytest.mark.parametrize('sync_mode', ['reduce', 'gather'])
@pytest.mark.parametrize('estimator', ESTIMATORS)
def test_synchronized_fast_path_no_host_sync(monkeypatch, estimator, sync_mode):
    """An explicit one-rank NCCL group runs the synchronized kernels (partials all-reduced
    as float64 sums or all-gathered, all_reduce of a copy of the sums) without a
    device-to-host sync; equal to the local result."""
    calls = _fast_calls(monkeypatch)
    x = _x(shape=(4, 16, 12, 12)).cuda()
    g = torch.randn(x.shape, device='cuda')
    est = robustbn.get_estimator(estimator)

    def step(group, debug):
        xx = x.clone().requires_grad_()
        w = torch.linspace(0.5, 1.5, 16, device='cuda').requires_grad_()
        b = torch.linspace(-1, 1, 16, device='cuda').requires_grad_()
        rm, rv = torch.zeros(16, device='cuda'), torch.ones(16, device='cuda')
        torch.cuda.set_sync_debug_mode('error' if debug else 0)
        try:
            y = shrunk_batch_norm(xx, w, b, rm, rv, est, 1e-5, 0.1, group=group,
                                  sync_mode=sync_mode)
            (y * g).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return [y.detach(), xx.grad, w.grad, b.grad, rm, rv]

    with _nccl_group() as group:
        step(group, debug=False)  # NCCL communicator and kernels set up outside the check
        synced = step(group, debug=True)
        local = step(None, debug=True)
    for a, b_ in zip(synced, local):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)
    assert len(calls) == 3


def test_cuda_graph_capture_of_forward_and_backward():
    layer = JSBN2d(16, estimator='classic').cuda()
    ref = copy.deepcopy(layer)
    state = copy.deepcopy(layer.state_dict())
    static_x = torch.empty(8, 16, 12, 12, device='cuda', requires_grad=True)
    g = torch.randn(static_x.shape, device='cuda')
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        static_x.copy_(_x().cuda())
    with torch.cuda.stream(side):
        for _ in range(2):  # compiles the kernels outside the capture
            layer(static_x).backward(g)
    torch.cuda.current_stream().wait_stream(side)
    layer.load_state_dict(state)
    layer.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
        static_y.backward(g)
    for step in range(3):
        x = _x().cuda() * (1 + step) + step
        with torch.no_grad():
            static_x.copy_(x)
        graph.replay()
        ref.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        yr = ref(xr)
        yr.backward(g)
        torch.cuda.synchronize()
        for a, b in ((static_y, yr), (static_x.grad, xr.grad), (layer.weight.grad, ref.weight.grad),
                     (layer.bias.grad, ref.bias.grad), (layer.running_mean, ref.running_mean),
                     (layer.running_var, ref.running_var),
                     (layer.num_batches_tracked, ref.num_batches_tracked)):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('second', ['jsbn', 'gprebn'])
def test_torch_compile_equals_eager(monkeypatch, second):
    """With GpreBN: the backward needs statistics read from the averages the forward then
    updates (the CPU reference path had to guard against the partitioner recomputing
    them afterwards, tests/core/test_compile.py)."""
    calls = _fast_calls(monkeypatch)
    torch.manual_seed(0)
    last = JSBN2d(8, estimator='classic') if second == 'jsbn' else \
        robustbn.convert_norm(nn.BatchNorm2d(8), 'GpreBN', theta=0.5, batch_estimator='paper')
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), JSBN2d(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 1), last,
                          nn.Flatten(), nn.Linear(8 * 16 * 16, 4)).cuda()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 16, 16, device='cuda')
    for step in range(3):
        for m in (model, ref):
            m.zero_grad(set_to_none=True)
        y = compiled(x * (1 + step))
        y.square().mean().backward()
        yr = ref(x * (1 + step))
        yr.square().mean().backward()
        torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-4)
        for (name, p), pr in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, pr.grad, rtol=1e-3, atol=1e-4, msg=name)
        for (name, b_), br in zip(model.named_buffers(), ref.buffers()):
            torch.testing.assert_close(b_, br, rtol=1e-5, atol=1e-5, msg=name)
    assert len(calls) >= 2 * 3 * 2  # eager and compiled both took the fast path
