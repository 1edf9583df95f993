"""Fast path (Triton kernels in Triton's CPU interpreter) against the reference path.

Run as a script with TRITON_INTERPRET=1 (tests/core/test_fast_path.py does): every case runs a
layer (or the functional form) with the fast path forced on and a deep copy with it off,
on the same data, and compares outputs, input/weight/bias gradients and buffers. Prints
one JSON object {case: null or the failure}. Importing the module only defines CASES.

float64 cases compare at ~1e-11; buffers at 1e-7 only there because the interpreter
passes float arguments (the EMA factor) as float32 (compiled kernels take them as float64).
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch

TESTS = str(Path(__file__).resolve().parents[1])
if TESTS not in sys.path:  # run as a script: sys.path[0] is tests/core
    sys.path.insert(0, TESTS)
from helpers import free_port, gloo_group  # noqa: E402

ESTIMATORS = ['classic', 'none', 'paper', 'paper_mean', 'wacv']
CASES = {}


def case(name):
    def register(fn):
        CASES[name] = fn
        return fn
    return register


F32 = dict(out=2e-5, buf=2e-6)
F64 = dict(out=1e-11, buf=1e-7)
BF16 = dict(out=2e-2, buf=2e-6)
F16 = dict(out=3e-3, buf=2e-6)


def _input(shape, dtype=torch.float32, seed=0, cl=False, mean=1.0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    bshape = [1, c] + [1] * (len(shape) - 2)
    spread = torch.linspace(-2, 3, c, dtype=torch.float64).view(bshape) * mean
    scale = torch.linspace(0.5, 2, c, dtype=torch.float64).view(bshape)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + spread).to(dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last if len(shape) == 4 else
                 torch.channels_last_3d)
    return x


def _randomize(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) + 0.5)
            layer.bias.copy_(torch.rand(layer.bias.shape, generator=g) * 2 - 1)
        if getattr(layer, 'running_var', None) is not None:
            layer.running_mean.copy_(torch.rand(layer.running_mean.shape, generator=g) - 0.5)
            layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=g) + 0.5)
        if hasattr(layer, 'reset_target'):
            layer.reset_target()
    return layer


def _step(layer, x, g, x_grad=True, expanded=False, call=None):
    """Forward (through ``call``, default the layer) and backward; results by name."""
    x = x.clone().requires_grad_(x_grad)
    layer.zero_grad(set_to_none=True)
    y = (call or layer)(x)
    if expanded:  # autograd hands the layer an expanded (stride-0) gradient
        y.float().sum().backward()
    else:
        (y.float() * g).sum().backward()
    out = {'y': y.detach()}
    if x_grad:
        out['x_grad'] = x.grad
    for name, p in layer.named_parameters():
        out[name + '.grad'] = p.grad
    for name, b in layer.named_buffers():
        out[name] = b.clone()
    return out


class Calls:
    """Counts the fast path's forward and backward passes."""
    forward = backward = 0


def _count_calls():
    from robustbn.fast import ops
    fwd, bwd = ops.forward_impl, ops.backward_impl

    def forward_impl(*a, **k):
        Calls.forward += 1
        return fwd(*a, **k)

    def backward_impl(*a, **k):
        Calls.backward += 1
        return bwd(*a, **k)
    ops.forward_impl, ops.backward_impl = forward_impl, backward_impl


@contextlib.contextmanager
def _tuning(**kw):
    """Small tiles and many splits: every loop and merge runs more than once."""
    from robustbn.fast import ops
    old = dict(ops.TUNING)
    ops.TUNING.update(kw)
    try:
        yield
    finally:
        ops.TUNING.clear()
        ops.TUNING.update(old)


TINY_TILES = dict(reduce_tile=16, affine_tile=32, programs_per_sm=16)
# The interpreter runs programs one after another: few partial rows when synchronized.
FEW_SYNC_ROWS = dict(sync_rows_x_channels=18)


def _close(key, a, b, tol):
    if a is None or b is None:
        assert a is None and b is None, f'{key}: {a is None} vs {b is None}'
        return
    assert a.dtype == b.dtype and a.shape == b.shape, f'{key}: {a.dtype}{tuple(a.shape)} ' \
        f'vs {b.dtype}{tuple(b.shape)}'
    assert a.stride() == b.stride(), f'{key}: strides {a.stride()} vs {b.stride()}'
    if not a.is_floating_point() or a.numel() == 0:
        assert torch.equal(a, b), f'{key}: {a} vs {b}'
        return
    err = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1)).item()
    assert err <= tol, f'{key}: normalized max error {err:.3g} > {tol:.1g}'


