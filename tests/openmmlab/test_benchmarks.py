"""tools/benchmark_train.py on CPU (its models build on OpenMMLab; tools/benchmark_norm.py,
torch alone: tests/core/test_fast_path.py), and tools/benchmark_native.py, whose C++
prototype is built with the ninja of this environment."""
import shutil

import pytest
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


@pytest.mark.skipif(shutil.which('c++') is None, reason='no C++ compiler to build the prototype')
def test_benchmark_native_prototype_equals_jsbn(capsys):
    """The prototype gives JSBN2d's output, gradients and running statistics (the tool
    raises otherwise), with the kernel's moments (512 values) and the passes (2^17)."""
    rows = load_tool('benchmark_native').main(
        ['--shapes', '2,8,8,8', '2,4,128,128', '--iters', '1', '--repeats', '1', '--warmup', '1'])
    assert [r['shape'] for r in rows] == [[2, 8, 8, 8], [2, 4, 128, 128]]
    assert all(r['max_rel_diff'] < 1e-5 for r in rows)
    assert all(r['ms'][name] > 0 for r in rows for name in ('bn', 'jsbn', 'native'))
    assert '| 2,4,128,128 |' in capsys.readouterr().out
