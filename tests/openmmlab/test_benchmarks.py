"""tools/benchmark_train.py on CPU (its models build on OpenMMLab; tools/benchmark_norm.py,
torch alone: tests/core/test_fast_path.py)."""
from helpers import load_tool


def test_benchmark_train_cpu_smoke(capsys):
    rows = load_tool('benchmark_train').main(
        ['--device', 'cpu', '--models', 'resnet50', '--norms', 'BN', 'JSBN', '--dtypes', 'fp32',
         '--cls-shape', '2', '32', '--iters', '1', '--warmup', '1', '--with-device-scalars',
         '--with-kernel-moments', '--rounds', '2', '--clock', 'process'])
    out = capsys.readouterr().out
    assert [(r['model'], r['norm'], r['path']) for r in rows] == [
        ('resnet50', 'BN', '-'), ('resnet50', 'JSBN', '-'), ('resnet50', 'JSBN', 'kernel moments'),
        ('resnet50', 'JSBN', 'device scalars')]
    assert rows[0]['ms_vs_bn'] == 1.0 and all(r['ms'] > 0 for r in rows)
    assert '| resnet50 | JSBN | - | fp32 | 2x32 |' in out
    assert '| resnet50 | JSBN | device scalars | fp32 | 2x32 |' in out
