"""mmengine checkpoints of robustbn models under torch's default ``weights_only=True``.

``import robustbn`` (robustbn/compat.py) allow-lists what an mmengine 0.10.7 Runner
checkpoint holds beyond torch's defaults. These tests check that a by-iteration Runner
resumes exactly from such a checkpoint, and that the allow-list opens nothing else: its
``builtins.getattr`` only resolves HistoryBuffer's statistics methods, and unlisted
globals are still refused. mmengine only; no mmseg, no GPU.
"""
import copy
import io
import os
import pickle

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import Dataset

import robustbn  # noqa: F401  (registers the weights_only allow-list)
from robustbn import JSBN1d
from robustbn.openmmlab.compat import MMENGINE_SAFE_GLOBALS, history_buffer_getattr

N = 6          # iterations of the first run; the resumed run goes on to 2 * N
INTERVAL = 2   # CheckpointHook interval (iterations)
SEED = 2024
IN, HID, OUT = 5, 8, 3


# --------------------------------------------------------------------------- helpers
class ToyDataset(Dataset):
    """A fixed in-memory regression set (generated from its own RNG, not the global one)."""

    def __init__(self, n=40):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, IN, generator=g) * 2 + 1
        self.y = torch.randn(n, OUT, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return dict(inputs=self.x[i], labels=self.y[i])


class ToyModel(BaseModel):
    """Linear -> JSBN1d -> ReLU -> Linear, MSE loss."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(IN, HID)
        self.norm = JSBN1d(HID)
        self.fc2 = nn.Linear(HID, OUT)

    def forward(self, inputs, labels=None, mode='tensor'):
        out = self.fc2(torch.relu(self.norm(self.fc1(inputs))))
        if mode == 'loss':
            return dict(loss=nn.functional.mse_loss(out, labels))
        if mode == 'predict':
            return out
        return out


def make_runner(work_dir, name, max_iters, resume=False, load_from=None):
    torch.manual_seed(SEED)  # the model is built before the Runner seeds anything
    model = ToyModel()
    # Give the affine parameters non-trivial values so they are not all 1 / 0.
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    return Runner(
        model=model,
        work_dir=str(work_dir),
        experiment_name=name,  # unique: MessageHub/Visualizer instances are per name
        train_dataloader=dict(
            dataset=ToyDataset(),
            sampler=dict(type='InfiniteSampler', shuffle=True),
            collate_fn=dict(type='default_collate'),
            batch_size=4,
            num_workers=0),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9,
                                          weight_decay=1e-4)),
        param_scheduler=[
            dict(type='LinearLR', start_factor=0.2, by_epoch=False, begin=0, end=N // 2),
            # An explicit end: mmengine would otherwise end it at *this* Runner's max_iters,
            # so the N-iteration run would checkpoint a scheduler that stops at N.
            dict(type='MultiStepLR', milestones=[N + N // 2], gamma=0.5, by_epoch=False,
                 begin=0, end=2 * N),
        ],
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=INTERVAL, by_epoch=False),
            logger=dict(type='LoggerHook', interval=1)),
        log_processor=dict(by_epoch=False),
        randomness=dict(seed=SEED),
        resume=resume,
        load_from=load_from,
        default_scope='mmengine',
    )


def assert_state_equal(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, torch.Tensor):
            assert va.dtype == vb.dtype and va.shape == vb.shape, f'{what}: {k}'
            if va.is_floating_point():
                assert torch.allclose(va, vb, rtol=1e-6, atol=1e-7), f'{what}: {k}'
            else:
                assert torch.equal(va, vb), f'{what}: {k}'
        else:
            assert va == vb, f'{what}: {k}'


def assert_optim_state_equal(a, b):
    assert a['param_groups'] == b['param_groups']
    assert a['state'].keys() == b['state'].keys()
    assert len(a['state']) == 6  # momentum buffers: fc1, norm (affine), fc2: weight, bias
    for k in a['state']:
        assert_state_equal(a['state'][k], b['state'][k], f'optimizer state {k}')


def scalars(hub):
    return {k: (v.data[0].copy(), v.data[1].copy()) for k, v in hub.log_scalars.items()}


@pytest.fixture
def torch_load_spy(monkeypatch):
    """Record every torch.load call and check it runs with weights_only=True (the default)."""
    monkeypatch.delenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', raising=False)
    monkeypatch.delenv('TORCH_FORCE_WEIGHTS_ONLY_LOAD', raising=False)
    real_load = torch.load
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get('weights_only'))
        assert kwargs.get('weights_only') in (None, True), 'weights_only must stay on'
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, 'load', spy)
    return calls


@pytest.fixture
def without_compat_globals():
    """Temporarily remove robustbn's safe globals (restored afterwards)."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


def _dumps(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


# ---------------------------------------------------------------- resume == uninterrupted
@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """(first N-iteration run, resumed run to 2N, uninterrupted 2N run), all trained."""
    root = tmp_path_factory.mktemp('runs')
    interrupted = root / 'interrupted'
    first = make_runner(interrupted, 'first', N)
    first.train()
    first_hub = scalars(first.message_hub)
    first_state = copy.deepcopy(first.model.state_dict())
    first_last = (interrupted / 'last_checkpoint').read_text().strip()

    mp = pytest.MonkeyPatch()
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get('weights_only'))
        return real_load(*args, **kwargs)

    mp.delenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', raising=False)
    mp.setattr(torch, 'load', spy)
    try:
        resumed = make_runner(interrupted, 'resumed', 2 * N, resume=True)
        resumed.train()
    finally:
        mp.undo()

    straight = make_runner(root / 'straight', 'straight', 2 * N)
    straight.train()
    return dict(root=root, first=first, first_hub=first_hub, first_state=first_state,
                first_last=first_last,
                resumed=resumed, straight=straight, load_calls=calls)


def test_first_run_saves_checkpoints(runs):
    work_dir = runs['root'] / 'interrupted'
    for it in range(INTERVAL, N + 1, INTERVAL):
        assert (work_dir / f'iter_{it}.pth').is_file()
    assert runs['first_last'].endswith(f'iter_{N}.pth')  # what resume=True picks up
    assert runs['first'].iter == N
    # The resumed run went on saving into the same work_dir.
    for it in range(N + INTERVAL, 2 * N + 1, INTERVAL):
        assert (work_dir / f'iter_{it}.pth').is_file()


def test_resume_loads_with_weights_only_default(runs):
    # The resumed Runner read its checkpoint through torch.load, without weights_only=False.
    assert runs['load_calls'], 'resume did not go through torch.load'
    assert all(w in (None, True) for w in runs['load_calls'])
    resumed = runs['resumed']
    assert resumed._has_loaded
    assert resumed.iter == 2 * N
    assert resumed.train_loop.iter == 2 * N


def test_checkpoint_needs_the_compat_globals(runs, without_compat_globals):
    """Without robustbn's allow-list the same checkpoint is refused: the default load is
    really the weights_only one, and compat is what makes the resume work."""
    ckpt = runs['root'] / 'interrupted' / f'iter_{N}.pth'
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt)


