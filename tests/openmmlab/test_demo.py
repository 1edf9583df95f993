"""The README's main job: tools/demo.py trains both models and writes metrics and plots."""
import json
import subprocess
import sys

from helpers import ROOT


def test_demo_writes_metrics_and_plots(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'demo.py'), '--work-dir',
                           str(tmp_path), '--epochs', '1'], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((tmp_path / 'metrics.json').read_text())
    assert set(metrics) == {'SyncJSBN', 'BN'}
    for m in metrics.values():
        assert 0 <= m['test']['accuracy/top1'] <= 100
        assert set(m['noise_top1']) == {'0', '16', '32', '64'}
        assert m['noise_top1']['0'] == m['test']['accuracy/top1']  # same eval, no noise
    for png in ('demo.png', 'shrinkage.png'):
        assert (tmp_path / png).read_bytes()[:4] == b'\x89PNG'
    assert f'metrics: {tmp_path / "metrics.json"}' in proc.stdout
    assert 'not a result' in proc.stdout and 'tools/benchmark_robustness.py' in proc.stdout
