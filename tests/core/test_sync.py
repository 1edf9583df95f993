"""SyncJSBN across gloo processes (CPU) equals JSBN on the concatenated global batch.

One spawn per world size and synchronization mode (1 to 4 processes, uneven per-rank
batches, one of them empty; ``sync_mode`` 'reduce', the default, and 'gather') runs every
estimator and every check in each rank and saves the local results;
the parent computes the JSBN1d/2d/3d reference on the concatenated batch and compares:
outputs and input gradients (each rank's slice), weight/bias gradients (sum over ranks,
each rank returns its local contribution like torch's SyncBatchNorm), running stats and
num_batches_tracked (identical on every rank), eval with eval_stats='batch' (synced batch
statistics, no update) and 'running' (F.batch_norm, no collective), momentum=None.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import free_port, gloo_group

from robustbn import ESTIMATORS, JSBN1d, JSBN2d, JSBN3d, SyncJSBN, lean

C = 6
EPS = 1e-5
EST_NAMES = list(ESTIMATORS)
SYNC_TOL = dict(atol=1e-6, rtol=1e-6)
WORLD1_TOL = dict(atol=1e-12, rtol=1e-12)  # one rank: the very same local code path
EXACT = dict(atol=0.0, rtol=0.0)

# Per-channel means with a large spread (shrinkage of the means is active for every
# estimator) and per-channel scales far apart (shrinkage of the variances too).
CH_MEAN = [-2.0, -0.5, 0.5, 1.5, 3.0, 4.5]
CH_STD = [0.5, 1.0, 1.5, 0.7, 2.0, 1.2]

# (case, input tail after (N, C), momentum, eval_stats, data seeds: one per step)
TRAIN_4D = ('train', (3, 3), 0.1, 'running', (100, 101))
EVAL_BATCH = ('eval_batch', (3, 3), 0.1, 'batch', (200,))
EVAL_RUNNING_SEED = 300
TRAIN_1D = ('1d', (), 0.1, 'running', (400,))
TRAIN_3D = ('3d', (2, 2, 2), 0.1, 'running', (500,))
CUMAVG = ('cumavg', (3, 3), None, 'running', (600, 601, 602))

WORLDS = {1: [4], 2: [3, 5], 3: [2, 0, 4], 4: [3, 0, 1, 4]}  # per-rank batch sizes
# (world, sync_mode, lean) of the spawns: the default everywhere, the gather mode at 2 and
# 3, and once the per-layer scalars on the device (lean=False, as on a GPU)
SPAWNS = [(1, 'reduce', True), (2, 'reduce', True), (2, 'gather', True), (3, 'reduce', True),
          (3, 'gather', True), (4, 'reduce', True), (3, 'reduce', False)]


# ----------------------------------------------------------------------------- helpers
def _data(n_total: int, tail, seed: int):
    """Global input x (n_total, C, *tail) and loss weights g, float64, deterministic."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n_total, C) + tuple(tail)
    bc = [1, C] + [1] * len(tail)
    z = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = z * torch.tensor(CH_STD, dtype=torch.float64).view(bc) \
        + torch.tensor(CH_MEAN, dtype=torch.float64).view(bc)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x, g


def _local(t: torch.Tensor, sizes, rank: int) -> torch.Tensor:
    return torch.split(t, list(sizes))[rank]


def _init_state(seed: int = 7):
    """Non-trivial weight, bias and running buffers shared by a layer and its reference."""
    gen = torch.Generator().manual_seed(seed)
    kw = dict(generator=gen, dtype=torch.float64)
    return {
        'weight': 1.0 + 0.5 * torch.randn(C, **kw),
        'bias': torch.randn(C, **kw),
        'running_mean': torch.randn(C, **kw),
        'running_var': 0.5 + 1.5 * torch.rand(C, **kw),
        'num_batches_tracked': torch.tensor(0, dtype=torch.long),
    }