def compare(make, x, g, tol, steps=2, tuning=None, **step_kw):
    """make() -> layer; the fast path on it and the reference on a copy, `steps` times."""
    from robustbn import fast
    fast_layer = make()
    ref_layer = copy.deepcopy(fast_layer)
    before = Calls.forward, Calls.backward
    with fast.fast_path('on'), (_tuning(**tuning) if tuning else contextlib.nullcontext()):
        got = [_step(fast_layer, x * (1 + 0.5 * s), g, **step_kw) for s in range(steps)]
    assert Calls.forward - before[0] == steps, 'the fast path did not run'
    if step_kw.get('x_grad', True) or fast_layer.weight is not None:
        assert Calls.backward - before[1] == steps, 'the fast backward did not run'
    with fast.fast_path('off'):
        want = [_step(ref_layer, x * (1 + 0.5 * s), g, **step_kw) for s in range(steps)]
    for s, (a, b) in enumerate(zip(got, want)):
        assert a.keys() == b.keys(), f'{sorted(a)} vs {sorted(b)}'
        for key in a:
            is_buf = not (key in ('y', 'x_grad') or key.endswith('.grad'))
            # Buffers after a step feed the next: later steps get the buffer tolerance.
            t = tol['buf'] if is_buf or s > 0 and 'Gpre' in type(fast_layer).__name__ \
                else tol['out']
            _close(f'step {s} {key}', a[key], b[key], t)


def _jsbn(dim, c, est, dtype=torch.float32, **kw):
    from robustbn import JSBN1d, JSBN2d, JSBN3d
    cls = {2: JSBN1d, 3: JSBN1d, 4: JSBN2d, 5: JSBN3d}[dim]
    return lambda: _randomize(cls(c, estimator=est, **kw).to(dtype))


def _gprebn(c, est, dtype=torch.float32, **kw):
    from robustbn import GpreBN2d
    return lambda: _randomize(GpreBN2d(c, batch_estimator='sample' if est == 'none' else est,
                                       theta=0.7, **kw).to(dtype))


# ----------------------------------------------------------------------------- layer cases
for _est in ESTIMATORS:
    @case(f'nchw_f32_{_est}')
    def _(est=_est):
        x = _input((4, 6, 5, 7))
        compare(_jsbn(4, 6, est), x, torch.randn_like(x), F32)

    @case(f'channels_last_f32_{_est}')
    def _(est=_est):
        x = _input((4, 6, 5, 7), cl=True)
        compare(_jsbn(4, 6, est), x, torch.randn(x.shape), F32)

    @case(f'nchw_f64_tiny_tiles_{_est}')
    def _(est=_est):
        x = _input((3, 7, 4, 5), torch.float64)
        compare(_jsbn(4, 7, est, torch.float64), x, torch.randn_like(x), F64, tuning=TINY_TILES)

    @case(f'channels_last_f64_tiny_tiles_{_est}')
    def _(est=_est):
        x = _input((3, 7, 4, 5), torch.float64, cl=True)
        compare(_jsbn(4, 7, est, torch.float64), x, torch.randn(x.shape, dtype=torch.float64),
                F64, steps=1, tuning=TINY_TILES)

    @case(f'gprebn_f64_two_updates_{_est}')
    def _(est=_est):
        x = _input((4, 6, 3, 5), torch.float64)
        compare(_gprebn(6, est, torch.float64, update_source_stats=True), x,
                torch.randn_like(x), F64, tuning=TINY_TILES)

    @case(f'input_2d_3d_5d_{_est}')
    def _(est=_est):
        for shape, cl in (((9, 5), False), ((3, 7, 11), False), ((3, 4, 2, 3, 5), False),
                          ((3, 4, 2, 3, 5), True)):
            x = _input(shape, cl=cl)
            compare(_jsbn(len(shape), shape[1], est), x, torch.randn(x.shape), F32, steps=1)


@case('gprebn_channels_last_f32')
def _():
    x = _input((4, 6, 3, 5), cl=True)
    compare(_gprebn(6, 'paper'), x, torch.randn(x.shape), F32)