def test_checkpoint_unsafe_globals_are_all_listed(runs):
    ckpt = runs['root'] / 'interrupted' / f'iter_{N}.pth'
    # Only globals outside the allow-list are reported, so list them without it.
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(ckpt))
    finally:
        torch.serialization.add_safe_globals(saved)
    assert not torch.serialization.get_unsafe_globals_in_checkpoint(ckpt)  # all covered now
    listed = set()
    for g in MMENGINE_SAFE_GLOBALS:
        if isinstance(g, tuple):
            listed.add(g[1])
        else:
            listed.add(f'{g.__module__}.{g.__qualname__}')
    assert unsafe, 'expected mmengine globals (HistoryBuffer, numpy) in a Runner checkpoint'
    assert unsafe <= listed, unsafe - listed
    assert 'builtins.getattr' in unsafe  # HistoryBuffer pickles getattr(HistoryBuffer, 'min')


def test_resumed_equals_uninterrupted_weights_and_buffers(runs):
    resumed = runs['resumed'].model.state_dict()
    straight = runs['straight'].model.state_dict()
    assert_state_equal(resumed, straight, 'model state')
    # The running statistics really moved and were counted over all 2N iterations.
    assert int(resumed['norm.num_batches_tracked']) == 2 * N
    assert not torch.allclose(resumed['norm.running_mean'], torch.zeros(HID))
    assert not torch.allclose(resumed['norm.running_var'], torch.ones(HID))
    # ... and training went on after the resume (not just a copy of the N-iteration state).
    assert not torch.allclose(resumed['fc1.weight'], runs['first_state']['fc1.weight'])
    assert not torch.allclose(resumed['norm.running_mean'],
                              runs['first_state']['norm.running_mean'])
    assert not torch.allclose(resumed['norm.weight'], runs['first_state']['norm.weight'])


def test_resumed_equals_uninterrupted_optimizer_and_scheduler(runs):
    r, s = runs['resumed'], runs['straight']
    assert_optim_state_equal(r.optim_wrapper.state_dict(), s.optim_wrapper.state_dict())
    lrs = [g['lr'] for g in r.optim_wrapper.param_groups]
    assert lrs == [g['lr'] for g in s.optim_wrapper.param_groups]
    assert lrs[0] == pytest.approx(0.05 * 0.5)  # warmup done, MultiStepLR milestone passed
    assert len(r.param_schedulers) == len(s.param_schedulers) == 2
    for a, b in zip(r.param_schedulers, s.param_schedulers):
        assert a.state_dict() == b.state_dict()