def _layer(sync: bool, ndim: int, estimator: str, momentum, eval_stats: str,
           sync_mode: str = 'reduce'):
    kw = dict(eps=EPS, momentum=momentum, estimator=estimator, eval_stats=eval_stats)
    if sync:
        layer = SyncJSBN(C, sync_mode=sync_mode, **kw)
    else:
        layer = {2: JSBN1d, 4: JSBN2d, 5: JSBN3d}[ndim](C, **kw)
    layer = layer.double()
    layer.load_state_dict(_init_state())
    return layer


def _buffers(layer):
    return {k: getattr(layer, k).detach().clone()
            for k in ('running_mean', 'running_var', 'num_batches_tracked')}


def _steps(layer, sizes, rank: int, tail, seeds):
    """Forward/backward of (y * g).sum() for each seed on this rank's slice; all results."""
    n_total = sum(sizes)
    out = {'y': [], 'x_grad': [], 'w_grad': [], 'b_grad': [], 'buffers': []}
    for seed in seeds:
        x, g = _data(n_total, tail, seed)
        x = _local(x, sizes, rank).clone().requires_grad_(True)
        g = _local(g, sizes, rank)
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        (y * g).sum().backward()
        out['y'].append(y.detach().clone())
        out['x_grad'].append(x.grad.detach().clone())
        out['w_grad'].append(layer.weight.grad.detach().clone())
        out['b_grad'].append(layer.bias.grad.detach().clone())
        out['buffers'].append(_buffers(layer))
    return out


@contextlib.contextmanager
def _no_collectives():
    """Any collective called inside raises (instead of hanging the other ranks)."""
    names = ('all_gather_into_tensor', 'all_gather', 'all_reduce', 'broadcast',
             'reduce_scatter_tensor', 'all_to_all_single', 'barrier')
    saved = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def forbid(name):
        def f(*args, **kwargs):
            raise AssertionError(f'unexpected collective torch.distributed.{name}')
        return f

    try:
        for n in saved:
            setattr(dist, n, forbid(n))
        yield
    finally:
        for n, fn in saved.items():
            setattr(dist, n, fn)


def _compute(sizes, rank: int, sync: bool, mode: str = 'reduce'):
    """Every case for every estimator, on this rank's slice (reference: sizes=[N], rank 0).

    sync=True uses SyncJSBN (``sync_mode=mode``) for all input dims, sync=False
    JSBN1d/2d/3d.
    """
    res = {}
    for est in EST_NAMES:
        for case, tail, momentum, eval_stats, seeds in (TRAIN_4D, TRAIN_1D, TRAIN_3D, CUMAVG):
            layer = _layer(sync, 2 + len(tail), est, momentum, eval_stats, mode)
            res[case, est] = _steps(layer.train(), sizes, rank, tail, seeds)
            if case == 'train':
                # Default eval_stats='running': F.batch_norm with the running stats, so
                # no collective may happen (each rank can evaluate on its own).
                x, _ = _data(sum(sizes), tail, EVAL_RUNNING_SEED)
                layer.eval()
                with torch.no_grad(), _no_collectives():
                    y = layer(_local(x, sizes, rank))
                res['eval_running', est] = {'y': y.clone(), 'buffers': _buffers(layer)}
        case, tail, momentum, eval_stats, seeds = EVAL_BATCH
        layer = _layer(sync, 2 + len(tail), est, momentum, eval_stats, mode).eval()
        res[case, est] = _steps(layer, sizes, rank, tail, seeds)
    return res


def _world_size_one_value_error():
    """The message of the ValueError for a (1, C, 1, 1) training batch, or None."""
    layer = _layer(True, 4, 'paper', 0.1, 'running').train()
    try:
        layer(torch.randn(1, C, 1, 1, dtype=torch.float64))
    except ValueError as e:
        return str(e)
    return None


# float32 input with mean 1e3 and std 0.1 (E[x^2] - E[x]^2 in float32 would be all
# rounding: ulp(1e6) = 0.06): the synchronized statistics within 1e-3 of float64's.
NUMERICS_SEED = 700


def _large_mean_data(n_total: int):
    gen = torch.Generator().manual_seed(NUMERICS_SEED)
    return 1e3 + 0.1 * torch.randn(n_total, C, 5, 5, generator=gen, dtype=torch.float64)