@case('bfloat16_and_float16_input')
def _():
    for dtype, tol in ((torch.bfloat16, BF16), (torch.float16, F16)):
        for cl in (False, True):
            x = _input((4, 6, 5, 7), cl=cl).to(dtype)
            compare(_jsbn(4, 6, 'paper'), x, torch.randn(x.shape), tol)


@case('bfloat16_parameters_float32_input')
def _():  # DeepSpeed casts parameters, not buffers
    x = _input((4, 6, 5, 7))

    def make():
        layer = _jsbn(4, 6, 'paper')()
        layer.weight.data = layer.weight.data.bfloat16()
        layer.bias.data = layer.bias.data.bfloat16()
        return layer
    compare(make, x, torch.randn_like(x), dict(out=1e-2, buf=2e-6))


@case('momentum_none_no_tracking_no_affine')
def _():
    x = _input((4, 6, 5, 7))
    g = torch.randn_like(x)
    compare(_jsbn(4, 6, 'paper', momentum=None), x, g, F32, steps=3)
    compare(_jsbn(4, 6, 'wacv', track_running_stats=False), x, g, F32)
    compare(_jsbn(4, 6, 'classic', affine=False), x, g, F32)


@case('few_channels_thresholds')
def _():
    for c in (1, 2, 3, 4, 5):
        x = _input((6, c, 3, 2), torch.float64)
        for est in ('paper', 'wacv', 'classic'):
            compare(_jsbn(4, c, est, torch.float64), x, torch.randn_like(x), F64, steps=1)


@case('constant_channel_and_zero_input')
def _():
    # A variance below eps makes the output scale with eps, which the interpreter passes
    # as float32 (relative rounding 2.5e-8): 1e-7 here.
    tol = dict(out=1e-7, buf=F64['buf'])
    x = _input((4, 6, 3, 5), torch.float64)
    x[:, 2] = 1.5  # v = 0: log clamp, no NaN
    for est in ESTIMATORS:
        compare(_jsbn(4, 6, est, torch.float64), x, torch.randn_like(x), tol)
    z = torch.zeros(4, 6, 3, 5, dtype=torch.float64)  # m = 0 and v = 0 everywhere
    for est in ESTIMATORS:
        compare(_jsbn(4, 6, est, torch.float64), z, torch.randn_like(z), tol, steps=1)


@case('two_values_per_channel')
def _():
    x = _input((2, 5))
    compare(_jsbn(2, 5, 'paper'), x, torch.randn_like(x), F32)


@case('large_mean_float32_matches_float64')
def _():
    """Mean 1e3, std 0.1: in float32, E[x^2] - E[x]^2 has rounding errors (ulp(1e6) = 0.06)
    larger than the variance (0.01); the kernels' Welford/Chan moments do not."""
    from robustbn import fast
    g = torch.Generator().manual_seed(0)
    x = 1e3 + 0.1 * torch.randn(16, 8, 6, 6, generator=g, dtype=torch.float64)
    x = (x + torch.linspace(0, 1, 8, dtype=torch.float64).view(1, 8, 1, 1)).float()
    for est in ESTIMATORS:
        for cl in (False, True):
            layer = _jsbn(4, 8, est)()
            ref = _jsbn(4, 8, est, torch.float64)()
            xx = x.to(memory_format=torch.channels_last) if cl else x
            with fast.fast_path('on'):
                y = layer(xx).double()
            with fast.fast_path('off'):
                want = ref(x.double())  # the same values, float64 reference
            _close(f'{est} y', y.contiguous(), want, 1e-3)
            for key in ('running_mean', 'running_var'):
                a, b = getattr(layer, key).double(), getattr(ref, key)
                err = ((a - b).abs() / b.abs()).max().item()
                assert err < 1e-4, f'{est} {key}: relative error {err:.2g}'



@case('no_input_gradient_and_non_contiguous_input')
def _():
    x = _input((4, 6, 5, 14))
    compare(_jsbn(4, 6, 'paper'), x, torch.randn_like(x), F32, x_grad=False)
    xs = x[..., ::2]
    assert not xs.is_contiguous()
    compare(_jsbn(4, 6, 'classic'), xs, torch.randn(xs.shape), F32)


@case('expanded_output_gradient')
def _():
    for cl in (False, True):
        x = _input((4, 6, 5, 7), cl=cl)
        compare(_jsbn(4, 6, 'paper'), x, None, F32, expanded=True)


