"""ShrinkageMonitorHook in a real mmengine Runner, and tools/plot_shrinkage.py on its log."""
import json
import subprocess
import sys

import torch
from helpers import ROOT
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import Dataset

import robustbn
from robustbn.estimators import shrinkage_factors


class _Data(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(x=torch.randn(6, generator=g) * 2 + 1, y=torch.tensor(i % 3))


class _Net(BaseModel):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(6, 8), robustbn.JSBN1d(8)
        self.fc2, self.bn2 = nn.Linear(8, 5), robustbn.SyncJSBN(5, estimator='classic')
        self.bn_plain = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x, y, mode='loss'):
        out = self.head(self.bn_plain(self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(x)))))))
        return dict(loss=nn.functional.cross_entropy(out, y)) if mode == 'loss' else out


class _RecordFlags(Hook):
    """Records, at each iteration's model step, whether the layers were recording."""
    priority = 'LOWEST'

    def __init__(self):
        self.flags = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self._h = runner.model.bn1.register_forward_hook(
            lambda m, i, o: self.flags.append((runner.iter + 1, m.record_factors)))

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self._h.remove()


def test_monitor_logs_factors_only_on_logged_iterations(tmp_path):
    flags = _RecordFlags()
    runner = Runner(
        model=_Net(), work_dir=str(tmp_path),
        experiment_name=f'monitor_{tmp_path.name}',  # unique: Visualizer instances are per name
        train_dataloader=dict(dataset=_Data(), batch_size=8, sampler=dict(type='DefaultSampler'),
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05)),
        train_cfg=dict(by_epoch=False, max_iters=7),
        custom_hooks=[dict(type='ShrinkageMonitorHook', interval=3, per_layer=True), flags],
        default_hooks=dict(logger=dict(type='LoggerHook', interval=1)),
        randomness=dict(seed=0))
    runner.train()
    # recording happens in iterations 3 and 6 only, and is off afterwards
    assert [it for it, on in flags.flags if on] == [3, 6]
    assert not runner.model.bn1.record_factors and not runner.model.bn2.record_factors

    scalars = next(tmp_path.glob('*/vis_data/scalars.json'))
    recs = [json.loads(line) for line in scalars.read_text().splitlines()]
    recs = [r for r in recs if 'shrinkage/mean_factor' in r]
    assert [r['step'] for r in recs] == [3, 6]
    for r in recs:
        for f in ('mean_factor', 'var_factor', 'var_scale'):
            per = [r[f'shrinkage/bn1/{f}'], r[f'shrinkage/bn2/{f}']]
            assert abs(r[f'shrinkage/{f}'] - sum(per) / 2) < 1e-6
            assert r[f'shrinkage/{f}_min'] == min(per) and r[f'shrinkage/{f}_max'] == max(per)
        assert 'shrinkage/bn_plain/mean_factor' not in r
        assert 0 < r['shrinkage/bn1/mean_factor'] < 1  # 'paper' shrinks the means
    log = next(tmp_path.glob('*/*.log')).read_text()
    assert 'shrinkage (2 layers): mean_factor' in log

    out = tmp_path / 'plot.png'
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'plot_shrinkage.py'), str(tmp_path),
                           '--out', str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 5000 and out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_recorded_factors_match_the_batch():
    layer = robustbn.JSBN2d(6, estimator='wacv').double()
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64) + torch.arange(6.).view(1, 6, 1, 1)
    layer.record_factors = True
    layer(x)
    m, v = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    want = shrinkage_factors(m, v, *robustbn.get_estimator('wacv')(m, v, 36.0))
    torch.testing.assert_close(layer.last_factors, want)
    layer.record_factors = False
    layer.last_factors = None
    layer(x)
    assert layer.last_factors is None


def test_plot_tool_explains_missing_data(tmp_path):
    (tmp_path / 'scalars.json').write_text(json.dumps({'loss': 1.0, 'step': 1}) + '\n')
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'plot_shrinkage.py'),
                           str(tmp_path / 'scalars.json')], capture_output=True, text=True)
    assert proc.returncode != 0 and 'ShrinkageMonitorHook' in proc.stderr


class _OverflowData(_Data):
    """Sample 5 has one huge (finite) feature: in float32 the variance of that feature
    over its batch overflows to inf, while BatchNorm's output stays finite (0)."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        if i == 5:
            item['x'][2] = 1e30
        return item


class _InputNormNet(_Net):
    def __init__(self):
        super().__init__()
        self.bn0 = robustbn.JSBN1d(6)

    def forward(self, x, y, mode='loss'):
        return super().forward(self.bn0(x), y, mode)


def test_monitor_logs_nonfinite_batches(tmp_path):
    runner = Runner(
        model=_InputNormNet(), work_dir=str(tmp_path),
        experiment_name=f'nonfinite_{tmp_path.name}',  # unique: Visualizer instances are per name
        train_dataloader=dict(dataset=_OverflowData(), batch_size=8,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05)),
        train_cfg=dict(by_epoch=False, max_iters=6),
        custom_hooks=[dict(type='ShrinkageMonitorHook', interval=3, per_layer=True)],
        default_hooks=dict(logger=dict(type='LoggerHook', interval=1)),
        randomness=dict(seed=0))
    runner.train()
    model = runner.model
    assert model.bn0.nonfinite_batches == 1 and model.bn1.nonfinite_batches == 0
    assert torch.isfinite(model.bn0.running_var).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())  # training went on
    scalars = next(tmp_path.glob('*/vis_data/scalars.json'))
    recs = [json.loads(line) for line in scalars.read_text().splitlines()]
    recs = [r for r in recs if 'nonfinite/batches' in r]
    assert [(r['step'], r['nonfinite/batches'], r['nonfinite/bn0'], r['nonfinite/bn1'])
            for r in recs] == [(3, 1.0, 1.0, 0.0), (6, 1.0, 1.0, 0.0)]
    log = next(tmp_path.glob('*/*.log')).read_text()
    assert log.count('non-finite batch statistics: 1 layer-batches so far, in bn0;') == 1