def _large_mean_numerics(sizes, rank: int, mode: str):
    """This rank's float32 output and the running statistics after one step ('none')."""
    layer = SyncJSBN(C, estimator='none', momentum=1.0, sync_mode=mode).train()
    y = layer(_local(_large_mean_data(sum(sizes)), sizes, rank).float())
    return {'y': y.detach(), 'mean': layer.running_mean.clone(),
            'var': layer.running_var.clone()}


def _worker(rank: int, world: int, port: int, sizes, mode: str, on: bool, out_dir: str):
    torch.set_num_threads(1)
    with gloo_group(rank, world, port, timeout=datetime.timedelta(seconds=60)), \
            lean.lean_path(on):
        if world == 1:
            # One rank: SyncJSBN must take the local path (no collective at all).
            with _no_collectives():
                res = _compute(sizes, rank, sync=True, mode=mode)
                res['value_error'] = _world_size_one_value_error()
        else:
            res = _compute(sizes, rank, sync=True, mode=mode)
            res['numerics'] = _large_mean_numerics(sizes, rank, mode)
        torch.save(res, os.path.join(out_dir, f'rank{rank}.pt'))
        dist.barrier()


def _close(failures, label, actual, expected, tol):
    try:
        torch.testing.assert_close(actual, expected, **tol)
    except AssertionError as e:
        failures.append(f'{label}: {e}')


def _report(failures, what):
    assert not failures, f'{len(failures)} mismatch(es) in {what}:\n\n' + '\n\n'.join(failures)


def _compare_steps(failures, label, ranks, ref, sizes, tol,
                   keys=('y', 'x_grad', 'params', 'buffers')):
    """ranks: per-rank results of _steps; ref: reference _steps on the global batch."""
    for s in range(len(ref['y'])):
        for key in ('y', 'x_grad'):
            if key not in keys:
                continue
            for r, res in enumerate(ranks):
                _close(failures, f'{label} step {s} rank {r} {key}', res[key][s],
                       _local(ref[key][s], sizes, r), tol)
        if 'params' in keys:
            for key in ('w_grad', 'b_grad'):
                total = sum(res[key][s] for res in ranks)
                _close(failures, f'{label} step {s} {key} summed over ranks', total,
                       ref[key][s], tol)
        if 'buffers' in keys:
            for name, want in ref['buffers'][s].items():
                for r, res in enumerate(ranks):
                    _close(failures, f'{label} step {s} rank {r} {name}',
                           res['buffers'][s][name], want, tol)
                    if not torch.equal(res['buffers'][s][name], ranks[0]['buffers'][s][name]):
                        failures.append(f'{label} step {s} {name}: rank {r} differs from rank 0')


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def reference():
    """JSBN1d/2d/3d on the concatenated global batch, per total batch size."""
    cache = {}

    def get(n_total):
        if n_total not in cache:
            cache[n_total] = _compute([n_total], 0, sync=False)
        return cache[n_total]
    return get


@pytest.fixture(scope='module', params=SPAWNS,
                ids=lambda p: f'world{p[0]}-{p[1]}' + ('' if p[2] else '-device-scalars'))
def synced(request, tmp_path_factory):
    """(world, sizes, per-rank results) from one spawn of `world` gloo processes."""
    world, mode, on = request.param
    sizes = WORLDS[world]
    out_dir = tmp_path_factory.mktemp(f'sync_world{world}_{mode}_{on}')
    mp.spawn(_worker, args=(world, free_port(), sizes, mode, on, str(out_dir)), nprocs=world,
             join=True)
    ranks = [torch.load(out_dir / f'rank{r}.pt', weights_only=False) for r in range(world)]
    return world, sizes, ranks


def _tol(world):
    return WORLD1_TOL if world == 1 else SYNC_TOL