@case('eval_with_batch_statistics')
def _():
    x = _input((4, 6, 5, 7))
    compare(lambda: _jsbn(4, 6, 'paper', eval_stats='batch')().eval(), x, torch.randn_like(x),
            F32)


@case('shrinkage_factors_recorded')
def _():
    from robustbn import fast
    x = _input((4, 6, 5, 7))
    out = []
    for mode in ('on', 'off'):
        layer = _jsbn(4, 6, 'classic')()
        layer.record_factors = True
        with fast.fast_path(mode):
            layer(x)
        out.append(layer.last_factors)
    _close('factors', out[0], out[1], 1e-5)


@case('functional_synchronized_one_rank_gloo')
def _():
    """The synchronized kernels' path (partials reduced or gathered, all-reduced copy of the
    sums) with an explicit one-rank group equals the local result, with exactly one
    collective forward (all_reduce, or all_gather in gather mode) and one all_reduce
    backward."""
    import torch.distributed as dist

    from robustbn import fast, get_estimator, shrunk_batch_norm
    calls = []
    saved = dist.all_gather_into_tensor, dist.all_reduce

    def counted(name, fn):
        def wrapper(*a, **k):
            calls.append(name)
            return fn(*a, **k)
        return wrapper
    with gloo_group(0, 1, free_port()):
        dist.all_gather_into_tensor = counted('all_gather', saved[0])
        dist.all_reduce = counted('all_reduce', saved[1])
        try:
            with _tuning(**FEW_SYNC_ROWS):
                for est in ESTIMATORS:
                    for cl, dtype, tols in ((False, torch.float64, F64),
                                            (True, torch.float32, F32)):
                        x = _input((4, 6, 5, 3), dtype, cl=cl)
                        g = torch.randn(x.shape, dtype=dtype)
                        res = []
                        for group, mode, sync in ((dist.group.WORLD, 'on', 'reduce'),
                                                  (dist.group.WORLD, 'on', 'gather'),
                                                  (None, 'off', 'reduce')):
                            calls.clear()
                            xx = x.clone().requires_grad_()
                            w = torch.linspace(0.5, 1.5, 6, dtype=dtype).requires_grad_()
                            b = torch.linspace(-1, 1, 6, dtype=dtype).requires_grad_()
                            rm, rv = torch.zeros(6, dtype=dtype), torch.ones(6, dtype=dtype)
                            with fast.fast_path(mode):
                                y = shrunk_batch_norm(xx, w, b, rm, rv, get_estimator(est), 1e-5,
                                                      0.1, group=group, sync_mode=sync)
                                (y * g).sum().backward()
                            res.append([y, xx.grad, w.grad, b.grad, rm, rv])
                            want = [] if group is None else \
                                ['all_gather' if sync == 'gather' else 'all_reduce', 'all_reduce']
                            assert calls == want, f'collectives {calls}, expected {want}'
                        for got in res[:2]:
                            for key, a, b_ in zip(('y', 'x_grad', 'w', 'b', 'rm', 'rv'), got,
                                                  res[2]):
                                _close(f'{est} {key}', a.detach(), b_.detach(),
                                       tols['buf' if key in ('rm', 'rv') else 'out'])
        finally:
            dist.all_gather_into_tensor, dist.all_reduce = saved


SYNC_SIZES = [3, 0, 4]  # uneven, one rank empty
SYNC_ESTIMATORS = ['classic', 'paper']  # the collectives do not depend on the estimator


def _sync_worker(rank, port, out_dir):
    import torch.distributed as dist

    from robustbn import SyncGpreBN, SyncJSBN, fast
    torch.set_num_threads(1)
    with gloo_group(rank, len(SYNC_SIZES), port, timeout=datetime.timedelta(seconds=120)):
        _count_calls()
        x, g = _sync_data()
        lo = sum(SYNC_SIZES[:rank])
        sl = slice(lo, lo + SYNC_SIZES[rank])
        res = {}
        with fast.fast_path('on'), _tuning(**FEW_SYNC_ROWS):
            for est in SYNC_ESTIMATORS:
                for name, layer in (('jsbn', SyncJSBN(6, estimator=est)),
                                    ('jsbn_gather', SyncJSBN(6, estimator=est,
                                                             sync_mode='gather')),
                                    ('gprebn', SyncGpreBN(6, batch_estimator=est,
                                                          update_source_stats=True))):
                    res[name, est] = _step(_randomize(layer.double()), x[sl], g[sl])
        assert Calls.forward == Calls.backward == 3 * len(SYNC_ESTIMATORS)
        torch.save(res, os.path.join(out_dir, f'rank{rank}.pt'))
        dist.barrier()