def test_message_hub_history_round_trips(runs):
    # The checkpoint's message hub holds HistoryBuffers equal to the first run's at iter N.
    ckpt = torch.load(runs['root'] / 'interrupted' / f'iter_{N}.pth')  # weights_only
    assert ckpt['meta']['iter'] == N
    assert ckpt['meta']['seed'] == SEED
    log_scalars = ckpt['message_hub']['log_scalars']
    assert 'train/loss' in log_scalars and 'train/lr' in log_scalars
    first_hub = runs['first_hub']
    for key, buf in log_scalars.items():
        assert isinstance(buf, HistoryBuffer)
        np.testing.assert_array_equal(buf.data[0], first_hub[key][0])
        np.testing.assert_array_equal(buf.data[1], first_hub[key][1])
        # The pickled getattr(HistoryBuffer, <method>) came back as the real methods.
        assert buf._statistics_methods['min'] is HistoryBuffer.min
        assert buf.statistics('mean') == pytest.approx(first_hub[key][0].mean())
    assert len(log_scalars['train/loss'].data[0]) == N

    # After the resume the hub continued the loaded history: the resumed run's full
    # 2N-iteration history equals the uninterrupted one.
    resumed, straight = scalars(runs['resumed'].message_hub), scalars(runs['straight'].message_hub)
    for key in ('train/loss', 'train/lr'):
        assert len(resumed[key][0]) == 2 * N
        np.testing.assert_allclose(resumed[key][0], straight[key][0], rtol=1e-6)
        np.testing.assert_array_equal(resumed[key][1], straight[key][1])
        np.testing.assert_array_equal(resumed[key][0][:N], first_hub[key][0])


def test_message_hub_state_dict_round_trips(tmp_path):
    hub = MessageHub.get_instance('robustbn_roundtrip_src')
    for i in range(5):
        hub.update_scalar('train/loss', np.float64(1.0 / (i + 1)))
        hub.update_scalar('train/count', np.int64(i), count=2)
    hub.update_info('iter', 5)
    path = tmp_path / 'hub.pth'
    torch.save(dict(message_hub=hub.state_dict()), path)
    loaded = torch.load(path)  # weights_only=True by default
    hub2 = MessageHub.get_instance('robustbn_roundtrip_dst')
    hub2.load_state_dict(loaded['message_hub'])
    for key in ('train/loss', 'train/count'):
        a, b = hub.get_scalar(key), hub2.get_scalar(key)
        np.testing.assert_array_equal(a.data[0], b.data[0])
        np.testing.assert_array_equal(a.data[1], b.data[1])
        for stat in ('min', 'max', 'mean', 'current'):
            assert a.statistics(stat) == b.statistics(stat)
    assert hub2.get_info('iter') == 5


def test_resume_through_load_from(tmp_path, runs, torch_load_spy):
    """load_from + resume=True (an explicit checkpoint) resumes the same way."""
    ckpt = runs['root'] / 'interrupted' / f'iter_{N}.pth'
    runner = make_runner(tmp_path / 'load_from', 'load_from', N + INTERVAL, resume=True,
                         load_from=str(ckpt))
    runner.train()
    assert torch_load_spy and all(w in (None, True) for w in torch_load_spy)
    assert runner.iter == N + INTERVAL
    # Same trajectory as the uninterrupted run, checked at iteration N + INTERVAL.
    straight_ckpt = torch.load(runs['root'] / 'straight' / f'iter_{N + INTERVAL}.pth')
    assert_state_equal(runner.model.state_dict(), straight_ckpt['state_dict'], 'model state')
    assert_optim_state_equal(runner.optim_wrapper.state_dict(), straight_ckpt['optimizer'])


# ------------------------------------------------------------ the allow-list is no hole
class GetattrReduce:
    """Pickles as ``getattr(obj, name)``."""

    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def __reduce__(self):
        return getattr, (self.obj, self.name)


class Unlisted:
    """A class nobody allow-listed."""

    def __init__(self, value=1):
        self.value = value