# ----------------------------------------------------------------------------- tests
def test_data_makes_shrinkage_active():
    """Sanity of the test data: every estimator but 'none' changes the batch statistics."""
    failures = []
    for n_total in {sum(s) for s in WORLDS.values()}:
        for tail, seed in (((3, 3), 100), ((), 400), ((2, 2, 2), 500), ((3, 3), 600)):
            x, _ = _data(n_total, tail, seed)
            dims = [0] + list(range(2, x.dim()))
            v, m = torch.var_mean(x, dim=dims, correction=0)
            n = x.numel() // C
            for est, fn in ESTIMATORS.items():
                mu, var = fn(m, v, n)
                dm = (mu - m).abs().max().item()
                dv = (var - v).abs().max().item()
                tag = f'N={n_total} tail={tail} {est}'
                if est == 'none':
                    if dm or dv:
                        failures.append(f'{tag}: none changed the statistics')
                    continue
                if dm < 1e-4 or mu.std().item() < 1e-3:
                    failures.append(f'{tag}: mean shrinkage inactive or total (|dm|={dm:.2e})')
                if est != 'paper_mean' and dv < 1e-4:
                    failures.append(f'{tag}: variance shrinkage inactive (|dv|={dv:.2e})')
    _report(failures, 'test data')


def test_sync_training_matches_concatenated_batch(synced, reference):
    """2 training steps: outputs, input grads, summed weight/bias grads, running stats."""
    world, sizes, ranks = synced
    ref = reference(sum(sizes))
    failures = []
    for est in EST_NAMES:
        _compare_steps(failures, f'world={world} sizes={sizes} {est!r} 4D train',
                       [r['train', est] for r in ranks], ref['train', est], sizes, _tol(world))
    _report(failures, f'SyncJSBN training across {world} process(es)')


def test_sync_eval_batch_stats_match_concatenated_batch(synced, reference):
    """eval_stats='batch' in eval mode: synced batch statistics, running stats untouched."""
    world, sizes, ranks = synced
    ref = reference(sum(sizes))
    init = _init_state()
    failures = []
    for est in EST_NAMES:
        label = f'world={world} sizes={sizes} {est!r} eval_stats=batch'
        _compare_steps(failures, label, [r['eval_batch', est] for r in ranks],
                       ref['eval_batch', est], sizes, _tol(world))
        for r, res in enumerate(ranks):
            for name, got in res['eval_batch', est]['buffers'][0].items():
                if not torch.equal(got, init[name]):
                    failures.append(f'{label} rank {r}: {name} changed in eval mode')
    _report(failures, f'SyncJSBN eval_stats=batch across {world} process(es)')


def test_sync_eval_running_is_plain_batch_norm(synced, reference):
    """Default eval: each rank's output is F.batch_norm with its (synced) running stats."""
    world, sizes, ranks = synced
    ref = reference(sum(sizes))
    init = _init_state()
    x, _ = _data(sum(sizes), (3, 3), EVAL_RUNNING_SEED)
    failures = []
    for est in EST_NAMES:
        label = f'world={world} sizes={sizes} {est!r} eval_stats=running'
        trained = ref['train', est]['buffers'][-1]
        for r, res in enumerate(ranks):
            got = res['eval_running', est]
            buf = got['buffers']
            for name in buf:
                if not torch.equal(buf[name], res['train', est]['buffers'][-1][name]):
                    failures.append(f'{label} rank {r}: {name} changed in eval mode')
            expected = F.batch_norm(_local(x, sizes, r), buf['running_mean'], buf['running_var'],
                                    init['weight'], init['bias'], False, 0.0, EPS)
            _close(failures, f'{label} rank {r} y vs F.batch_norm', got['y'], expected, EXACT)
            _close(failures, f'{label} rank {r} y vs JSBN2d eval', got['y'],
                   _local(ref['eval_running', est]['y'], sizes, r), _tol(world))
            _close(failures, f'{label} rank {r} running_mean', buf['running_mean'],
                   trained['running_mean'], _tol(world))
    _report(failures, f'SyncJSBN eval_stats=running across {world} process(es)')