def _sync_data():
    x = _input((sum(SYNC_SIZES), 6, 3, 4), torch.float64, seed=5)
    return x, torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))


@case('synchronized_three_ranks_gloo')
def _():
    """SyncJSBN/SyncGpreBN over 3 gloo processes (batches 3, 0, 4) on the fast path equal
    JSBN/GpreBN on the concatenated batch on the reference path."""
    import torch.multiprocessing as mp

    from robustbn import GpreBN2d, JSBN2d, fast
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_sync_worker, args=(free_port(), out_dir), nprocs=len(SYNC_SIZES), join=True)
        ranks = [torch.load(os.path.join(out_dir, f'rank{r}.pt'), weights_only=False)
                 for r in range(len(SYNC_SIZES))]
    x, g = _sync_data()
    with fast.fast_path('off'):
        for est in SYNC_ESTIMATORS:
            for name, layer in (('jsbn', JSBN2d(6, estimator=est)),
                                ('jsbn_gather', JSBN2d(6, estimator=est)),
                                ('gprebn', GpreBN2d(6, batch_estimator=est,
                                                    update_source_stats=True))):
                want = _step(_randomize(layer.double()), x, g)
                lo = 0
                for r, size in enumerate(SYNC_SIZES):
                    got = ranks[r][name, est]
                    for key in want:
                        if key in ('y', 'x_grad'):
                            _close(f'{name} {est} rank {r} {key}', got[key],
                                   want[key][lo:lo + size], F64['out'])
                        elif not key.endswith('.grad'):
                            _close(f'{name} {est} rank {r} {key}', got[key], want[key],
                                   F64['buf'])
                    lo += size
                for key in ('weight.grad', 'bias.grad'):  # local contributions sum up
                    _close(f'{name} {est} {key}', sum(rk[name, est][key] for rk in ranks),
                           want[key], F64['out'])


@case('torch_compile_aot_eager_fullgraph')
def _():
    """torch.compile (custom ops, running statistics updated outside the kernel) equals
    eager, without graph breaks; GpreBN's default target_init='first_batch' reads its flag
    on the host once (a graph break, so without fullgraph) and equals eager too."""
    from torch import nn

    from robustbn import GpreBN2d, JSBN2d, fast

    def make(target_init):
        torch.manual_seed(0)
        gprebn = GpreBN2d(5, batch_estimator='wacv', update_source_stats=True,
                          target_init=target_init)
        return nn.Sequential(nn.Conv2d(3, 6, 3), JSBN2d(6, estimator='paper'), nn.ReLU(),
                             nn.Conv2d(6, 5, 1), _randomize(gprebn))
    x = _input((2, 3, 6, 7))
    for target_init, fullgraph in (('source', True), ('first_batch', False)):
        eager, compiled = make(target_init), make(target_init)
        with fast.fast_path('on'):
            fn = torch.compile(compiled, backend='aot_eager', fullgraph=fullgraph)
            before = Calls.forward
            for step in range(2):
                a = _step(eager, x, None, expanded=True)
                b = _step(compiled, x, None, expanded=True, call=fn)
                for key in a:
                    _close(f'{target_init} step {step} {key}', b[key], a[key], 2e-5)
            # eager: 2 layers x 2 steps; compiled: the custom ops call forward_impl as well
            assert Calls.forward - before == 8, 'the compiled model did not use the fast path'


def main(names):
    import time
    _count_calls()
    results = {}
    for name in names:
        try:
            start = time.time()
            CASES[name]()
            print(f'{name}: {time.time() - start:.1f}s', file=sys.stderr)
            results[name] = None
        except Exception:  # reported per case by the parent test
            results[name] = traceback.format_exc(limit=4)
    print(json.dumps(results))


if __name__ == '__main__':
    assert os.environ.get('TRITON_INTERPRET') == '1', 'run with TRITON_INTERPRET=1'
    main(sys.argv[1:] or list(CASES))