class CallReduce:
    """Pickles as ``func(*args)``."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_getattr_statistics_method_loads():
    for name in ('min', 'max', 'mean', 'current'):
        obj = torch.load(_dumps({'m': GetattrReduce(HistoryBuffer, name)}))
        assert obj['m'] is getattr(HistoryBuffer, name)
    assert torch.load(_dumps(GetattrReduce(HistoryBuffer, 'min')), weights_only=True) \
        is HistoryBuffer.min


@pytest.mark.parametrize('obj,name', [
    (HistoryBuffer, '__init__'),
    (HistoryBuffer, '__class__'),
    (HistoryBuffer, '__reduce_ex__'),
    (HistoryBuffer, 'update'),
    (HistoryBuffer, 'register_statistics'),
    (HistoryBuffer, '_statistics_methods'),
    (HistoryBuffer, '__dict__'),
    (np.ndarray, 'tofile'),
    (np.ndarray, 'min'),
    (np.dtype, '__init__'),
    (torch.Tensor, 'tolist'),
])
def test_getattr_other_attributes_refused(obj, name):
    buf = _dumps(GetattrReduce(obj, name))
    with pytest.raises(pickle.UnpicklingError, match='getattr'):
        torch.load(buf)  # default: weights_only=True
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buf, weights_only=True)


def test_getattr_on_an_instance_refused():
    # getattr on a HistoryBuffer *instance* (not the class) is refused as well.
    buf = _dumps(GetattrReduce(HistoryBuffer([1.0], [1]), 'min'))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buf)


class PoisonStatistics:
    """Pickles as a HistoryBuffer whose state registers extra 'statistics method' names:
    ``HistoryBuffer()`` then ``__setstate__({'statistics_methods': {...}})``, which
    mmengine applies to the *class-level* ``HistoryBuffer._statistics_methods``."""

    def __init__(self, *names):
        self.names = names

    def __reduce__(self):
        return HistoryBuffer, (), {'statistics_methods': {n: 0 for n in self.names}}


@pytest.fixture
def restore_statistics_methods():
    saved = dict(HistoryBuffer._statistics_methods)
    yield
    HistoryBuffer._statistics_methods.clear()
    HistoryBuffer._statistics_methods.update(saved)


def test_checkpoint_cannot_extend_the_getattr_allow_list(restore_statistics_methods):
    # mmengine's HistoryBuffer.__setstate__ adds the loaded names to the class-level dict;
    # the restricted getattr must not follow it, in this load or in any later one.
    buf = _dumps([PoisonStatistics('__init__', '__class__'),
                  GetattrReduce(HistoryBuffer, '__init__')])
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buf)
    torch.load(_dumps(PoisonStatistics('__init__', '__class__')))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(_dumps(GetattrReduce(HistoryBuffer, '__init__')))


def test_restricted_getattr_direct():
    assert history_buffer_getattr(HistoryBuffer, 'mean') is HistoryBuffer.mean
    with pytest.raises(pickle.UnpicklingError):
        history_buffer_getattr(HistoryBuffer, '__init__')
    with pytest.raises(pickle.UnpicklingError):
        history_buffer_getattr(os, 'system')
    # The real builtins.getattr is untouched.
    import builtins
    assert builtins.getattr is getattr
    assert getattr(HistoryBuffer, '__init__') is HistoryBuffer.__init__


def test_resolved_method_cannot_be_called():
    # getattr(HistoryBuffer, 'min') resolves, but the method is no allowed callable.
    buf = _dumps(CallReduce(HistoryBuffer.min, (HistoryBuffer([1.0, 2.0], [1, 1]),)))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buf)


def test_unlisted_global_refused():
    buf = _dumps({'x': Unlisted(3)})
    with pytest.raises(pickle.UnpicklingError, match='Unlisted'):
        torch.load(buf, weights_only=True)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buf)  # default
    buf.seek(0)
    assert torch.load(buf, weights_only=False)['x'].value == 3  # the file itself is fine


@pytest.mark.parametrize('func,args', [
    (os.system, ('true',)),
    (eval, ('1 + 1',)),
    (print, ('hi',)),
])
def test_dangerous_callables_refused(func, args):
    with pytest.raises(pickle.UnpicklingError):
        torch.load(_dumps(CallReduce(func, args)))


def test_plain_state_dict_and_numpy_load():
    # What compat allows still loads: tensors, a JSBN state dict, numpy arrays and scalars.
    layer = JSBN1d(4)
    obj = dict(sd=layer.state_dict(), arr=np.arange(6, dtype=np.float32).reshape(2, 3),
               f=np.float64(1.5), i=np.int64(7), b=np.bool_(True),
               hb=HistoryBuffer([1.0, 2.0], [1, 1]))
    out = torch.load(_dumps(obj))
    assert_state_equal(out['sd'], layer.state_dict(), 'JSBN1d state')
    np.testing.assert_array_equal(out['arr'], obj['arr'])
    assert out['f'] == 1.5 and out['i'] == 7 and out['b']
    assert out['hb'].mean() == 1.5