def test_sync_2d_and_5d_input(synced, reference):
    """(N, C) and (N, C, D, H, W) input: output and input grad equal JSBN1d / JSBN3d."""
    world, sizes, ranks = synced
    ref = reference(sum(sizes))
    failures = []
    for case, name in (('1d', 'JSBN1d (N, C)'), ('3d', 'JSBN3d (N, C, 2, 2, 2)')):
        for est in EST_NAMES:
            _compare_steps(failures, f'world={world} sizes={sizes} {est!r} {name}',
                           [r[case, est] for r in ranks], ref[case, est], sizes, _tol(world),
                           keys=('y', 'x_grad'))
    _report(failures, f'SyncJSBN 2D/5D input across {world} process(es)')


def test_sync_cumulative_average_momentum_none(synced, reference):
    """momentum=None: cumulative running averages over 3 steps equal the reference's."""
    world, sizes, ranks = synced
    ref = reference(sum(sizes))
    failures = []
    for est in EST_NAMES:
        _compare_steps(failures, f'world={world} sizes={sizes} {est!r} momentum=None',
                       [r['cumavg', est] for r in ranks], ref['cumavg', est], sizes,
                       _tol(world), keys=('buffers',))
    for r in ranks:  # the bookkeeping itself, not only agreement with the reference
        nbt = r['cumavg', 'paper']['buffers'][-1]['num_batches_tracked']
        assert nbt.item() == 3, f'num_batches_tracked after 3 steps is {nbt.item()}, not 3'
    _report(failures, f'SyncJSBN momentum=None across {world} process(es)')


def test_world_size_one_value_error(synced):
    world, sizes, ranks = synced
    if world != 1:
        pytest.skip('only a single-process group rejects one value per channel locally')
    msg = ranks[0]['value_error']
    assert msg is not None, 'SyncJSBN in a 1-process group accepted a (1, C, 1, 1) training batch'
    assert 'more than 1 value per channel' in msg, msg


def test_no_process_group_is_jsbn(reference):
    """Without torch.distributed initialized, SyncJSBN is exactly JSBN1d/2d/3d."""
    assert not dist.is_initialized(), 'a process group is initialized in the test process'
    n_total = 6
    ref = reference(n_total)
    with _no_collectives():
        got = _compute([n_total], 0, sync=True)
    failures = []
    for (case, est), want in ref.items():
        label = f'no process group {est!r} {case}'
        if case == 'eval_running':
            _close(failures, f'{label} y', got[case, est]['y'], want['y'], EXACT)
        else:
            _compare_steps(failures, label, [got[case, est]], want, [n_total], EXACT)
    _report(failures, 'SyncJSBN without a process group')

    x = torch.randn(1, C, 1, 1, dtype=torch.float64)
    for layer in (_layer(True, 4, 'paper', 0.1, 'running'),
                  _layer(False, 4, 'paper', 0.1, 'running')):
        with pytest.raises(ValueError, match='more than 1 value per channel'):
            layer.train()(x)
    # In eval with running stats a single value per channel is fine (no batch statistics).
    _layer(True, 4, 'paper', 0.1, 'running').eval()(x)


def test_sync_large_mean_float32_numerics(synced):
    """Mean 1e3, std 0.1, float32 through the synchronized path: statistics and output
    within 1e-3 (relative) of float64 batch norm on the concatenated batch."""
    world, sizes, ranks = synced
    if world == 1:
        pytest.skip('one rank takes the local path (tests/core/test_jsbn.py)')
    x = _large_mean_data(sum(sizes)).float().double()  # the float32 input, exactly
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=1)
    want = F.batch_norm(x, None, None, training=True, eps=EPS)
    failures = []
    for r, res in enumerate(ranks):
        got = res['numerics']
        _close(failures, f'rank {r} running_var', got['var'].double(), var,
               dict(rtol=1e-3, atol=0))
        _close(failures, f'rank {r} running_mean', got['mean'].double(), mean,
               dict(rtol=1e-6, atol=0))
        _close(failures, f'rank {r} y', got['y'].double(), _local(want, sizes, r),
               dict(rtol=1e-3, atol=1e-3))
    _report(failures, f'large-mean float32 statistics across {world} processes')
